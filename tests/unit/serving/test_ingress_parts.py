"""The ingress's parts without Ray Serve: calling the model replicas (``model_calls``: routing key,
retry where a replica was lost, refusals as HTTP errors, the event stream) and the per-user routes'
work (``user_routes``: bodies checked, the store's refusals as HTTP errors). The routes themselves
run in tests/integration/test_serve.py."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from ray.exceptions import RayActorError

from oppu.errors import AdapterError, AdapterIntegrityError, AdapterNotFound
from oppu.serving import user_routes
from oppu.serving.model_calls import REPLICA_LOST_RETRIES, ModelCalls
from oppu.serving.openai_api import ApiError
from oppu.serving.replica import ChoiceEnd, Delta, GenerateRequest, GenerateResult, Refused, StreamStart
from oppu.serving.sequences import QueueFull

REQUEST = GenerateRequest(prompt="hi", user="u1", max_tokens=4)
RESULT = GenerateResult(choices=(), prompt_tokens=2, adapter_version="v1")


class FakeMetrics:
    def __init__(self):
        self.errors: list[str] = []

    def error(self, code: str) -> None:
        self.errors.append(code)


class FakeStream:
    """What ``generate_stream.remote`` answers: an async iterator the ingress may cancel."""

    def __init__(self, items):
        self.items, self.cancelled = list(items), False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self):
        self.cancelled = True


class FakeModel:
    """The model deployment's handle: answers (or raises) ``answers`` in turn, recording the routing."""

    def __init__(self, *answers):
        self.answers, self.options_seen = list(answers), []

    def options(self, **options):
        self.options_seen.append(options)
        return self

    @property
    def generate(self):
        return SimpleNamespace(remote=self._next)

    @property
    def generate_stream(self):
        return SimpleNamespace(remote=lambda request: self.answers.pop(0))

    async def _next(self, request):
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


def calls(model) -> tuple[ModelCalls, FakeMetrics]:
    metrics = FakeMetrics()
    return ModelCalls(model, SimpleNamespace(routing_buckets=64, retry_after_s=3), metrics), metrics


def test_a_lost_replica_is_retried_and_the_user_id_never_routes():
    model = FakeModel(RayActorError(), RESULT)
    result = asyncio.run(calls(model)[0].generate(REQUEST))
    assert result is RESULT and len(model.options_seen) == 2
    assert all(o["multiplexed_model_id"] not in ("", "u1") and not o["stream"] for o in model.options_seen)
    base = FakeModel(RESULT)
    asyncio.run(calls(base)[0].generate(GenerateRequest(prompt="hi", user=None, max_tokens=4)))
    assert base.options_seen == [{"multiplexed_model_id": "", "stream": False}]


def test_replicas_lost_past_the_retries_and_refusals_are_http_errors():
    model = FakeModel(*[RayActorError()] * (REPLICA_LOST_RETRIES + 1))
    model_calls, metrics = calls(model)
    with pytest.raises(ApiError) as lost:
        asyncio.run(model_calls.generate(REQUEST))
    assert lost.value.status >= 500 and not model.answers
    model.answers.append(Refused(QueueFull("full")))
    with pytest.raises(ApiError) as refused:
        asyncio.run(model_calls.generate(REQUEST))
    assert (refused.value.status, refused.value.headers) == (429, {"Retry-After": "3"})
    assert metrics.errors[-1] == "queue_full"


async def _body(response) -> list[str]:
    return [chunk async for chunk in response.body_iterator]


def test_the_stream_relays_chunks_then_done_and_reports_a_late_error_in_band():
    stream = FakeStream([StreamStart(prompt_tokens=2, adapter_version="v1"), Delta(0, "a"), ChoiceEnd(0, "stop"),
                         RESULT])
    model_calls, _ = calls(FakeModel(stream))
    response = asyncio.run(model_calls.stream(REQUEST, on_delta=lambda d: {"text": d.text},
                                              on_end=lambda e: {"end": e.finish_reason},
                                              on_result=lambda r: None, first=[{"role": "assistant"}]))
    assert response.media_type == "text/event-stream"
    assert asyncio.run(_body(response)) == ['data: {"role": "assistant"}\n\n', 'data: {"text": "a"}\n\n',
                                            'data: {"end": "stop"}\n\n', "data: [DONE]\n\n"]
    assert stream.cancelled
    failing = FakeStream([StreamStart(prompt_tokens=2, adapter_version=None), Refused(QueueFull("late"))])
    model_calls, metrics = calls(FakeModel(failing))
    chunks = asyncio.run(_body(asyncio.run(model_calls.stream(REQUEST, dict, dict, dict))))
    assert json.loads(chunks[0][len("data: "):])["error"]["code"] == "queue_full"
    assert chunks[-1] == "data: [DONE]\n\n" and metrics.errors == ["queue_full"]


def test_a_refused_stream_is_a_plain_error_before_any_byte():
    stream = FakeStream([Refused(QueueFull("full"))])
    with pytest.raises(ApiError) as refused:
        asyncio.run(calls(FakeModel(stream))[0].stream(REQUEST, dict, dict, dict))
    assert refused.value.status == 429 and stream.cancelled


@pytest.mark.parametrize("body", [None, [], {"history": "x"}, {"history": [], "more": 1}])
def test_history_bodies_other_than_a_list_of_items_are_refused(body):
    with pytest.raises(ApiError) as bad:
        user_routes.history_items(body)
    assert (bad.value.status, bad.value.param) == (400, "history")
    assert user_routes.history_items({"history": [{"id": "1"}]}) == [{"id": "1"}]


@pytest.mark.parametrize("body", [None, {"version": 3}, {"version": "v1", "x": 1}])
def test_rollback_bodies_other_than_a_version_id_are_refused(body):
    with pytest.raises(ApiError) as bad:
        user_routes.rollback_version(body)
    assert (bad.value.status, bad.value.param) == (400, "version")


@pytest.mark.parametrize("error, status, code", [(AdapterNotFound("gone"), 404, "version_not_found"),
                                                 (AdapterIntegrityError("bad"), 422, "adapter_unusable"),
                                                 (AdapterError("newer"), 409, "conflict")])
def test_a_refused_rollback_answers_its_status(error, status, code):
    def rollback(key, version):
        raise error

    key = SimpleNamespace(user="u1", variant="oppu")
    with pytest.raises(ApiError) as refused:
        user_routes.roll_back(SimpleNamespace(rollback=rollback), key, "v1")
    assert (refused.value.status, refused.value.code, refused.value.param) == (status, code, "version")
    manifest = SimpleNamespace(version="v1", created="now", trainer="per-user")
    answer = user_routes.roll_back(SimpleNamespace(rollback=lambda key, version: manifest), key, "v1")
    assert answer == {"user": "u1", "variant": "oppu", "version": "v1", "created": "now", "trainer": "per-user",
                      "current": True}
