"""A user's model over its life (#17), at tiny size on a local Ray: onboard a new user's history
(``oppu users add``), train just them (``oppu users train``) for every variant of the run config,
serve them, add history through ``PUT /v1/users/{user}/history``, train again and see the new
version served within ``adapter_check_ttl_s``, with no restart."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

TASK = "LaMP-2M"
ADMIN_TOKEN = "admin-secret-for-user-life"
TINY = ["tiny.hidden_size=64", "tiny.num_layers=2", "tiny.num_heads=4", "tiny.num_kv_heads=4",
        "tiny.intermediate_size=128", "tiny.vocab_size=800", "tiny.pretrain_steps=40",
        "base.optim.epochs=1", "base.max_samples=120", "base.num_workers=1", "users.optim.epochs=1",
        "users.actors=1", "users.users_per_batch=2", "ray.num_cpus=4"]
ITEMS = [{"id": "nb-1", "date": "2023-01-01", "description": "a robot crosses space to find home",
          "tag": "sci-fi"},
         {"id": "nb-2", "date": "2023-02-01", "description": "two friends laugh through a road trip",
          "tag": "comedy"}]
LATER = [{"id": "nb-3", "date": "2023-03-01", "description": "a detective hunts a killer at night",
          "tag": "violence"}]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A prepared run with both task-adapted bases and a quickstart-style config.yaml; no adapters."""
    import ray
    import yaml

    from oppu import cli
    from oppu.config import load_config, to_dict
    from oppu.pipeline import PACKAGED_CONFIGS, run_stages
    from oppu.run_config import RunConfig

    out = tmp_path_factory.mktemp("life")
    lamp = out / "data" / "lamp"
    assert cli.main(["synth", "--task", TASK, "--users", "12", "--seed", "5", "--n-test", "3",
                     "--out", str(lamp)]) == 0
    assert cli.main(["prepare", "--task", TASK, "--questions", str(lamp / "questions.json"),
                     "--outputs", str(lamp / "outputs.json"), "--n-test", "3", "--out", str(out / "data")]) == 0
    cfg = load_config(RunConfig, PACKAGED_CONFIGS / "quickstart.yaml", [f"task={TASK}", f"run_dir={out}", *TINY])
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    run_stages(cfg, ["base"])
    ray.shutdown()
    return out


def _manifests(run_dir: Path) -> dict[tuple[str, str], list[str]]:
    """(variant, user) -> the versions in the store."""
    found: dict[tuple[str, str], list[str]] = {}
    for manifest in sorted((run_dir / "adapters").glob(f"{TASK}/*/*/*/*/manifest.json")):
        data = json.loads(manifest.read_text())
        found.setdefault((data["variant"], data["user"]), []).append(data["version"])
    return found


def test_add_train_serve_then_more_history_and_a_new_version_without_restart(run_dir, tmp_path):
    import httpx
    import ray
    from ray import serve

    from oppu import cli
    from oppu.data.dataset import read_dataset
    from oppu.store import TokenStore
    from oppu.tasks import get_task
    from serve_apps.oppu_serve import build

    history = tmp_path / "newbie.json"
    history.write_text(json.dumps(ITEMS))
    assert cli.main(["users", "add", "--run", str(run_dir), "--user", "newbie", "--history", str(history)]) == 0
    dataset = read_dataset(run_dir / "data")
    assert dataset.user("newbie").role == "test" and dataset.meta["n_users"] == 13

    os.environ["OPPU_ADMIN_TOKEN"] = ADMIN_TOKEN
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OPPU_ADMIN_TOKEN": ADMIN_TOKEN}})
    try:
        assert cli.main(["users", "train", "--run", str(run_dir), "--user", "newbie"]) == 0
        variants = ["oppu", "rag-k1+oppu"]  # quickstart.yaml's
        first = _manifests(run_dir)
        assert sorted(first) == [(variant, "newbie") for variant in sorted(variants)]  # nobody else
        assert all(len(versions) == 1 for versions in first.values())
        report = json.loads((run_dir / "reports" / "train_users-oppu.json").read_text())
        assert [user["user_id"] for user in report["users"]] == ["newbie"]

        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build({"model": str(run_dir / "base"), "store": str(run_dir / "adapters"),
                         "data": str(run_dir / "data"), "gpu_slots": "8", "max_batch_size": "8",
                         "adapter_check_ttl_s": "0.5", "history_check_ttl_s": "0.5",
                         "max_tokens_limit": "16", "default_max_tokens": "6",
                         "num_cpus_per_replica": "1"}), name="life", route_prefix="/")
        url, token = f"http://127.0.0.1:{port}", TokenStore(str(run_dir / "adapters")).create("newbie")
        user_auth = {"Authorization": f"Bearer {token}"}

        body = {"task": TASK, "user": "newbie", "k": 3,
                "input": get_task(TASK).lamp_input({"description": "a robot detective in space"})}
        answer = httpx.post(url + "/v1/predict", json=body, headers=user_auth, timeout=120)
        assert answer.status_code == 200, answer.text
        assert answer.json()["adapter_version"] == first[("oppu", "newbie")][0]
        assert answer.json()["retrieved"] == 2  # all the history there is

        bad = httpx.put(url + "/v1/users/newbie/history", headers=user_auth, timeout=60,
                        json={"history": [{"id": "nb-9", "description": "no tag"}]})
        assert bad.status_code == 400 and "profile[0].tag" in bad.json()["error"]["message"]
        other = httpx.put(url + "/v1/users/someone/history", headers=user_auth, timeout=60, json={"history": LATER})
        assert other.status_code == 403
        put = httpx.put(url + "/v1/users/newbie/history", headers=user_auth, timeout=60,
                        json={"history": [*ITEMS, *LATER]})
        assert put.status_code == 200, put.text
        assert put.json() == {"user": "newbie", "created": False, "role": "test", "added": 1,
                                   "already_there": 2, "n_history": 3}
        answer = httpx.post(url + "/v1/predict", json=body, headers=user_auth, timeout=120)
        assert answer.status_code == 200 and answer.json()["retrieved"] == 3  # the current history

        assert cli.main(["users", "train", "--run", str(run_dir), "--user", "newbie"]) == 0  # new history
        second = _manifests(run_dir)
        assert sorted(second) == sorted(first) and all(len(versions) == 2 for versions in second.values())
        newest = sorted(second[("oppu", "newbie")])[-1]
        time.sleep(0.6)  # the app's adapter_check_ttl_s
        answer = httpx.post(url + "/v1/predict", json=body, headers=user_auth, timeout=120)
        assert answer.status_code == 200 and answer.json()["adapter_version"] == newest != first[("oppu", "newbie")][0]
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(run_dir / "reports", ignore_errors=True)
