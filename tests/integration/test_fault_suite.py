"""The fault and abuse suite: bad inputs of every kind and injected faults, against the real things
(the Ray Serve app over HTTP with two model replicas, ``oppu prepare``, the adapter store and its
publisher), with one summary table.

    python3 -m pytest -q -s tests/integration/test_fault_suite.py     # prints the table at the end

Each row counts what was tried, how many were handled as promised (a 4xx in OpenAI's error shape
naming the field; exit status 2 naming the record or field; the adapter refused for its own request
only), the requests lost (answered other than as promised, or not at all) and the adapters lost or
corrupted (another user's answer changed, or a published version missing or broken). The test
fails on any loss. ``OPPU_FAULT_TABLE=FILE`` also writes the table to FILE (the README's copy).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.unit.data.fixtures.lamp_files import movie_questions, write_lamp
from tests.unit.serving.tiny_setup import (
    build_tiny_base,
    lamp2m_users,
    make_user_adapter,
    peft_greedy,
    publish_adapter,
    reseeded_adapter,
)

pytestmark = pytest.mark.integration

TASK = "LaMP-2M"
ADMIN = "fault-suite-admin"
PROMPT = "the robot walks"
GOOD = [f"good{i:02d}" for i in range(12)]


@dataclass
class Row:
    kind: str
    tried: int = 0
    handled: int = 0
    requests_lost: int = 0
    adapters_lost: int = 0
    notes: list[str] = field(default_factory=list)

    def record(self, handled: bool, note: str = "", lost: int = 0) -> None:
        self.tried += 1
        self.handled += handled
        self.requests_lost += lost if lost else (0 if handled else 1)
        if not handled and note:
            self.notes.append(note)


TABLE: dict[str, Row] = {}


def row(kind: str) -> Row:
    return TABLE.setdefault(kind, Row(kind))


@pytest.fixture(scope="module", autouse=True)
def summary():
    yield
    lines = ["| what | tried | handled | requests lost | adapters lost or corrupted |",
             "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r.kind} | {r.tried} | {r.handled} | {r.requests_lost} | {r.adapters_lost} |"
              for r in TABLE.values()]
    inputs = sum(r.tried for k, r in TABLE.items() if k.startswith("bad "))
    faults = sum(1 for k in TABLE if not k.startswith("bad "))
    lines.append(f"\n{inputs} bad inputs, {faults} fault kinds.")
    text = "\n".join(lines)
    print("\n" + text)
    for r in TABLE.values():
        for note in r.notes:
            print(f"  {r.kind}: {note}")
    if os.environ.get("OPPU_FAULT_TABLE"):
        Path(os.environ["OPPU_FAULT_TABLE"]).write_text(text + "\n")


# -- bad LaMP records through `oppu prepare` ----------------------------------------------------------

BAD_RECORDS = [  # (what, how the questions/golds are broken, what the message must name)
    ("profile item without its tag", lambda q, g: q[0]["profile"][1].pop("tag"), "profile[1].tag"),
    ("input not a string", lambda q, g: q[0].update(input=42), "input"),
    ("input without the task's marker", lambda q, g: q[0].update(input="tell me a tag"), "input"),
    ("description not a string", lambda q, g: q[0]["profile"][0].update(description=["x"]), "description"),
    ("date that is no date", lambda q, g: q[0]["profile"][0].update(date="someday"), "date"),
    ("profile not a list", lambda q, g: q[0].update(profile={"m1": {}}), "profile"),
    ("duplicate question id", lambda q, g: q[1].update(id="101"), "id"),
    ("user id with a path in it", lambda q, g: q[0].update(user_id="../etc"), "user_id"),
    ("one item id, two contents", lambda q, g: q[0]["profile"][0].update(tag="horror"), "profile"),
    ("question without an id", lambda q, g: q[0].pop("id"), "id"),
    ("question without input", lambda q, g: q[0].pop("input"), "input"),
    ("question without a gold", lambda q, g: g.pop("101"), "101"),
    ("gold without a question", lambda q, g: g.update({"999": "comedy"}), "999"),
    ("question that is not an object", lambda q, g: q.__setitem__(0, "101"), "questions.json"),
    ("profile item that is not an object", lambda q, g: q[0]["profile"].__setitem__(0, 7), "profile[0]"),
    ("profile item without an id", lambda q, g: q[0]["profile"][0].pop("id"), "profile[0]"),
]


@pytest.mark.parametrize(("what", "break_it", "named"), BAD_RECORDS, ids=[r[0] for r in BAD_RECORDS])
def test_bad_lamp_records_are_refused_naming_record_and_field(tmp_path, what, break_it, named):
    from oppu import cli

    questions, golds = movie_questions()
    break_it(questions, golds)
    questions_path, outputs_path = write_lamp(tmp_path, questions, golds, "LaMP_2M")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        status = cli.main(["prepare", "--task", TASK, "--questions", str(questions_path),
                           "--outputs", str(outputs_path), "--n-test", "1", "--out", str(tmp_path / "data")])
    handled = status == 2 and named in stderr.getvalue() and not (tmp_path / "data" / "users.parquet").exists()
    row("bad LaMP records (oppu prepare)").record(handled, f"{what}: exit {status}: {stderr.getvalue()[:200]}")
    assert handled, stderr.getvalue()


def test_malformed_lamp_files_are_refused(tmp_path):
    from oppu import cli

    cases = {"not JSON": "{nope", "empty file": "", "a number": "7", "outputs of another task": None}
    for what, text in cases.items():
        questions, golds = movie_questions()
        questions_path, outputs_path = write_lamp(tmp_path, questions, golds,
                                                  "LaMP_3" if text is None else "LaMP_2M")
        if text is not None:
            questions_path.write_text(text)
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            status = cli.main(["prepare", "--task", TASK, "--questions", str(questions_path),
                               "--outputs", str(outputs_path), "--n-test", "1", "--out", str(tmp_path / "d")])
        handled = status == 2 and ("questions.json" in stderr.getvalue() or "outputs.json" in stderr.getvalue())
        row("bad LaMP records (oppu prepare)").record(handled, f"{what}: exit {status}")
        assert handled, (what, stderr.getvalue())


# -- the serve app -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app with two model replicas over a local store: good users, users with bad adapters."""
    import ray
    from ray import serve

    from oppu.data.dataset import write_dataset
    from oppu.models import base_fingerprint
    from oppu.store import AdapterStore, TokenStore
    from serve_apps.oppu_serve import build

    root = tmp_path_factory.mktemp("faults")
    base = build_tiny_base(root / "base")
    fingerprint = base_fingerprint(base)
    store_uri = str(root / "store")
    store, tokens = AdapterStore(store_uri), TokenStore(store_uri)
    template = make_user_adapter(base, root / "template", seed=0)
    adapters = {user: reseeded_adapter(template, root / user, seed=i) for i, user in enumerate(GOOD)}
    for user, adapter_dir in adapters.items():
        publish_adapter(store, TASK, fingerprint, user, adapter_dir)
    user_tokens = {user: tokens.create(user) for user in [*GOOD, "nobody"]}
    data_dir = write_dataset(root / "data", TASK, lamp2m_users(GOOD[:2]), meta={})
    os.environ["OPPU_ADMIN_TOKEN"] = ADMIN
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OPPU_ADMIN_TOKEN": ADMIN}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build({"model": str(base), "store": store_uri, "data": str(data_dir), "num_replicas": "2",
                     "gpu_slots": "8", "host_cache_adapters": "8", "max_batch_size": "8", "adapter_check_ttl_s": "0.5",
                     "max_prompt_tokens": "256", "max_tokens_limit": "16", "default_max_tokens": "6",
                     "max_body_bytes": "16384", "num_cpus_per_replica": "1"}), name="oppu", route_prefix="/")
    expected = {user: peft_greedy(base, adapters[user], [PROMPT], 6)[0] for user in GOOD}
    try:
        yield {"url": f"http://127.0.0.1:{port}", "base": base, "root": root, "store": store, "tokens": user_tokens,
               "fingerprint": fingerprint, "template": template, "expected": expected}
    finally:
        serve.shutdown()
        ray.shutdown()


