"""Documented command blocks run by bash as written.

docs/cluster.md §1, "A local 3-node cluster with S3, from an empty machine": every bash block of
the section, in order, in one bash (the exports of one block reach the next, ``kill %1`` ends the
moto server the second block started): install (checked), the S3 server, the 3-node cluster,
data and bases, ``oppu publish``, the ``ray job submit`` of train_users and evaluate, ``serve
deploy`` and a completion, the teardown. Then README's "Using real LaMP files" block on fixture
files (made by ``oppu synth``, under the names the block uses, in the directory it runs in).

What the §1 test substitutes, all of it what the section's *Ports and paths* paragraph names as
the reader's to change, and nothing else:

- its ports (S3 5000, dashboard 8265, GCS 6390, nodes from 24000, Serve 8000) by free ones, and
  its scratch paths under ``/tmp`` by this test's; the cluster's through the ``--set``s the
  paragraph gives to ``cluster/local-up.sh`` and ``--state-dir`` to ``cluster/local-down.sh``;
  ``cluster/runtime_env.yaml`` and ``cluster/serve-local.yaml`` by copies with the same ports;
- ``git clone <this repo> oppu && cd oppu``: dropped, the test runs in the checkout; the two
  ``pip install`` lines are checked, not run (README's test explains why);
- the smaller sizes the section gives for slow machines, appended to the train_base line.

``oppu``, ``python``, ``python3``, ``ray``, ``serve`` and ``moto_server`` run this checkout with
this interpreter (small scripts first on ``PATH``; ``PYTHONPATH`` stands in for the section's
``pip install -e .``, which the nodes inherit). Wherever the test fails, the cluster and the moto
server it started are stopped (only those: by their recorded processes, never ``ray stop``).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.doc_runs import NOTICE, bin_dir, job_outputs, run_traced, shell_env
from tests.docs_blocks import ROOT, bash_blocks, commands
from tests.integration.test_cluster_local import _free_port, _free_port_range

pytestmark = pytest.mark.integration

DOC = ROOT / "docs" / "cluster.md"
SECTION = "1. A local 3-node cluster with S3, from an empty machine"
SMALLER = ["tiny.hidden_size=64", "tiny.num_layers=2", "tiny.num_heads=4", "tiny.num_kv_heads=4",
           "tiny.intermediate_size=128", "tiny.vocab_size=800", "tiny.pretrain_steps=40",
           "base.optim.epochs=1", "base.max_samples=120", "base.num_workers=1"]
CONFIGS = ("cluster/runtime_env.yaml", "cluster/serve-local.yaml")
TIMEOUT_S = 1800  # the whole section; about 6 min on an idle 2-core machine


def _section_text() -> str:
    blocks = [b for b in bash_blocks(DOC) if b.heading == SECTION]
    assert len(blocks) >= 8, [b.line for b in blocks]
    return "\n".join(b.text for b in blocks)


class Places:
    """This run's ports and scratch paths in place of the section's."""

    def __init__(self, tmp: Path, state_dir: str):
        self.tmp, self.state_dir = tmp, state_dir
        self.s3, self.dashboard, self.gcs, self.serve = (_free_port() for _ in range(4))
        self.port_base = _free_port_range(600)

    def substitute(self, text: str) -> str:
        table = [("-p 5000", f"-p {self.s3}"), ("127.0.0.1:5000", f"127.0.0.1:{self.s3}"),
                 ("127.0.0.1:8265", f"127.0.0.1:{self.dashboard}"),
                 ("localhost:8000", f"localhost:{self.serve}"), ("port: 8000", f"port: {self.serve}"),
                 ("/tmp/oppu-local-cluster", self.state_dir), ("/tmp/moto.log", str(self.tmp / "moto.log")),
                 ("/tmp/lamp2m", str(self.tmp / "lamp2m")), ("/tmp/oppu-run", str(self.tmp / "oppu-run")),
                 *[(name, str(self.tmp / Path(name).name)) for name in CONFIGS]]
        for old, new in table:
            text = text.replace(old, new)
        return text

    def script(self) -> str:
        text = _section_text()
        for needed in ("git clone <this repo> oppu && cd oppu\n", "cluster/local-up.sh ", "cluster/local-down.sh ",
                       "-p 5000", "127.0.0.1:5000", "127.0.0.1:8265", "localhost:8000", *CONFIGS):
            assert needed in text, f"the section no longer has {needed!r}: update this test"
        smaller = " ".join(f"--set {item}" for item in SMALLER)
        assert smaller in " ".join(DOC.read_text().split()), "the section shows other smaller sizes"
        text = text.replace("git clone <this repo> oppu && cd oppu\n", "")
        text = self.substitute(text)
        text = text.replace("cluster/local-up.sh ", "cluster/local-up.sh " + " ".join(
            f"--set {key}={value}" for key, value in [("state_dir", self.state_dir), ("gcs_port", self.gcs),
                                                      ("dashboard_port", self.dashboard),
                                                      ("port_base", self.port_base)]) + " ")
        text = text.replace("cluster/local-down.sh ", f"cluster/local-down.sh --state-dir {self.state_dir} ")
        lines = text.split("\n")
        end = next(i for i, line in enumerate(lines) if "jobs/train_base.py" in line)
        while lines[end].endswith("\\"):  # the train_base command's last line
            end += 1
        lines[end] = f"{lines[end]} {smaller}"
        for name in CONFIGS:
            (self.tmp / Path(name).name).write_text(self.substitute((ROOT / name).read_text()))
        script = "\n".join(lines)
        for default in ("127.0.0.1:5000", "-p 5000", ":8265", ":8000", "port: 8000", "/tmp/oppu-local-cluster"):
            for text in (script, *[(self.tmp / Path(n).name).read_text() for n in CONFIGS]):
                assert not re.search(re.escape(default) + r"(?![\w-])", text), \
                    f"{default} left in place: another cluster may hold it"
        return script


def _stop_what_is_left(places: Places, bash: subprocess.Popen, failure: str | None) -> list[str]:
    """After a failure: the cluster this run recorded and the bash's own jobs (moto); returns what
    had to be stopped (on success the section's teardown stopped both)."""
    from cluster.local_cluster import LocalCluster

    left = []
    if not failure:
        return left
    if (Path(places.state_dir) / "cluster.json").exists():
        left.append(f"cluster: {LocalCluster.attach(places.state_dir).stop()}")
    try:
        os.killpg(bash.pid, signal.SIGKILL)
        left.append("bash session")
    except ProcessLookupError:
        pass
    return left


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    """§1 run by bash: (stdout, stderr, seconds, places)."""
    tmp = tmp_path_factory.mktemp("walkthrough")
    state_dir = tempfile.mkdtemp(prefix="oppu-lc-", dir="/tmp")  # short: Ray's socket paths live under it
    places = Places(tmp, state_dir)
    ran = run_traced(places.script(), name="section1", what="docs/cluster.md §1", cwd=ROOT,
                     env=shell_env(bin_dir(tmp / "bin")), tmp=tmp, timeout_s=TIMEOUT_S,
                     stop=lambda bash, failure: _stop_what_is_left(places, bash, failure),
                     logs=f"Ray's logs in {state_dir}")
    yield ran.out, ran.err, ran.seconds, places
    shutil.rmtree(state_dir, ignore_errors=True)


def test_section_1_runs_as_written_from_cluster_up_to_teardown(walkthrough):
    out, err, seconds, places = walkthrough
    assert "Autoscaler status" in out and "Active:" in out, out[:3000]  # ray status (it may not list
    # a worker that joined a second before; the jobs below see all three nodes)
    assert [line.split()[1] for line in out.splitlines() if line.startswith("published ")] == [
        "data/", "pretrained/", "base/", "base-rag/"]
    train_users, evaluate = job_outputs(out)
    for job in (train_users, evaluate):
        connected = re.search(r"\[ray\] connected: (\{.*\})", job)
        resources = ast.literal_eval(connected[1])  # the cluster's resources, as the job printed them
        assert resources["CPU"] == 2.0 and resources["node_a"] == resources["node_b"] == 1.0, resources
    for variant in ("oppu", "rag-k1+oppu"):
        assert f"[train_users {variant}] trained 6, skipped 0, failed 0" in train_users, train_users[-3000:]
    assert "| oppu |" in evaluate and "| rag-k1+oppu |" in evaluate, evaluate[-3000:]
    answer, _ = json.JSONDecoder().raw_decode(out[out.index('{"id"'):])
    assert answer["model"].startswith("base:user") and len(answer["choices"]) == 1, answer
    assert 0 < answer["usage"]["completion_tokens"] <= 8, answer
    assert "local Ray cluster in" in out and "stopped" in out  # local-down.sh
    assert not (Path(places.state_dir) / "cluster.json").exists()
    print(f"§1: {seconds:.0f}s; the completion: {answer['choices'][0]['text']!r}")


def test_the_jobs_output_is_the_projects_own(walkthrough):
    """The jobs' output holds their progress and results, not Ray's notices (issue 20, item 4)."""
    out, err, _, _ = walkthrough
    for job in job_outputs(out):
        assert "[ray] connected" in job
        for noise in (NOTICE, "Loading weights", "Starting execution of Dataset"):
            assert noise not in job, noise
    assert NOTICE not in out + err


def _train_users_argv(bucket: str) -> list[str]:
    """The arguments of §1's `ray job submit ... jobs/train_users.py`, the bucket replaced."""
    section = [c for b in bash_blocks(DOC) if b.heading == SECTION for c in commands(b)]
    argv = next(c.argv for c in section if "jobs/train_users.py" in c.argv)
    return [a.replace("s3://oppu/", f"s3://{bucket}/") for a in argv[argv.index("jobs/train_users.py") + 1:]]


def test_the_train_users_job_without_base_rag_fails_in_one_line(s3_server, tmp_path):
    """§1's train_users command against a run dir whose ``base-rag`` was never published."""
    from oppu import cli, fsutil

    bucket = s3_server["bucket"]
    run_uri = f"s3://{bucket}/runs/quickstart"
    assert cli.main(["synth", "--task", "LaMP-2M", "--users", "24", "--n-test", "6", "--seed", "0",
                     "--out", str(tmp_path / "lamp2m")]) == 0
    assert cli.main(["prepare", "--task", "LaMP-2M", "--questions", str(tmp_path / "lamp2m" / "questions.json"),
                     "--outputs", str(tmp_path / "lamp2m" / "outputs.json"), "--n-test", "6",
                     "--out", str(tmp_path / "data")]) == 0
    fsutil.publish_dir(tmp_path / "data", f"{run_uri}/data")
    fsutil.write_text(f"{run_uri}/base/config.json", "{}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    started = time.monotonic()
    job = subprocess.run([sys.executable, "jobs/train_users.py", *_train_users_argv(bucket)], cwd=ROOT,
                         env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - started
    assert job.returncode == 2, job.stdout[-2000:] + job.stderr[-2000:]
    assert job.stderr.count("\n") == 1 and "Traceback" not in job.stderr + job.stdout
    assert job.stderr.startswith("error: train_users cannot start, missing input: the 'rag' base "
                                 f"(for variant rag-k1+oppu) at {run_uri}/base-rag")
    assert f"oppu publish --run LOCAL --to {run_uri}" in job.stderr
    assert "[ray] connected" not in job.stdout  # failed before Ray started
    assert seconds < 60, seconds


def _readme_block(heading: str):
    (block,) = [b for b in bash_blocks(ROOT / "README.md") if b.heading == heading]
    return block


def _fixture_lamp_files(directory: Path) -> None:
    """The files README's "Using real LaMP files" block names, made from the synthetic generator:
    LaMP-2M dev questions/outputs of 102 users (prepare's default --n-test is 100), LaMP-3 in the
    OPPU authors' per-user format, and an oppu.json of predictions (the golds, so accuracy 1)."""
    import json
    import shutil

    from oppu import cli

    assert cli.main(["synth", "--task", "LaMP-2M", "--users", "102", "--n-test", "100", "--seed", "2",
                     "--out", str(directory / "synth-2m")]) == 0
    shutil.copy(directory / "synth-2m" / "questions.json", directory / "dev_questions.json")
    shutil.copy(directory / "synth-2m" / "outputs.json", directory / "dev_outputs.json")
    assert cli.main(["synth", "--task", "LaMP-3", "--users", "104", "--n-test", "100", "--seed", "2",
                     "--out", str(directory / "synth-3")]) == 0
    questions = json.loads((directory / "synth-3" / "questions.json").read_text())
    golds = {g["id"]: g["output"] for g in json.loads((directory / "synth-3" / "outputs.json").read_text())["golds"]}
    users: dict[str, dict] = {}
    for q in questions:  # a user's last query sees its whole history
        user = users.setdefault(q["user_id"], {"user_id": q["user_id"], "profile": [], "query": []})
        user["query"].append({"id": q["id"], "input": q["input"], "gold": golds[q["id"]]})
        if len(q["profile"]) >= len(user["profile"]):
            user["profile"] = q["profile"]
    ordered = list(users.values())
    (directory / "user_top_100_history.json").write_text(json.dumps(ordered[:100]))
    (directory / "user_others.json").write_text(json.dumps(ordered[100:]))
    (directory / "runs" / "2m" / "predictions").mkdir(parents=True)
    shutil.copy(directory / "dev_outputs.json", directory / "runs" / "2m" / "predictions" / "oppu.json")


def test_readme_real_lamp_files_block_runs_on_fixture_files(tmp_path):
    """README "Using real LaMP files", as written, in a directory holding the files it names."""
    import json

    _fixture_lamp_files(tmp_path)
    script = "\n".join(['set -euo pipefail', 'oppu() { "$PY" -m oppu.cli "$@"; }',
                        _readme_block("Using real LaMP files").text])
    run = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "PY": sys.executable})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for name, n_users in (("2m", 102), ("3", 104)):
        meta = json.loads((tmp_path / "runs" / name / "data" / "dataset.json").read_text())
        assert meta["n_users"] == n_users
    scores = json.loads(run.stdout.strip().splitlines()[-1])  # `oppu score` prints one JSON line
    assert scores["accuracy"] == 1.0 and scores["f1"] == 1.0, run.stdout
