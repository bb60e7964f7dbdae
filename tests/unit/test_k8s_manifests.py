"""The KubeRay manifests under k8s/ pass the operator's CRD schemas (KubeRay v1.7.0, committed in
``k8s/crds/``, see its README), with unknown fields refused as ``kubectl apply`` (strict field
validation) refuses them, and name only scripts, configs, secrets and serve builders that exist.
The Grafana dashboard queries only metrics the code registers. Every shipped Ray cluster config
turns on Ray's token authentication, the NetworkPolicy covers every Ray pod, and the serving pods'
credentials are split from the training ones and from the token store's writers."""

from __future__ import annotations

import ast
import copy
import functools
import json
import re
import shlex
from pathlib import Path, PurePosixPath

import jsonschema  # a test dependency (pyproject's [test]): missing, the module errors rather than skips
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / "k8s" / "crds"
K8S_DIR = ROOT / "k8s"
DASHBOARD = ROOT / "cluster" / "grafana" / "oppu-dashboard.json"
KUBERAY_KINDS = ("RayCluster", "RayJob", "RayService")
# The CRDs are 32k lines of YAML: libyaml parses them in a second, pure Python in many.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _image_root() -> PurePosixPath:
    """Where the Dockerfile puts the repo inside the image (its WORKDIR)."""
    workdirs = re.findall(r"^WORKDIR\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert len(workdirs) == 1, "the Dockerfile should set exactly one WORKDIR (the repo's place)"
    return PurePosixPath(workdirs[0])


def _strict(schema: dict) -> dict:
    """The CRD schema as the API server applies it: unknown fields are errors, int-or-string
    fields take either type (jsonschema ignores the ``x-kubernetes-*`` extensions)."""
    schema = copy.deepcopy(schema)

    def visit(node):
        if isinstance(node, dict):
            if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
                node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema)
    return schema


@functools.cache
def _validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    """The strict validator of one served version of a KubeRay CRD."""
    for path in sorted(CRD_DIR.glob("ray.io_*.yaml")):
        if not path.name.startswith(f"ray.io_{kind.lower()}s"):
            continue
        crd = yaml.load(path.read_text(), Loader=_LOADER)
        for version in crd["spec"]["versions"]:
            if f"{crd['spec']['group']}/{version['name']}" == api_version:
                return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))
    raise AssertionError(f"no KubeRay CRD in {CRD_DIR} serves {api_version} {kind}")


def _documents(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((K8S_DIR / name).read_text()) if doc]


def _kuberay_manifests() -> list[tuple[str, dict]]:
    found = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        found += [(path.name, doc) for doc in _documents(path.name) if doc.get("kind") in KUBERAY_KINDS]
    return found


def _schema_errors(doc: dict) -> list[str]:
    validator = _validator(doc["apiVersion"], doc["kind"])
    return [f"{'.'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
            for error in validator.iter_errors(doc)]


def _pod_templates(doc: dict) -> list[dict]:
    """Every pod spec of a RayCluster, RayService or RayJob (cluster and submitter)."""
    spec = doc["spec"]
    cluster = spec.get("rayClusterConfig") or spec.get("rayClusterSpec") or (
        spec if doc["kind"] == "RayCluster" else None)
    pods = []
    if cluster:
        pods.append(cluster["headGroupSpec"]["template"]["spec"])
        pods += [group["template"]["spec"] for group in cluster.get("workerGroupSpecs", [])]
    if "submitterPodTemplate" in spec:
        pods.append(spec["submitterPodTemplate"]["spec"])
    return pods


def _repo_path(token: str) -> Path:
    """A path as the manifests spell it (inside the image, or repo-relative) -> the repo file."""
    path = PurePosixPath(token)
    if path.is_absolute():
        path = path.relative_to(_image_root())
    return ROOT / path


def _serve_config(doc: dict) -> dict:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def test_every_kuberay_kind_is_shipped():
    assert sorted({doc["kind"] for _, doc in _kuberay_manifests()}) == sorted(KUBERAY_KINDS)