def _auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def _completion(user: str | None, **options) -> dict:
    return {"model": "base" if user is None else f"base:{user}", "prompt": PROMPT, "max_tokens": 6,
            "temperature": 0} | options


async def _send(url: str, requests: list[tuple[str, str, dict | bytes | None, dict]]) -> list:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        async def one(method, path, body, headers):
            try:
                if isinstance(body, bytes):
                    return await client.request(method, path, content=body, headers=headers)
                return await client.request(method, path, json=body, headers=headers)
            except httpx.HTTPError as exc:
                return exc
        return await asyncio.gather(*(one(*request) for request in requests))


def _good_answers_hold(app, users=GOOD[:4]) -> int:
    """Other users' answers after a fault: how many changed or failed (adapters lost or corrupted)."""
    requests = [("POST", "/v1/completions", _completion(u), _auth(app["tokens"][u])) for u in users]
    answers = asyncio.run(_send(app["url"], requests))
    return sum(not (getattr(a, "status_code", None) == 200 and a.json()["choices"][0]["text"] == app["expected"][u])
               for a, u in zip(answers, users, strict=True))


def test_bad_http_bodies_get_openai_errors_naming_the_field(app):
    tokens = app["tokens"]
    me, mine = _auth(tokens["good00"]), "good00"
    cases = [  # (method, path, body, headers, statuses allowed)
        ("POST", "/v1/completions", _completion(mine), {}, {401}),
        ("POST", "/v1/completions", _completion(mine), _auth("oppu_forged"), {401}),
        ("POST", "/v1/completions", _completion("good01"), me, {403}),
        ("POST", "/v1/completions", _completion("../../etc"), me, {400}),
        ("POST", "/v1/completions", _completion("a" * 200), me, {400}),
        ("POST", "/v1/completions", _completion(mine, max_tokens=10_000), me, {400}),
        ("POST", "/v1/completions", _completion(mine, max_tokens=-1), me, {400}),
        ("POST", "/v1/completions", _completion(mine, n=0), me, {400}),
        ("POST", "/v1/completions", _completion(mine, temperature=-1), me, {400}),
        ("POST", "/v1/completions", _completion(mine, top_p=2), me, {400}),
        ("POST", "/v1/completions", _completion(mine, presence_penalty=9), me, {400}),
        ("POST", "/v1/completions", _completion(mine, stop=7), me, {400}),
        ("POST", "/v1/completions", _completion(mine, logprobs=99), me, {400}),
        ("POST", "/v1/completions", _completion(mine, seed="x"), me, {400}),
        ("POST", "/v1/completions", _completion(mine, stream="yes"), me, {400}),
        ("POST", "/v1/completions", _completion(mine, echo=True), me, {400}),
        ("POST", "/v1/completions", _completion(mine, frobnicate=1), me, {400}),
        ("POST", "/v1/completions", _completion(mine, prompt="robot " * 400), me, {400}),
        ("POST", "/v1/completions", {"prompt": "x"}, me, {400}),
        ("POST", "/v1/completions", {"model": "other:good00", "prompt": "x"}, me, {404}),
        ("POST", "/v1/completions", _completion("nobody"), _auth(tokens["nobody"]), {404}),
        ("POST", "/v1/completions", b"{nope", me | {"Content-Type": "application/json"}, {400}),
        ("POST", "/v1/completions", b"", me | {"Content-Type": "application/json"}, {400}),
        ("POST", "/v1/completions", b"x" * 20_000, me | {"Content-Type": "application/json"}, {413}),
        ("POST", "/v1/completions", b"[1, 2]", me | {"Content-Type": "application/json"}, {400}),
        ("POST", "/v1/chat/completions", {"model": f"base:{mine}", "messages": []}, me, {400}),
        ("POST", "/v1/chat/completions", {"model": f"base:{mine}", "messages": "hi"}, me, {400}),
        ("POST", "/v1/chat/completions", {"model": f"base:{mine}", "messages": [{"role": "wizard", "content": "x"}]},
         me, {400}),
        ("POST", "/v1/chat/completions", {"model": f"base:{mine}", "messages": [{"role": "user", "content": "x"}],
                                          "tools": [{"type": "function", "function": {"name": "f"}}]}, me, {400}),
        ("POST", "/v1/predict", {"task": TASK, "user": mine, "input": "not a LaMP question"}, me, {400}),
        ("POST", "/v1/predict", {"task": "LaMP-9", "user": mine, "input": "x"}, me, {400}),
        ("POST", "/v1/predict", {"task": TASK, "user": mine, "input": "x", "k": -3}, me, {400}),
        ("GET", "/v1/models/base:good01", None, me, {403, 404}),
        ("GET", "/v1/nothing-here", None, me, {404}),
        ("GET", "/v1/completions", None, me, {405}),
        ("DELETE", "/v1/users/good01/adapter", None, me, {403}),
        ("DELETE", "/v1/users/good01", None, me, {403}),
        ("DELETE", "/v1/users/..%2Fetc", None, _auth(ADMIN), {400, 404}),
    ]
    answers = asyncio.run(_send(app["url"], [(m, p, b, h) for m, p, b, h, _ in cases]))
    bodies = row("bad HTTP bodies")
    for (method, path, body, _, allowed), answer in zip(cases, answers, strict=True):
        status = getattr(answer, "status_code", None)
        shaped = status is not None and set(_error_of(answer)) == {"message", "type", "param", "code"}
        bodies.record(status in allowed and shaped, f"{method} {path} {str(body)[:80]}: {status} "
                                                     f"{getattr(answer, 'text', answer)!s:.200}")
    assert _good_answers_hold(app) == 0  # the replicas are fine after all that
    assert bodies.handled == bodies.tried, bodies.notes


