"""No user id in telemetry: the model replica, driven in-process with a few users (one without an
adapter, one over a limit), exports no user id as a metric label (Serve's own
``serve_registered_multiplexed_model_id`` included) and logs none above DEBUG, nor any prompt text.

Ray is not started: Serve's metric classes are replaced by a recorder that renders Prometheus'
exposition text, and the replica context Serve's multiplexing needs is faked; Serve's own
multiplexing wrapper (``ray.serve.multiplex``) runs as it does in a replica.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import types

import pytest

from oppu.serving.privacy import routing_key, user_ref
from tests.unit.serving.tiny_setup import (
    build_tiny_base,
    make_user_adapter,
    publish_adapter,
    reseeded_adapter,
)

TASK = "LaMP-2M"
USERS = ["alice-q7x", "bob-z3k", "carol-m9p"]
NO_ADAPTER = "dave-w2r"  # has a token in real life, but no adapter: a 404
HISTORY_TEXT = "zebra-secret-history-text"


class _Metric:
    """Stands in for ray.serve.metrics.Counter/Gauge/Histogram: remembers every tagged value."""

    registry: list[_Metric] = []

    def __init__(self, name, description="", tag_keys=(), boundaries=None):
        self.name, self.tag_keys, self.values = name, tuple(tag_keys or ()), {}
        self.default_tags: dict = {}
        _Metric.registry.append(self)

    def set_default_tags(self, tags):
        self.default_tags = dict(tags)

    def _record(self, value, tags=None):
        key = tuple(sorted({**self.default_tags, **(tags or {})}.items()))
        self.values[key] = self.values.get(key, 0) + value

    def inc(self, value=1.0, tags=None):
        self._record(value, tags)

    def observe(self, value, tags=None):
        self._record(value, tags)

    def set(self, value, tags=None):
        self._record(value, tags)


def _exposition() -> str:
    """The recorded series as Prometheus text (``ray_`` prefix, as Ray exports them)."""
    lines = []
    for metric in _Metric.registry:
        for key, value in metric.values.items():
            labels = ",".join(f'{k}="{v}"' for k, v in key)
            lines.append(f"ray_{metric.name}{{{labels}}} {value}")
    return "\n".join(lines)


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def text(self, above: int) -> str:
        formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
        return "\n".join(formatter.format(r) for r in self.records if r.levelno > above)


class _Events:
    class deletions_since:  # noqa: N801 - mirrors the actor method's .remote()
        @staticmethod
        async def remote(seen):
            return 0, []


@pytest.fixture
def replica(tmp_path, monkeypatch):
    import ray.serve
    import ray.serve.metrics
    import ray.serve.multiplex

    from oppu import logs
    from oppu.models import base_fingerprint
    from oppu.store import AdapterStore

    base = build_tiny_base(tmp_path / "base")
    store = AdapterStore(str(tmp_path / "adapters"))
    template = make_user_adapter(base, tmp_path / "template", seed=0)
    for i, user in enumerate(USERS):
        publish_adapter(store, TASK, base_fingerprint(base), user, reseeded_adapter(template, tmp_path / user, seed=i))

    _Metric.registry = []
    for kind in ("Counter", "Gauge", "Histogram"):
        monkeypatch.setattr(ray.serve.metrics, kind, _Metric)
    monkeypatch.setattr(ray.serve, "get_replica_context", lambda: types.SimpleNamespace(app_name="oppu"))
    monkeypatch.setattr(ray.serve.multiplex, "_get_internal_replica_context", lambda: types.SimpleNamespace(
        app_name="oppu", deployment="model", replica_id="model#test"))
    monkeypatch.setattr(ray.serve.multiplex, "_get_global_client", lambda *a, **k: types.SimpleNamespace(
        record_request_routing_info=lambda info: None))
    monkeypatch.setattr("oppu.serving.events.events_actor", lambda app_name: _Events())

    capture = _Capture()
    serve_logger, oppu_logger = logging.getLogger("ray.serve"), logs.logger
    saved = (serve_logger.level, oppu_logger.handlers[:], oppu_logger.propagate, oppu_logger.level)
    serve_logger.addHandler(capture)
    serve_logger.setLevel(logging.DEBUG)
    from oppu.serving.replica import ModelReplica

    config = {"model": str(base), "store": str(tmp_path / "adapters"), "task": TASK, "device": "cpu",
              "gpu_slots": 2, "host_cache_adapters": 4, "max_batch_size": 2, "max_lora_rank": 8,
              "target_modules": ["q_proj", "v_proj"], "max_tokens_limit": 8, "default_max_tokens": 4, "log_level": "DEBUG",
              "routing_buckets": 4}
    switch_interval = sys.getswitchinterval()
    model = ModelReplica(config)
    try:
        yield model, capture
    finally:
        sys.setswitchinterval(switch_interval)  # the replica sets its process's; here that is pytest's
        model.batcher.stop()
        serve_logger.removeHandler(capture)
        serve_logger.setLevel(saved[0])
        oppu_logger.handlers[:], oppu_logger.propagate, oppu_logger.level = saved[1], saved[2], saved[3]


def test_the_replica_shortens_its_interpreter_switch_interval(replica):
    # The scheduler thread gives up the interpreter lock at each torch call; with Python's default
    # 5 ms a busy event loop could keep it that long each time, several times a decode step.
    assert sys.getswitchinterval() == pytest.approx(0.0005)


def test_no_user_id_in_metric_labels_or_logs_above_debug(replica):
    from oppu.errors import AdapterNotFound
    from oppu.serving.replica import GenerateRequest, Refused, RequestTooLarge

    model, capture = replica
    prompt = f"the movie about love {HISTORY_TEXT}"

    async def drive():
        answers = [await model.generate(GenerateRequest(prompt=prompt, user=user, max_tokens=3))
                   for user in [*USERS, USERS[0], None]]
        missing = await model.generate(GenerateRequest(prompt=prompt, user=NO_ADAPTER, max_tokens=3))
        too_long = await model.generate(GenerateRequest(prompt=prompt, user=USERS[1], max_tokens=99))
        stream = [item async for item in model.generate_stream(
            GenerateRequest(prompt=prompt, user=NO_ADAPTER, max_tokens=3))]
        wrapper = getattr(model._adapter_for_routing.__wrapped__, "__serve_multiplex_wrapper", None)
        if wrapper is not None:  # what its pusher thread does every 0.1 s, done now
            wrapper._push_model_ids_info()
            await wrapper.metrics_pusher.graceful_shutdown()
        return answers, missing, too_long, stream

    answers, missing, too_long, stream = asyncio.run(drive())
    assert all(not isinstance(answer, Refused) and answer.completion_tokens > 0 for answer in answers)
    assert isinstance(missing, Refused) and isinstance(missing.error, AdapterNotFound)
    assert isinstance(too_long, Refused) and isinstance(too_long.error, RequestTooLarge)
    assert len(stream) == 1 and isinstance(stream[0], Refused)  # refused before the stream starts

    exposition = _exposition()
    registered = [line for line in exposition.splitlines() if "serve_registered_multiplexed_model_id" in line]
    assert registered, "Serve's multiplexing gauge was not exercised"
    assert {routing_key(user, 4) for user in USERS} == {line.split('model_id="')[1].split('"')[0]
                                                        for line in registered}
    for user in [*USERS, NO_ADAPTER]:
        assert user not in exposition, f"user id {user!r} in a metric label"
        assert user not in capture.text(above=logging.DEBUG), f"user id {user!r} logged above DEBUG"
    assert HISTORY_TEXT not in capture.text(above=logging.NOTSET), "prompt text in the logs"
    # The refusals are in the DEBUG log, under the keyed hash only.
    debug = capture.text(above=logging.NOTSET)
    assert user_ref(NO_ADAPTER) in debug and NO_ADAPTER not in debug


def test_routing_key_is_stable_bounded_and_opaque():
    keys = {routing_key(f"user{i}", 8) for i in range(200)}
    assert keys == {f"rb{i}" for i in range(8)}
    assert routing_key("alice", 8) == routing_key("alice", 8)
    assert "alice" not in user_ref("alice") and user_ref("alice") == user_ref("alice")
    assert user_ref(None) == "base"
