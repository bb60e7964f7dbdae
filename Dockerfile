# The OPPU image the Ray cluster runs: Ray's GPU image plus this project, for KubeRay (k8s/),
# the cluster launcher (cluster/cluster-launcher.yaml) and `ray job submit`.
#   docker build -t registry.example.com/oppu:0.1.0 . && docker push registry.example.com/oppu:0.1.0
# RAY_VERSION must equal the Ray of every client that talks to the cluster.
ARG RAY_VERSION=2.60.0
FROM rayproject/ray:${RAY_VERSION}-py311-gpu
ARG RAY_VERSION

WORKDIR /home/ray/oppu
COPY --chown=ray:users . .
# Pinning ray keeps pip from replacing the image's own build; torch comes with CUDA from PyPI.
# DeepSpeed ships as source whose setup imports torch, hence the second step without isolation.
RUN pip install --no-cache-dir . "ray[default,data,train,serve]==${RAY_VERSION}" \
 && pip install --no-cache-dir --no-build-isolation "deepspeed>=0.15" "bitsandbytes>=0.44"

ENV OPPU_CACHE_DIR=/home/ray/.cache/oppu \
    TOKENIZERS_PARALLELISM=false