def _error_of(answer) -> dict:
    try:
        error = answer.json().get("error")
    except ValueError:  # not JSON at all
        return {}
    return error if isinstance(error, dict) else {}


def _publish_bad(app, user: str, adapter_dir: Path, tamper=None) -> None:
    version = publish_adapter(app["store"], TASK, app["fingerprint"], user, adapter_dir).version
    if tamper is not None:
        tamper(Path(app["store"].root_uri) / TASK / app["fingerprint"] / "oppu" / user / version)
    app["tokens"][user] = __import__("oppu.store", fromlist=["TokenStore"]).TokenStore(
        app["store"].root_uri).create(user)


def test_bad_adapters_fail_only_their_own_requests(app):
    import torch
    from safetensors.torch import load_file, save_file

    root, template = app["root"], app["template"]

    def nan_weights(out: Path) -> Path:
        path = reseeded_adapter(template, out, seed=77)
        tensors = load_file(path / "adapter_model.safetensors")
        save_file({k: torch.full_like(v, float("nan")) for k, v in tensors.items()}, path / "adapter_model.safetensors")
        return path

    def config_edit(out: Path, **changes) -> Path:
        path = reseeded_adapter(template, out, seed=78)
        config = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps(config | changes))
        return path

    bad = {  # user -> (adapter dir, tamper after publishing)
        "bad-bytes": (reseeded_adapter(template, root / "bad-bytes", seed=70),
                      lambda v: (v / "adapter_model.safetensors").write_bytes(b"not safetensors")),
        "bad-config": (reseeded_adapter(template, root / "bad-config", seed=71),
                       lambda v: (v / "adapter_config.json").write_text("{nope")),
        "bad-rank": (make_user_adapter(app["base"], root / "bad-rank", seed=72, rank=32, alpha=32), None),
        "bad-targets": (make_user_adapter(app["base"], root / "bad-targets", seed=73,
                                          target_modules=("q_proj", "lm_head")), None),
        "bad-nan": (nan_weights(root / "bad-nan"), None),
        "bad-method": (config_edit(root / "bad-method", peft_type="IA3"), None),
    }
    adapters = row("bad adapters")
    for user, (adapter_dir, tamper) in bad.items():
        try:
            _publish_bad(app, user, adapter_dir, tamper)
        except Exception:  # refused at publish: handled before any request
            adapters.record(True)
            continue
        answer = asyncio.run(_send(app["url"], [("POST", "/v1/completions", _completion(user),
                                                 _auth(app["tokens"][user]))]))[0]
        status = getattr(answer, "status_code", None)
        changed = _good_answers_hold(app)
        adapters.adapters_lost += changed
        adapters.record(status in (404, 422) and changed == 0, f"{user}: {status} {getattr(answer, 'text', '')[:200]}")
    assert adapters.handled == adapters.tried and adapters.adapters_lost == 0, adapters.notes


