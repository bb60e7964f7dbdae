"""Adapt the base LLM to the task on the non-test users with Ray Train (plain and RAG flavours).

    ray job submit --working-dir . -- python jobs/train_base.py --config oppu/configs/lamp.yaml \
        --set run_dir=/shared/oppu-run
"""

import sys

from oppu.pipeline import job_main

if __name__ == "__main__":
    sys.exit(job_main(["base"], __doc__))