@pytest.mark.parametrize("name, doc", _kuberay_manifests(), ids=lambda v: v if isinstance(v, str) else "")
def test_manifest_passes_kuberay_crd_schema(name, doc):
    assert _schema_errors(doc) == [], f"{name} ({doc['kind']} {doc['metadata']['name']})"


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["spec"]["workerGroupSpecs"][0].update(maxReplica=4), "'maxReplica' was unexpected"),
    (lambda d: d["spec"]["workerGroupSpecs"][0].update(minReplicas="zero"), "is not of type 'integer'"),
    (lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(imagePullPolicy=3),
     "is not of type 'string'"),
    (lambda d: d["spec"].update(enableInTreeAutoscaling="yes"), "is not of type 'boolean'"),
    (lambda d: d["spec"].pop("headGroupSpec"), "'headGroupSpec' is a required property"),
], ids=["typo", "int-as-text", "number-as-text", "text-as-bool", "missing-required"])
def test_schema_check_rejects_a_broken_raycluster(mutate, expected):
    doc = copy.deepcopy(next(d for _, d in _kuberay_manifests() if d["kind"] == "RayCluster"))
    assert _schema_errors(doc) == []
    mutate(doc)
    errors = _schema_errors(doc)
    assert any(expected in error for error in errors), errors


def test_schema_check_rejects_a_typo_in_a_rayservice():
    doc = copy.deepcopy(next(d for _, d in _kuberay_manifests() if d["kind"] == "RayService"))
    doc["spec"]["serveConfig"] = doc["spec"].pop("serveConfigV2")
    assert any("'serveConfig' was unexpected" in error for error in _schema_errors(doc))


def test_quantities_accept_numbers_and_text_but_not_other_types():
    doc = copy.deepcopy(next(d for _, d in _kuberay_manifests() if d["kind"] == "RayCluster"))
    resources = doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    resources["limits"]["nvidia.com/gpu"], resources["requests"]["cpu"] = 1, "8"
    assert _schema_errors(doc) == []
    resources["requests"]["memory"] = ["64Gi"]
    assert _schema_errors(doc) != []


def test_rayjob_entrypoint_runs_a_repo_script_with_a_loadable_config():
    from oppu.config import load_config
    from oppu.run_config import RunConfig

    jobs = [doc for _, doc in _kuberay_manifests() if doc["kind"] == "RayJob"]
    assert jobs
    for doc in jobs:
        argv = shlex.split(doc["spec"]["entrypoint"])
        assert argv[0] == "python" and _repo_path(argv[1]).is_file(), argv[:2]
        assert _repo_path(argv[1]).relative_to(ROOT).parts[0] == "jobs"
        config = _repo_path(argv[argv.index("--config") + 1])
        assert config.is_file(), config
        overrides = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--set"]
        cfg = load_config(RunConfig, config, overrides)
        assert cfg.run_dir.startswith("s3://"), "on a cluster every artefact lives in object storage"
        assert cfg.users.num_gpus_per_actor > 0
        target = doc["spec"].get("clusterSelector", {}).get("ray.io/cluster")
        clusters = {d["metadata"]["name"] for _, d in _kuberay_manifests() if d["kind"] == "RayCluster"}
        assert target in clusters or "rayClusterSpec" in doc["spec"]


def test_rayservice_imports_a_repo_builder_with_valid_args():
    from oppu.serving.config import load_serve_config

    services = [doc for _, doc in _kuberay_manifests() if doc["kind"] == "RayService"]
    assert services
    for doc in services:
        assert doc["spec"]["upgradeStrategy"]["type"] == "NewCluster"  # zero-downtime upgrades
        for app in _serve_config(doc)["applications"]:
            module, _, attribute = app["import_path"].partition(":")
            source = ROOT / (module.replace(".", "/") + ".py")
            assert source.is_file(), app["import_path"]
            functions = {node.name for node in ast.parse(source.read_text()).body
                         if isinstance(node, ast.FunctionDef)}
            assert attribute in functions, f"{source} defines no function {attribute!r}"
            config = load_serve_config(app["args"])
            assert config.model.startswith("s3://") and config.store.startswith("s3://")