# -- injected faults ----------------------------------------------------------------------------------


def _load(app, users, rounds: int = 3) -> list:
    requests = [("POST", "/v1/completions", _completion(u), _auth(app["tokens"][u])) for u in users] * rounds
    return asyncio.run(_send(app["url"], requests))


def _lost(answers, users_rounds, app) -> int:
    return sum(not (getattr(a, "status_code", None) == 200 and a.json()["choices"][0]["text"] == app["expected"][u])
               for a, u in zip(answers, users_rounds, strict=True))


def test_killing_the_deletion_log_under_load(app):
    import threading

    import ray

    users = GOOD[:8]
    killer = threading.Timer(0.3, lambda: ray.kill(ray.get_actor("adapter_events_oppu", namespace="oppu_serve")))
    killer.start()
    answers = _load(app, users)
    killer.join()
    fault = row("deletion-log actor killed under load")
    lost = _lost(answers, users * 3, app)
    fault.record(lost == 0, f"{lost} requests failed", lost=lost)
    fault.adapters_lost += _good_answers_hold(app)
    assert lost == 0


def test_killing_a_model_replica_under_load(app):
    import threading

    from ray import serve

    users = GOOD[:8]
    replicas = serve.status().applications["oppu"].deployments["model"].replica_states
    assert replicas.get("RUNNING", 0) == 2

    def model_replicas() -> set[str]:
        import ray

        return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if "model" in a["name"] and a["namespace"] == "serve"}

    before = model_replicas()

    def kill_one():
        import ray

        ray.kill(ray.get_actor(sorted(before)[0], namespace="serve"), no_restart=True)

    killer = threading.Timer(0.3, kill_one)
    killer.start()
    answers = _load(app, users, rounds=4)
    killer.join()
    lost = _lost(answers, users * 4, app)
    fault = row("model replica killed under load")
    fault.record(lost == 0, f"{lost} of {len(answers)} requests failed while a replica died", lost=lost)
    deadline = time.monotonic() + 60
    while serve.status().applications["oppu"].deployments["model"].replica_states.get("RUNNING", 0) < 2:
        assert time.monotonic() < deadline, "the replica was not replaced"
        time.sleep(1)
    assert model_replicas() != before  # one was killed and replaced
    fault.adapters_lost += _good_answers_hold(app)
    assert lost == 0 and fault.adapters_lost == 0


