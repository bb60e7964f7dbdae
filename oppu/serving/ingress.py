"""The HTTP ingress: OpenAI-compatible completions, ``/v1/predict``, models, adapter deletion.

Every route checks, in this order: the user id against the strict pattern (400), the bearer
token (401, or 403 for another user's token), the request's limits (400); then the model
replica answers (404 when the user has no adapter). Errors are JSON in OpenAI's shape,
``{"error": {"message", "type", "code"}}``, so the ``openai`` client raises its usual exceptions.
"""

# No "from __future__ import annotations": FastAPI must see the body models' real types on the
# methods that @serve.ingress rewraps.
import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from oppu.errors import AdapterError, AdapterNotFound, ConfigError, OppuError, UserIdError
from oppu.ids import validate_user_id
from oppu.serving.auth import ADMIN_TOKEN_ENV, Authenticator, AuthError, Caller, ForbiddenError
from oppu.serving.config import ServeConfig
from oppu.serving.replica import GenerateRequest, GenerateResult, RequestTooLarge, StreamStart


class ModelNotFound(OppuError):
    """A ``model`` that is neither the base id nor ``<base id>:<user>`` (HTTP 404)."""


class UnknownHistory(OppuError):
    """``/v1/predict`` with k > 0 for a user the data set has no history for (HTTP 404)."""


ERROR_STATUS: list[tuple[type[Exception], int, str]] = [
    (UserIdError, 400, "invalid_user_id"),
    (RequestTooLarge, 400, "request_too_large"),
    (ConfigError, 400, "invalid_request"),
    (AuthError, 401, "unauthorized"),
    (ForbiddenError, 403, "forbidden"),
    (AdapterNotFound, 404, "adapter_not_found"),
    (ModelNotFound, 404, "model_not_found"),
    (UnknownHistory, 404, "user_not_found"),
    # Stored adapter corrupt or trained on another base: not the request's fault, and retrying
    # cannot help (a 5xx would make clients retry), so it is "unprocessable".
    (AdapterError, 422, "adapter_unusable"),
]


def error_response(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind,
                                                               "code": status}})


def classify(exc: BaseException) -> tuple[int, str] | None:
    for error_type, status, kind in ERROR_STATUS:
        if isinstance(exc, error_type):
            return status, kind
    return None