def test_base_upgrade_manifests_agree():
    """A base upgrade (docs/cluster.md): the RayService's head carries the base its app serves as
    ``oppu.io/base``, so a cut-over changes rayClusterConfig (a new-cluster upgrade) along with
    ``model``; the migration RayJob's flags are its script's own and its new bases are not the run's."""
    import importlib.util

    from oppu.config import load_config
    from oppu.run_config import RunConfig

    for doc in (d for _, d in _kuberay_manifests() if d["kind"] == "RayService"):
        head = doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]
        models = {app["args"]["model"] for app in _serve_config(doc)["applications"]}
        assert head["annotations"]["oppu.io/base"] in models, "oppu.io/base must name the served base"
    spec = importlib.util.spec_from_file_location("migrate_users", ROOT / "jobs" / "migrate_users.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    migrations = [d for name, d in _kuberay_manifests() if "migrate_users.py" in d["spec"].get("entrypoint", "")]
    assert migrations
    for doc in migrations:
        args = job.parser().parse_args(shlex.split(doc["spec"]["entrypoint"])[2:])
        cfg = load_config(RunConfig, _repo_path(args.config), args.overrides)
        assert args.to_bases.startswith(cfg.run_dir + "/") and args.to_bases != cfg.bases_uri


def test_pods_read_secrets_that_the_example_defines_and_set_requests_limits_probes():
    secrets = {doc["metadata"]["name"]: set(doc["stringData"])
               for doc in _documents("secret-s3.example.yaml") if doc["kind"] == "Secret"}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= secrets["oppu-s3"]
    image_name = None
    for name, doc in _kuberay_manifests():
        for pod in _pod_templates(doc):
            for container in pod["containers"]:
                where = f"{name}: container {container['name']}"
                image_name = image_name or container["image"].split(":")[0]
                assert container["image"].split(":")[0] == image_name, where
                assert container["resources"]["requests"] and container["resources"]["limits"], where
                for source in container.get("envFrom", []):
                    assert source["secretRef"]["name"] in secrets, where
                for variable in container.get("env", []):
                    ref = variable.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["key"] in secrets.get(ref["name"], set()), f"{where}: {ref}"
                if container["name"] in ("ray-head", "ray-worker"):
                    assert "readinessProbe" in container and "livenessProbe" in container, where
                    assert container["envFrom"], f"{where} has no S3 credentials"
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    assert all((K8S_DIR / resource).is_file() for resource in kustomization["resources"])
    assert [image["name"] for image in kustomization["images"]] == [image_name]


def test_worker_groups_have_gpu_autoscaling_bounds():
    for name, doc in _kuberay_manifests():
        cluster = doc["spec"].get("rayClusterConfig") or (doc["spec"] if doc["kind"] == "RayCluster" else None)
        if cluster is None:
            continue
        for group in cluster["workerGroupSpecs"]:
            assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], name
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) >= 1, name


def _registered_metrics() -> dict[str, str]:
    """Metric name -> kind (Counter, Gauge, Histogram), as the code registers them."""
    pattern = re.compile(r"\b(Counter|Gauge|Histogram)\(\s*\"(oppu_[a-z0-9_]+)\"")
    found = {}
    for source in (ROOT / "oppu").rglob("*.py"):
        for kind, name in pattern.findall(source.read_text()):
            found[name] = kind
    return found


def test_grafana_dashboard_queries_only_registered_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    queried = set(re.findall(r"\bray_(oppu_[a-z0-9_]+)", " ".join(expressions)))
    assert queried, "the dashboard queries no OPPU metric"
    # Ray prefixes custom metrics with ray_ on export; counters gain _total, histograms
    # _bucket/_sum/_count.
    exported = {}
    for name, kind in _registered_metrics().items():
        suffixes = {"Counter": ["_total"], "Gauge": [""], "Histogram": ["_bucket", "_sum", "_count"]}[kind]
        exported.update({name + suffix: name for suffix in suffixes})
    unknown = sorted(queried - set(exported))
    assert unknown == [], f"dashboard queries metrics no code registers: {unknown}"
    assert {"oppu_users_done", "oppu_users_failed", "oppu_train_tokens_per_s"} <= {
        exported[q] for q in queried}


def test_cluster_launcher_config_passes_rays_schema():
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster" / "cluster-launcher.yaml").read_text())
    jsonschema.validate(config, schema)
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["max_worker"] = 8
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    assert config["file_mounts"][str(_image_root())] == "."


def test_runtime_env_is_accepted_by_ray():
    from ray.runtime_env import RuntimeEnv

    runtime_env = RuntimeEnv(**yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text()))
    assert runtime_env["working_dir"] == "."
    assert runtime_env["env_vars"]["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")


def test_the_kuberay_crds_are_in_the_repository():
    """The schemas are part of the repository, so the checks above run (never skip) on a clone."""
    found = {path.name for path in CRD_DIR.glob("ray.io_*.yaml")}
    assert found == {f"ray.io_{kind.lower()}s.yaml" for kind in KUBERAY_KINDS}, f"{CRD_DIR}: {sorted(found)}"
    assert "v1.7.0" in (CRD_DIR / "README.md").read_text()


# -- the locked control plane (docs/cluster.md, "Threat model") ------------------------------------

TRAINING_SECRET = "oppu-s3"  # write access to the runs: training pods only
HEAD_PORTS = {8265, 6379, 10001, 8000}  # dashboard/Jobs API, GCS, Ray client, Serve


def _example_secrets() -> dict[str, set[str]]:
    return {doc["metadata"]["name"]: set(doc["stringData"])
            for doc in _documents("secret-s3.example.yaml") if doc["kind"] == "Secret"}