def test_a_delete_racing_a_publish_ends_with_nothing_served(app, tmp_path, monkeypatch):
    from oppu.data.records import UserData
    from oppu.erasure import add_tombstone
    from oppu.errors import UserErasedError
    from oppu.run_config import RunConfig
    from oppu.training.personal import TrainStats
    from oppu.training.publish import AdapterPublisher

    cfg = RunConfig(task=TASK, run_dir=str(tmp_path), store=app["store"].root_uri)
    publisher = AdapterPublisher.for_run(cfg, "oppu", app["fingerprint"], "plain")
    original = publisher.store.publish

    def publish_then_deleted(*args, **kwargs):
        manifest = original(*args, **kwargs)
        add_tombstone(app["store"].root_uri, "racer")
        return manifest

    monkeypatch.setattr(publisher.store, "publish", publish_then_deleted)
    fault = row("delete during a publish")
    with pytest.raises(UserErasedError):
        publisher.publish(UserData("racer", "test", [], []),
                          reseeded_adapter(app["template"], tmp_path / "racer", seed=5),
                          TrainStats(samples=1, epochs=1, steps=1))
    app["tokens"]["racer"] = __import__("oppu.store", fromlist=["TokenStore"]).TokenStore(
        app["store"].root_uri).create("racer")
    answer = asyncio.run(_send(app["url"], [("POST", "/v1/completions", _completion("racer"),
                                             _auth(app["tokens"]["racer"]))]))[0]
    fault.record(answer.status_code == 404, f"racer answered {answer.status_code}")
    fault.adapters_lost += _good_answers_hold(app)
    assert answer.status_code == 404 and fault.adapters_lost == 0


