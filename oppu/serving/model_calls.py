"""How the ingress reaches the model replicas: a request routed by an opaque key, run again on a
live replica where the one it went to died before answering, a refusal or failure turned into its
HTTP error, and a streamed answer relayed as server-sent events."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable

from fastapi.responses import StreamingResponse

from oppu.serving.config import ServeConfig
from oppu.serving.http_errors import as_api_error
from oppu.serving.metrics import ServingMetrics
from oppu.serving.openai_api import ApiError, error_body
from oppu.serving.privacy import routing_key
from oppu.serving.replica import ChoiceEnd, Delta, GenerateRequest, GenerateResult, Refused, StreamStart

logger = logging.getLogger(__name__)

REPLICA_LOST_RETRIES = 2


def replica_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says the model replica died or became unreachable under the request."""
    from ray.exceptions import RayActorError

    return isinstance(exc, RayActorError) or isinstance(unwrap(exc), RayActorError)


def unwrap(exc: BaseException) -> BaseException:
    """The replica's own exception from Ray's wrapper (a RayTaskError subclass keeps the cause)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


class ModelCalls:
    """The model deployment's handle (``model``), as the ingress's routes call it."""

    def __init__(self, model, config: ServeConfig, metrics: ServingMetrics):
        self.model = model
        self.config = config
        self.metrics = metrics

    def handle(self, request: GenerateRequest, stream: bool = False):
        # An opaque bucket, never the user id: Serve exports multiplexed ids as metric labels.
        key = routing_key(request.user, self.config.routing_buckets) if request.user is not None else ""
        return self.model.options(multiplexed_model_id=key, stream=stream)

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        """The replica's whole answer; its refusal or failure raised as an ``ApiError``."""
        for attempt in range(REPLICA_LOST_RETRIES + 1):
            try:
                result = await self.handle(request).generate.remote(request)
                break
            except Exception as exc:
                # A replica that died under the request (killed, node lost): nothing reached the
                # client yet, so the request runs again on a live one instead of failing.
                if attempt < REPLICA_LOST_RETRIES and replica_lost(exc):
                    logger.warning("a model replica was lost under a request; retrying it (%d of %d)",
                                   attempt + 1, REPLICA_LOST_RETRIES)
                    continue
                raise self.error(exc) from None
        if isinstance(result, Refused):
            raise self.error(result.error)
        return result

    def error(self, exc: BaseException) -> ApiError:
        """``exc`` (a replica's, unwrapped from Ray's) as the HTTP error it answers, counted."""
        error = as_api_error(unwrap(exc), self.config.retry_after_s)
        self.metrics.error(error.code)
        return error

    async def stream(self, request: GenerateRequest, on_delta: Callable, on_end: Callable, on_result: Callable,
                     first: list[dict] = ()) -> StreamingResponse:
        """Server-sent events: ``first`` chunks, then ``on_delta``/``on_end``/``on_result`` of each
        item the replica streams (``on_result`` may answer None: no chunk), then ``[DONE]``. An error
        before the stream starts is a plain JSON error; one after it, an error chunk."""
        for attempt in range(REPLICA_LOST_RETRIES + 1):
            responses = self.handle(request, stream=True).generate_stream.remote(request)
            try:  # the first item says the request was accepted; errors before it are plain JSON
                start = await responses.__anext__()
                break
            except Exception as exc:
                if attempt < REPLICA_LOST_RETRIES and replica_lost(exc):  # no byte sent yet: run it again
                    logger.warning("a model replica was lost before a stream started; retrying it")
                    continue
                raise self.error(exc) from None
        if isinstance(start, Refused):
            responses.cancel()
            raise self.error(start.error)
        assert isinstance(start, StreamStart)

        async def events() -> AsyncIterator[str]:
            for opening in first:  # chat: one chunk per choice naming the role
                yield f"data: {json.dumps(opening)}\n\n"
            try:
                async for item in responses:
                    if isinstance(item, Delta):
                        yield f"data: {json.dumps(on_delta(item))}\n\n"
                    elif isinstance(item, ChoiceEnd):
                        yield f"data: {json.dumps(on_end(item))}\n\n"
                    elif isinstance(item, GenerateResult) and (last := on_result(item)) is not None:
                        yield f"data: {json.dumps(last)}\n\n"
                    elif isinstance(item, Refused):  # e.g. timed out mid-stream
                        raise item.error
            except Exception as exc:  # the status line is sent: report the error in-band
                error = self.error(exc)
                yield f"data: {json.dumps(error_body(error.status, error.code, error.message, error.param))}\n\n"
            finally:
                responses.cancel()  # the client left or the stream ended: the replica frees its rows
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")