def _cluster_spec(doc: dict) -> dict | None:
    spec = doc["spec"]
    return spec.get("rayClusterConfig") or spec.get("rayClusterSpec") or (spec if doc["kind"] == "RayCluster" else None)


def _auth_problems(doc: dict, manifests: list[dict]) -> list[str]:
    """Why a KubeRay object would run (or submit to) a Ray cluster without token authentication."""
    secrets = _example_secrets()
    cluster = _cluster_spec(doc)
    if cluster is not None:
        auth = cluster.get("authOptions") or {}
        if auth.get("mode") != "token":
            return [f"authOptions.mode is {auth.get('mode')!r}, not 'token'"]
        if "auth_token" not in secrets.get(auth.get("secretName"), set()):
            return [f"authOptions.secretName {auth.get('secretName')!r} is no example Secret with auth_token"]
        return []
    # A RayJob on an existing cluster: that cluster authenticates, and the submitter brings its token.
    target = doc["spec"].get("clusterSelector", {}).get("ray.io/cluster")
    clusters = {d["metadata"]["name"]: d for d in manifests if d["kind"] == "RayCluster"}
    if target not in clusters:
        return [f"clusterSelector names no shipped RayCluster: {target!r}"]
    secret = (_cluster_spec(clusters[target]).get("authOptions") or {}).get("secretName")
    env = {v["name"]: v for c in doc["spec"]["submitterPodTemplate"]["spec"]["containers"] for v in c.get("env", [])}
    problems = _auth_problems(clusters[target], manifests)
    if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
        problems.append("the submitter does not set RAY_AUTH_MODE=token")
    if env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef") != {"name": secret, "key": "auth_token"}:
        problems.append(f"the submitter's RAY_AUTH_TOKEN is not {secret}/auth_token")
    return problems


def test_every_shipped_kuberay_cluster_authenticates():
    manifests = [doc for _, doc in _kuberay_manifests()]
    for doc in manifests:
        assert _auth_problems(doc, manifests) == [], f"{doc['kind']} {doc['metadata']['name']}"
    # One token per cluster: the training token must not open the serving cluster.
    names = [_cluster_spec(d)["authOptions"]["secretName"] for d in manifests if _cluster_spec(d) is not None]
    assert len(names) == len(set(names)), names


@pytest.mark.parametrize("kind, mutate", [
    ("RayCluster", lambda d: d["spec"].pop("authOptions")),
    ("RayCluster", lambda d: d["spec"]["authOptions"].update(mode="disabled")),
    ("RayService", lambda d: d["spec"]["rayClusterConfig"].pop("authOptions")),
    ("RayJob", lambda d: d["spec"]["submitterPodTemplate"]["spec"]["containers"][0].pop("env")),
], ids=["cluster-no-auth", "cluster-disabled", "service-no-auth", "job-no-token"])
def test_auth_check_rejects_a_cluster_without_token_auth(kind, mutate):
    manifests = copy.deepcopy([doc for _, doc in _kuberay_manifests()])
    doc = next(d for d in manifests if d["kind"] == kind)
    mutate(doc)
    assert _auth_problems(doc, manifests) != []