def test_a_diverging_user_in_a_batched_pass_fails_alone():
    """A user whose loss goes NaN mid-pass is failed and unpublished; the users sharing its passes
    come out as if it had not been there (the batched-vs-alone tolerance of test_batched.py)."""
    import copy

    import torch

    from oppu.training.batched import train_users_batched
    from tests.unit.tiny_models import tiny_llama
    from tests.unit.training.test_batched import HPARAMS, LORA, SEED, USERS, VOCAB, user_samples

    base = tiny_llama(VOCAB, intermediate_size=48).train()
    poisoned = 2  # a token no other user's samples hold; its embedding is made NaN
    with torch.no_grad():
        base.get_input_embeddings().weight[poisoned] = float("nan")
    bad = user_samples(6, 9)
    bad[0] = {"input_ids": [poisoned] + bad[0]["input_ids"], "labels": [-100] + bad[0]["labels"]}
    failed = []
    together = train_users_batched(copy.deepcopy(base), None, [("bad", bad), *USERS.items()], LORA, HPARAMS, SEED,
                                   max_active_users=4, tokens_per_forward=96,
                                   on_user_failed=lambda user, error: failed.append(user))
    changed = 0
    for user, samples in USERS.items():
        alone = train_users_batched(copy.deepcopy(base), None, [(user, samples)], LORA, HPARAMS, SEED,
                                    tokens_per_forward=96)[user]
        changed += not all(torch.allclose(together[user][k], alone[k], rtol=1e-4, atol=2e-6) for k in alone)
    fault = row("a user diverging (NaN) in a batched pass")
    fault.adapters_lost += changed
    fault.record(failed == ["bad"] and "bad" not in together and changed == 0, f"failed {failed}, changed {changed}")
    assert failed == ["bad"] and "bad" not in together and changed == 0


