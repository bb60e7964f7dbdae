"""A base upgrade (issue #17 part 5) at tiny size, on a local Ray with a real Serve app over HTTP:
users trained on the old base are served while ``oppu users migrate`` retrains every one of them on a
new base (another seed: another fingerprint) in the background; ``--status`` says it is complete,
``--cut-over`` records the new bases in the run's config, and the app is redeployed in place
(``serve.run`` of the new config, ``model`` the new base). A steady stream of ``/v1/predict``
requests for the migrated users runs from before the migration to after the cut-over: none fails,
every answer before the cut-over comes from the old base and an old version, every answer sent after
the redeploy returned comes from the new base and the version the migration published."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass

import pytest
import yaml

from tests.unit.tiny_models import build_movie_tag_base, movie_user

pytestmark = pytest.mark.integration

TASK = "LaMP-2M"
USERS = ["ann", "bob", "cid"]
ADMIN_TOKEN = "admin-secret-for-base-upgrade"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Answer:
    phase: str  # what the test was doing when the request was sent
    user: str
    sent_s: float
    status: int  # HTTP status; 0 when the request got no answer at all
    body: dict | str
    seconds: float  # until the answer came


class Traffic:
    """One client thread sending ``/v1/predict`` for each user in turn until stopped."""

    def __init__(self, url: str):
        self.url, self.phase, self.answers = url, "before", []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import httpx

        from oppu.tasks import get_task

        task = get_task(TASK)
        with httpx.Client(base_url=self.url, timeout=120,
                          headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as client:
            i = 0
            while not self._stop.is_set():
                user, phase, sent = USERS[i % len(USERS)], self.phase, time.monotonic()
                i += 1
                body = {"task": TASK, "user": user, "k": 0,
                        "input": task.lamp_input({"description": f"movie {i} with jokes and a comedy feel"})}
                try:
                    answer = client.post("/v1/predict", json=body)
                    status, content = answer.status_code, answer.json() if answer.status_code == 200 else answer.text
                except Exception as exc:  # no answer at all counts as a failure too
                    status, content = 0, repr(exc)
                self.answers.append(Answer(phase, user, sent, status, content, time.monotonic() - sent))
                time.sleep(0.02)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=180)

    def count(self, phase: str) -> int:
        return sum(a.phase == phase for a in self.answers)

    def wait_for(self, phase: str, n: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while self.count(phase) < n and time.monotonic() < deadline:
            time.sleep(0.1)
        assert self.count(phase) >= n, f"only {self.count(phase)} answers in phase {phase!r}"


def _serve_args(run, base) -> dict:
    return {"model": str(base), "store": str(run / "adapters"), "data": str(run / "data"), "task": TASK,
            "num_cpus_per_replica": "0.5", "gpu_slots": "8", "max_batch_size": "8", "adapter_check_ttl_s": "1",
            "max_tokens_limit": "16", "default_max_tokens": "8"}


def _versions(run, fingerprint: str) -> dict[str, set[str]]:
    """user -> the versions of their oppu adapter on the base ``fingerprint``."""
    found: dict[str, set[str]] = {}
    for manifest in (run / "adapters" / TASK / fingerprint / "oppu").glob("*/*/manifest.json"):
        data = json.loads(manifest.read_text())
        found.setdefault(data["user"], set()).add(data["version"])
    return found


def test_migration_in_the_background_and_an_in_place_cut_over_fail_no_request(tmp_path, capsys):
    import ray
    from ray import serve

    from oppu import cli
    from oppu.data.dataset import write_dataset
    from oppu.models import base_fingerprint
    from serve_apps.oppu_serve import build

    started = time.monotonic()
    mark = [started]

    def step(what: str) -> None:  # each step's seconds, for the log of a slow or failed run
        now = time.monotonic()
        with capsys.disabled():  # not into the commands' output the test reads
            print(f"[base upgrade] {what}: {now - mark[0]:.1f}s", flush=True)
        mark[0] = now

    run = tmp_path / "run"
    old_base = build_movie_tag_base(run / "base")
    new_bases = run / "bases" / "v2"
    new_base = build_movie_tag_base(new_bases / "base", seed=1)
    old_fp, new_fp = base_fingerprint(old_base), base_fingerprint(new_base)
    assert old_fp != new_fp
    write_dataset(run / "data", TASK, [movie_user(user, 6 + i, offset=i) for i, user in enumerate(USERS)], {})
    (run / "config.yaml").write_text(yaml.safe_dump({
        "task": TASK, "users": {"variants": ["oppu"], "actors": 1, "users_per_batch": 3,
                                "optim": {"lr": 1e-2, "batch_size": 4, "epochs": 1, "max_length": 256}}}))

    ray_dir = tempfile.mkdtemp(prefix="oppu-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    os.environ["OPPU_ADMIN_TOKEN"] = ADMIN_TOKEN
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, _temp_dir=ray_dir,
             runtime_env={"env_vars": {"OPPU_ADMIN_TOKEN": ADMIN_TOKEN}})
    traffic = None
    try:
        step("bases, data and Ray")
        assert cli.main(["users", "train", "--run", str(run), *[f"--user={u}" for u in USERS]]) == 0
        step("users trained on the old base")
        old_versions = _versions(run, old_fp)
        assert sorted(old_versions) == USERS
        migrate = ["users", "migrate", "--run", str(run), "--to-bases", str(new_bases)]
        capsys.readouterr()
        assert cli.main([*migrate, "--status"]) == 1  # nobody migrated yet
        assert json.loads(capsys.readouterr().out)["pending"] == USERS

        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build(_serve_args(run, old_base)), name="oppu", route_prefix="/")
        step("served on the old base")
        traffic = Traffic(f"http://127.0.0.1:{port}")
        traffic.start()
        traffic.wait_for("before", 6)

        traffic.phase = "migrating"
        assert cli.main(migrate) == 0
        step("migration")
        out = capsys.readouterr().out
        trained = [line.split("\t") for line in out.splitlines() if "\t" in line]
        assert sorted((variant, user, status) for variant, user, status, _ in trained) == [
            ("oppu", user, "trained") for user in USERS]
        assert json.loads(out.splitlines()[-1])["complete"] is True
        new_versions = _versions(run, new_fp)
        assert {user: set(versions) for user, versions in new_versions.items()} == {
            user: {version} for variant, user, status, version in trained}
        traffic.wait_for("migrating", 3)

        traffic.phase = "migrated"
        assert cli.main(migrate) == 0  # resumed: nothing left to train
        assert "trained" not in capsys.readouterr().out
        assert cli.main([*migrate, "--cut-over"]) == 0
        assert yaml.safe_load((run / "config.yaml").read_text())["bases"] == str(new_bases)
        traffic.wait_for("migrated", 3)

        traffic.phase = "cutting-over"
        cut_started = time.monotonic()
        serve.run(build(_serve_args(run, new_base)), name="oppu", route_prefix="/")  # in place
        cut_seconds = time.monotonic() - cut_started
        step("in-place redeploy on the new base")
        traffic.phase = "after"
        traffic.wait_for("after", 9)
        traffic.stop()

        capsys.readouterr()
        assert cli.main(["adapters", "list", "--run", str(run), "--user", "ann"]) == 0  # the run's bases now
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [(row["version"], row["current"]) for row in rows] == [(next(iter(new_versions["ann"])), True)]
    finally:
        if traffic is not None:
            traffic.stop()
        serve.shutdown()
        ray.shutdown()
        os.environ.pop("OPPU_ADMIN_TOKEN", None)

    answers = traffic.answers
    failed = [(a.phase, a.user, a.status, a.body) for a in answers if a.status != 200]
    assert failed == [], f"{len(failed)} of {len(answers)} requests failed: {failed[:5]}"
    for answer in answers:
        base, version = answer.body["base_fingerprint"], answer.body["adapter_version"]
        if answer.phase in ("before", "migrating", "migrated"):  # serving went on from the old base
            assert (base, version in old_versions[answer.user]) == (old_fp, True), answer
        elif answer.phase == "cutting-over":  # one base or the other, each with its own adapter
            versions = old_versions if base == old_fp else new_versions
            assert base in (old_fp, new_fp) and version in versions[answer.user], answer
        else:  # sent after the redeploy returned
            assert (base, version in new_versions[answer.user]) == (new_fp, True), answer
    phases = ("before", "migrating", "migrated", "cutting-over", "after")
    counts = {phase: traffic.count(phase) for phase in phases}
    slowest = {phase: round(max(a.seconds for a in answers if a.phase == phase), 2) for phase in phases}
    print(f"[base upgrade] {len(answers)} requests, 0 failed, by phase {counts}, slowest answer (s) {slowest}; "
          f"redeploy {cut_seconds:.1f}s; whole test {time.monotonic() - started:.0f}s")
    shutil.rmtree(ray_dir, ignore_errors=True)  # kept, with Serve's logs, where an assertion failed
