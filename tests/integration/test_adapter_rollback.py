"""Rolling a user's adapter back over HTTP (issue #17), on a real local Ray Serve app with two
model replicas: ``POST /v1/users/{user}/adapter/rollback`` (the admin token only) makes an older
version current, and the next requests are answered by it at once although the replicas'
``adapter_check_ttl_s`` is ten minutes (the event log tells every replica). The exported adapter
(``oppu adapters export``) answers through PEFT as the serve app does, before and after."""

from __future__ import annotations

import asyncio
import json
import os
import socket

import pytest
import yaml

from tests.unit.serving.tiny_setup import (
    build_tiny_base,
    make_user_adapter,
    peft_greedy,
    publish_adapter,
    reseeded_adapter,
)

pytestmark = pytest.mark.integration

TASK = "LaMP-2M"
ADMIN_TOKEN = "admin-secret-for-rollback"
PROMPT = "the dark space movie about a robot"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _predict_all(url: str, token: str, n: int) -> list[dict]:
    import httpx

    from oppu.tasks import get_task

    body = {"task": TASK, "user": "alice", "k": 0,
            "input": get_task(TASK).lamp_input({"description": "a robot detective in space"})}
    async with httpx.AsyncClient(base_url=url, timeout=120, headers={"Authorization": f"Bearer {token}"}) as client:
        answers = await asyncio.gather(*(client.post("/v1/predict", json=body) for _ in range(n)))
    assert all(answer.status_code == 200 for answer in answers), [a.text for a in answers]
    return [answer.json() for answer in answers]


def test_rollback_over_http_is_followed_by_every_replica_at_once(tmp_path, capsys):
    import httpx
    import ray
    from ray import serve

    from oppu import cli
    from oppu.models import base_fingerprint
    from oppu.store import AdapterStore, TokenStore
    from serve_apps.oppu_serve import build

    run = tmp_path / "run"
    base = build_tiny_base(run / "base")
    (run / "config.yaml").write_text(yaml.safe_dump({"task": TASK, "users": {"variants": ["oppu"]}}))
    store = AdapterStore(str(run / "adapters"))
    template = make_user_adapter(base, tmp_path / "template", seed=0)
    adapters = [reseeded_adapter(template, tmp_path / f"alice-{i}", seed=10 + i) for i in range(3)]
    versions = [publish_adapter(store, TASK, base_fingerprint(base), "alice", a).version for a in adapters]
    user_token = TokenStore(str(run / "adapters")).create("alice")

    os.environ["OPPU_ADMIN_TOKEN"] = ADMIN_TOKEN
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OPPU_ADMIN_TOKEN": ADMIN_TOKEN}})
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build({"model": str(base), "store": str(run / "adapters"), "task": TASK, "num_replicas": "2",
                         "num_cpus_per_replica": "0.5", "gpu_slots": "8", "max_batch_size": "8",
                         "adapter_check_ttl_s": "600", "max_tokens_limit": "16", "default_max_tokens": "8"}),
                  name="rollback", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

        def completion() -> str:
            answer = httpx.post(url + "/v1/completions", headers={"Authorization": f"Bearer {user_token}"},
                                json={"model": "base:alice", "prompt": PROMPT, "max_tokens": 8, "temperature": 0},
                                timeout=120)
            assert answer.status_code == 200, answer.text
            return answer.json()["choices"][0]["text"]

        def exported(version: str) -> str:
            out = tmp_path / f"export-{version}"
            assert cli.main(["adapters", "export", "--run", str(run), "--user", "alice", "--out", str(out),
                             "--version", version]) == 0
            return peft_greedy(base, out, [PROMPT], 8)[0]

        assert {a["adapter_version"] for a in asyncio.run(_predict_all(url, user_token, 8))} == {versions[-1]}
        newest_answer = completion()
        assert newest_answer == exported(versions[-1])

        rollback = url + "/v1/users/alice/adapter/rollback"
        refused = httpx.post(rollback, json={"version": versions[0]}, timeout=60,
                             headers={"Authorization": f"Bearer {user_token}"})
        assert refused.status_code == 403 and "admin" in refused.json()["error"]["message"]
        assert httpx.post(rollback, json={"to": versions[0]}, headers=admin, timeout=60).status_code == 400
        unknown = httpx.post(rollback, json={"version": "v20000101T000000000000-00000000"}, headers=admin, timeout=60)
        assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "version"
        done = httpx.post(rollback, json={"version": versions[0]}, headers=admin, timeout=60)
        assert done.status_code == 200, done.text
        assert done.json()["version"] == versions[0] and done.json()["current"] is True

        # At once, on every replica: the cached newest version would be trusted for ten minutes.
        assert {a["adapter_version"] for a in asyncio.run(_predict_all(url, user_token, 8))} == {versions[0]}
        rolled_back_answer = completion()
        assert rolled_back_answer == exported(versions[0]) != newest_answer
        capsys.readouterr()
        assert cli.main(["adapters", "list", "--run", str(run), "--user", "alice"]) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [row["current"] for row in rows] == [True, False, False]
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.pop("OPPU_ADMIN_TOKEN", None)