def test_cluster_launcher_and_local_cluster_authenticate():
    from cluster.local_cluster import LocalClusterConfig

    config = yaml.safe_load((ROOT / "cluster" / "cluster-launcher.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [command for command in config[key] if "ray start" in command]
        assert starts and all("RAY_AUTH_MODE=token" in command for command in starts), key
        assert not any("--dashboard-host=0.0.0.0" in command for command in starts), key
    assert "/home/ray/.ray/auth_token" in config["file_mounts"]  # Ray's default token path on every node
    local = yaml.safe_load((ROOT / "cluster" / "local-cluster.yaml").read_text())
    assert local.get("auth", "token") == "token" and LocalClusterConfig.auth == "token"  # the dataclass default


def _secret_refs(pod: dict) -> set[str]:
    """Every Secret a pod spec reads: envFrom, env secretKeyRef, secret volumes."""
    names = set()
    for container in pod["containers"] + pod.get("initContainers", []):
        names |= {s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s}
        names |= {v["valueFrom"]["secretKeyRef"]["name"] for v in container.get("env", [])
                  if "secretKeyRef" in v.get("valueFrom", {})}
    names |= {v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
    return names


def _credential_problems(manifests: list[dict]) -> list[str]:
    secrets = _example_secrets()
    token_secrets = {name for name, keys in secrets.items() if any(k.startswith("OPPU_TOKENS_") for k in keys)}
    problems = []
    for doc in manifests:
        where = f"{doc['kind']} {doc['metadata']['name']}"
        for pod in _pod_templates(doc):
            refs = _secret_refs(pod)
            if doc["kind"] == "RayService":
                if TRAINING_SECRET in refs:
                    problems.append(f"{where}: a serving pod reads the training (write) credentials")
                if not refs & token_secrets:
                    problems.append(f"{where}: a serving pod has no read-only token-store credentials")
            elif refs & token_secrets:
                problems.append(f"{where}: a training pod reads token-store credentials")
        if doc["kind"] == "RayService":
            for app in _serve_config(doc)["applications"]:
                args = app["args"]
                bucket = PurePosixPath(args["store"].removeprefix("s3://")).parts[0]
                if not args.get("tokens") or PurePosixPath(args["tokens"].removeprefix("s3://")).parts[0] == bucket:
                    problems.append(f"{where}: tokens must live in a bucket apart from the adapter store")
    return problems


def test_credentials_are_split():
    """Serving pods never get the training cluster's write keys, and tokens live apart from adapters
    (their own bucket and read-only keys), so no credential that writes adapters can mint a token."""
    manifests = [doc for _, doc in _kuberay_manifests()]
    assert _credential_problems(manifests) == []
    broken = copy.deepcopy(manifests)
    service = next(d for d in broken if d["kind"] == "RayService")
    service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["envFrom"].append(
        {"secretRef": {"name": TRAINING_SECRET}})
    assert any("training (write) credentials" in p for p in _credential_problems(broken))


# A strict subset of networking.k8s.io/v1 NetworkPolicy: the fields the manifest uses, typos refused.
_SELECTOR = {"type": "object", "additionalProperties": False, "properties": {
    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
    "matchExpressions": {"type": "array"}}}
_PEER = {"type": "object", "additionalProperties": False, "minProperties": 1, "properties": {
    "podSelector": _SELECTOR, "namespaceSelector": _SELECTOR, "ipBlock": {"type": "object"}}}
_PORT = {"type": "object", "additionalProperties": False, "required": ["port"], "properties": {
    "protocol": {"enum": ["TCP", "UDP", "SCTP"]}, "port": {"type": ["integer", "string"]},
    "endPort": {"type": "integer"}}}
_RULE = {"type": "object", "additionalProperties": False, "properties": {
    "from": {"type": "array", "items": _PEER}, "ports": {"type": "array", "items": _PORT}}}
NETWORK_POLICY_SCHEMA = {"type": "object", "additionalProperties": False,
                         "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
    "apiVersion": {"const": "networking.k8s.io/v1"}, "kind": {"const": "NetworkPolicy"},
    "metadata": {"type": "object", "required": ["name"]},
    "spec": {"type": "object", "additionalProperties": False, "required": ["podSelector"], "properties": {
        "podSelector": _SELECTOR, "policyTypes": {"type": "array", "items": {"enum": ["Ingress", "Egress"]}},
        "ingress": {"type": "array", "items": _RULE}, "egress": {"type": "array"}}}}}


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())


def test_network_policy_covers_every_ray_pod_and_limits_the_head_ports():
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    assert "networkpolicy.yaml" in kustomization["resources"]
    policies = _documents("networkpolicy.yaml")
    assert policies
    for policy in policies:
        jsonschema.validate(policy, NETWORK_POLICY_SCHEMA)
    for name, doc in _kuberay_manifests():
        cluster = _cluster_spec(doc)
        if cluster is None:
            continue
        groups = [cluster["headGroupSpec"]] + cluster.get("workerGroupSpecs", [])
        for group in groups:
            labels = group["template"]["metadata"]["labels"]
            selecting = [p for p in policies if _selects(p["spec"]["podSelector"], labels)
                         and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
            assert selecting, f"{name}: no NetworkPolicy selects pods labelled {labels}"
            for policy in selecting:
                for rule in policy["spec"].get("ingress", []):
                    peers = rule.get("from")
                    assert peers, f"{policy['metadata']['name']}: a rule open to every source"
                    ports = {port["port"] for port in rule.get("ports", [])}
                    if not ports or ports & (HEAD_PORTS - {8000}):
                        # All ports, or the control plane's: only this cluster's own pods (and, for
                        # 8265, the operator and job submitters) may come in.
                        assert ports <= {8265} or all(_selects(peer.get("podSelector", {}), labels)
                                                      and "namespaceSelector" not in peer for peer in peers), \
                            f"{policy['metadata']['name']}: {sorted(ports) or 'every port'} open beyond the cluster"
                    for peer in peers:  # an empty selector on both sides would admit every pod anywhere
                        assert peer.get("podSelector", {}).get("matchLabels") or \
                            peer.get("namespaceSelector", {}).get("matchLabels"), policy["metadata"]["name"]