def test_gc_during_a_slow_publish_and_a_corrupt_newest_manifest(app, tmp_path):
    """A gc with no grace period runs in the middle of a publish; then the newest version's
    manifest is corrupted. The served answer is the complete version each time: the new one after
    the publish, the one before it once the newest manifest is broken."""
    from oppu.store import AdapterStore
    from oppu.store.manifest import MANIFEST_NAME

    store_uri, fingerprint = app["store"].root_uri, app["fingerprint"]
    user = "good05"
    publisher, collector = AdapterStore(store_uri), AdapterStore(store_uri)
    removed: list[int] = []
    real = publisher._fs.pipe_file

    def pipe_file(path, data, **kwargs):
        real(path, data, **kwargs)
        if path.endswith("/adapter_config.json"):  # half-way through the publish
            removed.append(collector.gc_incomplete(older_than_s=-1))

    publisher._fs.pipe_file = pipe_file
    newer = reseeded_adapter(app["template"], tmp_path / "newer", seed=500)
    manifest = publish_adapter(publisher, TASK, fingerprint, user, newer)
    expected_new = peft_greedy(app["base"], newer, [PROMPT], 6)[0]
    time.sleep(0.6)  # the app's adapter_check_ttl_s
    request = [("POST", "/v1/completions", _completion(user), _auth(app["tokens"][user]))]
    served = asyncio.run(_send(app["url"], request))[0]
    gc_fault = row("gc during a publish")
    ok = removed == [0] and served.status_code == 200 and served.json()["choices"][0]["text"] == expected_new
    gc_fault.record(ok, f"gc removed {removed}; served {served.status_code} {served.text[:120]}")
    gc_fault.adapters_lost += _good_answers_hold(app)

    version_dir = Path(store_uri) / TASK / fingerprint / "oppu" / user / manifest.version
    (version_dir / MANIFEST_NAME).write_text("{oops")
    time.sleep(0.6)
    served = asyncio.run(_send(app["url"], request))[0]
    corrupt = row("corrupt newest manifest")
    ok_corrupt = served.status_code == 200 and served.json()["choices"][0]["text"] == app["expected"][user]
    corrupt.record(ok_corrupt, f"served {served.status_code} {served.text[:120]}")
    corrupt.adapters_lost += _good_answers_hold(app)
    assert ok and ok_corrupt and gc_fault.adapters_lost == corrupt.adapters_lost == 0


KILLED_PUBLISHER = """
import sys, time
from pathlib import Path
from oppu.store import AdapterStore
from tests.unit.serving.tiny_setup import publish_adapter
store = AdapterStore(sys.argv[1])
real = store._fs.pipe_file
def pipe_file(path, data, **kwargs):
    real(path, data, **kwargs)
    if path.endswith("/adapter_config.json"):
        print("half-way", flush=True)
        time.sleep(60)  # killed here, its version half written
store._fs.pipe_file = pipe_file
publish_adapter(store, sys.argv[2], sys.argv[3], sys.argv[4], Path(sys.argv[5]))
"""


def test_a_trainer_killed_mid_publish(app, tmp_path):
    """The process publishing a user's new version is killed half-way: the served version stays
    the last complete one, and the next publish goes through."""
    import subprocess
    import sys

    store_uri, fingerprint, user = app["store"].root_uri, app["fingerprint"], "good06"
    newer = reseeded_adapter(app["template"], tmp_path / "newer", seed=600)
    process = subprocess.Popen([sys.executable, "-c", KILLED_PUBLISHER, store_uri, TASK, fingerprint, user,
                                str(newer)], stdout=subprocess.PIPE, text=True,
                               cwd=Path(__file__).resolve().parents[2])
    assert process.stdout.readline().strip() == "half-way"
    process.kill()
    process.wait()
    time.sleep(0.6)  # the app's adapter_check_ttl_s
    request = [("POST", "/v1/completions", _completion(user), _auth(app["tokens"][user]))]
    served = asyncio.run(_send(app["url"], request))[0]
    fault = row("trainer killed mid-publish")
    kept = served.status_code == 200 and served.json()["choices"][0]["text"] == app["expected"][user]
    publish_adapter(app["store"], TASK, fingerprint, user, newer)  # the retried publish
    time.sleep(0.6)
    served = asyncio.run(_send(app["url"], request))[0]
    republished = served.status_code == 200 and served.json()["choices"][0]["text"] == peft_greedy(
        app["base"], newer, [PROMPT], 6)[0]
    fault.record(kept and republished, f"kept {kept}, republished {republished}")
    fault.adapters_lost += _good_answers_hold(app)
    assert kept and republished and fault.adapters_lost == 0