class CompletionBody(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI's sampling options are accepted, decoding is greedy

    model: str
    prompt: str | list[str]
    max_tokens: int | None = Field(None, ge=1)
    stream: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool = False


class PredictBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str
    user: str | int
    input: str
    k: int = Field(0, ge=0, le=64)


def _usage(result: GenerateResult) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def _message_text(message: ChatMessage) -> str:
    if isinstance(message.content, list):
        return "".join(part.get("text", "") for part in message.content if part.get("type") == "text")
    return message.content or ""


def _unwrap(exc: BaseException) -> BaseException:
    """The replica's own exception from Ray's wrapper (a RayTaskError subclass keeps the cause)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


app = FastAPI(title="OPPU: one personal LoRA per user", version="1")


@app.exception_handler(RequestValidationError)
async def _bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
    return error_response(400, "invalid_request", problems)


@app.exception_handler(OppuError)
async def _oppu_error(request: Request, exc: OppuError) -> JSONResponse:
    status, kind = classify(exc) or (500, "internal_error")
    return error_response(status, kind, str(exc))


@serve.deployment(name="ingress")
@serve.ingress(app)
class OppuIngress:
    """Routes: see the module docstring; the model replicas are reached through ``model``."""

    def __init__(self, model, config: dict):
        import os

        from oppu.serving.events import events_actor
        from oppu.serving.metrics import ServingMetrics
        from oppu.store import AdapterStore, TokenStore
        from oppu.tasks import get_task

        self.config = ServeConfig(**config)
        self.model = model
        self.task = get_task(self.config.task)
        self.auth = Authenticator(TokenStore(self.config.store), os.environ.get(ADMIN_TOKEN_ENV))
        self.store = AdapterStore(self.config.store)
        self.events = events_actor(serve.get_replica_context().app_name)
        self.metrics = ServingMetrics()
        self.dataset = None
        if self.config.data:
            from oppu.data.dataset import read_dataset

            self.dataset = read_dataset(self.config.data)
        self._info: dict | None = None

    @app.get("/v1/models")
    async def models(self, authorization: str | None = Header(None)) -> dict:
        self.metrics.request("models")
        caller = await self._caller(authorization)
        info = await self._model_info()
        if caller.is_admin:
            users = await asyncio.to_thread(self.store.users, self.config.task, info["base_fingerprint"],
                                            self.config.variant)
        else:
            key_users = await asyncio.to_thread(self.store.users, self.config.task,
                                                info["base_fingerprint"], self.config.variant)
            users = [caller.user] if caller.user in key_users else []
        base = self.config.base_model_id
        created = int(time.time())
        ids = [base] + [f"{base}:{user}" for user in users]
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "oppu"} for model_id in ids]}

    @app.post("/v1/completions")
    async def completions(self, body: CompletionBody, authorization: str | None = Header(None)):
        self.metrics.request("completions")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise RequestTooLarge(f"one prompt per request, got {len(prompts)}")
        request = await self._request(body.model, prompts[0], body.max_tokens, authorization)
        completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, finish: str | None, usage: dict | None = None) -> dict:
            out = {"id": completion_id, "object": "text_completion", "created": created,
                   "model": body.model,
                   "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}
            if usage is not None:
                out["usage"] = usage
            return out

        if body.stream:
            return await self._stream(request, lambda delta: chunk(delta, None),
                                      lambda result: chunk("", result.finish_reason))
        result = await self._generate(request)
        return chunk(result.text, result.finish_reason, _usage(result))

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatBody, authorization: str | None = Header(None)):
        self.metrics.request("chat_completions")
        prompt = await self._chat_prompt(body.messages)
        request = await self._request(body.model, prompt, body.max_completion_tokens or body.max_tokens,
                                      authorization)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict, finish: str | None) -> dict:
            return {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                    "model": body.model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                                      "logprobs": None}]}

        if body.stream:
            return await self._stream(request, lambda text: chunk({"content": text}, None),
                                      lambda result: chunk({}, result.finish_reason),
                                      first=chunk({"role": "assistant", "content": ""}, None))
        result = await self._generate(request)
        return {"id": completion_id, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": result.finish_reason, "logprobs": None}],
                "usage": _usage(result)}

    @app.post("/v1/predict")
    async def predict(self, body: PredictBody, authorization: str | None = Header(None)) -> dict:
        """The task's prompt over the user's own top-k history, answered by the user's model."""
        from oppu.retrieval import BM25Retriever
        from oppu.tasks import get_task

        self.metrics.request("predict")
        user = validate_user_id(body.user)
        (await self._caller(authorization)).require(user)
        if get_task(body.task) != self.task:
            raise ConfigError(f"this app serves task {self.task.name}, not {body.task!r}")
        query = self.task.parse_query(body.input)
        retrieved = []
        if body.k > 0:
            history = self._history(user)
            retrieved = [item.fields for item in BM25Retriever(self.task, history).top_k(query, body.k)]
        prompt = self.task.build_prompt(query, retrieved=retrieved)
        max_tokens = min(self.task.max_new_tokens, self.config.max_tokens_limit)
        result = await self._generate(GenerateRequest(prompt=prompt, user=user, max_tokens=max_tokens))
        return {"task": self.task.name, "user": user, "prediction": self.task.parse_output(result.text),
                "raw": result.text, "k": body.k, "retrieved": len(retrieved),
                "adapter_version": result.adapter_version, "usage": _usage(result)}

    @app.delete("/v1/users/{user}/adapter")
    async def delete_adapter(self, user: str, authorization: str | None = Header(None)) -> dict:
        """Delete every version of the user's adapter from the store and from every replica."""
        self.metrics.request("delete_adapter")
        user = validate_user_id(user)
        (await self._caller(authorization)).require(user)
        deleted = await asyncio.to_thread(self.store.delete_user, user, self.config.task)
        await self.events.record_deletion.remote(user)
        if not deleted:
            raise AdapterNotFound(f"user {user!r} has no adapter for task {self.config.task}")
        return {"user": user, "deleted_versions": deleted}

    async def _caller(self, authorization: str | None) -> Caller:
        try:
            return await asyncio.to_thread(self.auth.caller, authorization)
        except OppuError as exc:
            self.metrics.error(classify(exc)[1])
            raise

    async def _request(self, model: str, prompt: str, max_tokens: int | None,
                       authorization: str | None) -> GenerateRequest:
        base, sep, user = model.partition(":")
        if base != self.config.base_model_id:
            raise ModelNotFound(f"model {model!r} is not served here; use "
                                f"{self.config.base_model_id!r} or '{self.config.base_model_id}:<user>'")
        user_id = validate_user_id(user) if sep else None
        caller = await self._caller(authorization)
        if user_id is not None:
            caller.require(user_id)
        max_tokens = max_tokens or self.config.default_max_tokens
        if max_tokens > self.config.max_tokens_limit:
            raise RequestTooLarge(f"max_tokens {max_tokens} exceeds the limit {self.config.max_tokens_limit}")
        return GenerateRequest(prompt=prompt, user=user_id, max_tokens=max_tokens)

    def _handle(self, request: GenerateRequest, stream: bool = False):
        return self.model.options(multiplexed_model_id=request.user or "", stream=stream)

    async def _generate(self, request: GenerateRequest) -> GenerateResult:
        try:
            return await self._handle(request).generate.remote(request)
        except Exception as exc:
            raise _unwrap(exc) from None

    async def _stream(self, request: GenerateRequest, delta_chunk, final_chunk,
                      first: dict | None = None) -> StreamingResponse:
        responses = self._handle(request, stream=True).generate_stream.remote(request)
        try:  # the first item says the request was accepted; errors before it are plain JSON
            start = await responses.__anext__()
        except Exception as exc:
            raise _unwrap(exc) from None
        assert isinstance(start, StreamStart)

        async def events() -> AsyncIterator[str]:
            if first is not None:
                yield f"data: {json.dumps(first)}\n\n"
            try:
                async for item in responses:
                    if isinstance(item, GenerateResult):
                        yield f"data: {json.dumps(final_chunk(item))}\n\n"
                    else:
                        yield f"data: {json.dumps(delta_chunk(item))}\n\n"
            except Exception as exc:  # the status line is sent: report the error in-band
                error = _unwrap(exc)
                status, kind = classify(error) or (500, "internal_error")
                yield f"data: {json.dumps({'error': {'message': str(error), 'type': kind, 'code': status}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def _chat_prompt(self, messages: list[ChatMessage]) -> str:
        tokenizer = await self._tokenizer()
        turns = [{"role": m.role, "content": _message_text(m)} for m in messages]
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        # A base model without a chat template continues the conversation's text.
        return "\n".join(turn["content"] for turn in turns)

    async def _tokenizer(self):
        if not hasattr(self, "_tokenizer_cache"):
            from transformers import AutoTokenizer

            from oppu.models import resolve_model_dir

            model_dir = await asyncio.to_thread(resolve_model_dir, self.config.model)
            self._tokenizer_cache = await asyncio.to_thread(AutoTokenizer.from_pretrained, str(model_dir))
        return self._tokenizer_cache

    async def _model_info(self) -> dict:
        if self._info is None:
            self._info = await self.model.info.remote()
        return self._info

    def _history(self, user: str):
        if self.dataset is None:
            raise ConfigError("k > 0 needs the app's 'data' argument (the prepared data set)")
        try:
            return self.dataset.user(user).history
        except KeyError:
            raise UnknownHistory(f"user {user!r} has no history in the data set") from None
