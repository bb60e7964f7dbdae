"""Documented command blocks run by bash as written.

docs/cluster.md §1's data-and-base block (marked ``<!-- doc-test: cluster-data -->``), against a
real S3-protocol server (moto), then the input check of the next block's train_users job on what
it published; and README's "Using real LaMP files" block on fixture files (made by ``oppu synth``,
under the names the block uses, in the directory it runs in).

Substituted, and nothing else: the scratch paths ``/tmp/lamp2m`` and ``/tmp/oppu-run`` (to this
test's temp dir), the bucket ``s3://oppu/`` (to this session's moto bucket), the cluster address
``$(cat /tmp/oppu-local-cluster/address)`` (to nothing: the driver starts a local Ray instead of
joining the 3-node cluster), and the smaller sizes the docs name for slow machines, appended to
the train_base line. ``oppu`` and ``python`` run this checkout with this interpreter.

Not run here: the cluster bring-up, ``ray job submit`` and ``serve deploy`` (they take minutes on
2 cores; tests/integration/test_cluster_e2e.py runs that path), and the teardown.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.docs_blocks import ROOT, bash_blocks, commands

pytestmark = pytest.mark.integration

DOC = ROOT / "docs" / "cluster.md"
SMALLER = ["tiny.hidden_size=64", "tiny.num_layers=2", "tiny.num_heads=4", "tiny.num_kv_heads=4",
           "tiny.intermediate_size=128", "tiny.vocab_size=800", "tiny.pretrain_steps=40",
           "base.optim.epochs=1", "base.max_samples=120", "base.num_workers=1"]


def _block(marker: str):
    (block,) = [b for b in bash_blocks(DOC) if b.marker == marker]
    return block


def _substitute(text: str, tmp: Path, bucket: str) -> str:
    return (text.replace("/tmp/lamp2m", str(tmp / "lamp2m"))
            .replace("/tmp/oppu-run", str(tmp / "oppu-run"))
            .replace("s3://oppu/", f"s3://{bucket}/")
            .replace("$(cat /tmp/oppu-local-cluster/address)", ""))


def _env(s3_server) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(PYTHONPATH=str(ROOT), PY=sys.executable, RAY_USAGE_STATS_ENABLED="0")
    return env


@pytest.fixture(scope="module")
def published(s3_server, tmp_path_factory):
    """Runs the block; returns (bash output, the S3 run dir of the docs, with this bucket)."""
    import boto3

    bucket = s3_server["bucket"]
    tmp = tmp_path_factory.mktemp("walkthrough")
    text = _substitute(_block("cluster-data").text, tmp, bucket)
    smaller = " ".join(f"--set {item}" for item in SMALLER)
    lines = text.split("\n")
    end = next(i for i, line in enumerate(lines) if "jobs/train_base.py" in line)
    while lines[end].endswith("\\"):  # the train_base command's last line
        end += 1
    lines[end] = f"{lines[end]} {smaller}"
    script = "\n".join(['set -euo pipefail', 'oppu() { "$PY" -m oppu.cli "$@"; }',
                        'python() { "$PY" "$@"; }', *lines])
    boto3.client("s3").list_objects_v2(Bucket=bucket)  # the server is up
    started = time.monotonic()
    run = subprocess.run(["bash", "-c", script], cwd=ROOT, env=_env(s3_server), capture_output=True,
                         text=True, timeout=900)
    seconds = time.monotonic() - started
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    print(f"docs/cluster.md cluster-data block: {seconds:.0f}s\n{run.stdout[-3000:]}")
    return run.stdout, f"s3://{bucket}/runs/quickstart"


def _train_users_config(bucket: str):
    """The config of §1's `ray job submit ... jobs/train_users.py` command, as documented."""
    import argparse

    from oppu.config import add_config_arguments, load_config
    from oppu.run_config import RunConfig

    section = [c for b in bash_blocks(DOC) if b.heading.startswith("1.") for c in commands(b)]
    argv = next(c.argv for c in section if "jobs/train_users.py" in c.argv)
    argv = [a.replace("s3://oppu/", f"s3://{bucket}/") for a in argv[argv.index("jobs/train_users.py") + 1:]]
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    return load_config(RunConfig, ROOT / args.config, args.overrides), argv


def test_the_block_publishes_every_input_of_the_train_users_job(published, s3_server):
    from oppu import fsutil
    from oppu.preflight import missing_inputs

    output, run_uri = published
    assert [line.split()[1] for line in output.splitlines() if line.startswith("published ")] == [
        "data/", "pretrained/", "base/", "base-rag/"]
    for name in ("data/dataset.json", "data/users.parquet", "base/config.json", "base-rag/config.json"):
        assert fsutil.exists(f"{run_uri}/{name}"), name
    cfg, _ = _train_users_config(s3_server["bucket"])
    assert cfg.run_dir == run_uri
    assert missing_inputs(cfg, ["users"]) == []
    assert missing_inputs(cfg, ["evaluate"]) == []


def test_the_train_users_job_without_base_rag_fails_in_one_line(published, s3_server):
    from oppu import fsutil

    _, run_uri = published
    fs, path = fsutil.filesystem(f"{run_uri}/base-rag")
    fs.rm(path, recursive=True)
    _, argv = _train_users_config(s3_server["bucket"])
    started = time.monotonic()
    job = subprocess.run([sys.executable, "jobs/train_users.py", *argv], cwd=ROOT, env=_env(s3_server),
                         capture_output=True, text=True, timeout=300)
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
