"""The HTTP ingress: OpenAI-compatible completions, ``/v1/predict``, models, health, a user's adapter
and history (add, roll back, delete, erase).

Every route works in this order: the bearer token (401, or 403 later for another user's
adapter), the body's size (413), the body's fields (400 naming the field; unknown and
unsupported OpenAI fields included), the model and user id (400 / 404), the request's limits
(400); then the model replica answers (404 when the user has no adapter, 429 with Retry-After
when its queue is full, 504 past ``request_timeout_s``). Every error, unknown routes included, is
JSON in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, so the ``openai``
client raises its usual exceptions.

Here are the routes and the checks every route shares; the model replicas are called through
``oppu.serving.model_calls`` (retries, errors, the event stream), and the per-user routes' work is
``oppu.serving.user_routes``'s.
"""

# No "from __future__ import annotations": FastAPI must see the parameters' real types on the
# methods that @serve.ingress rewraps.
import asyncio
import json
import time
import uuid

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from oppu import logs
from oppu.errors import AdapterNotFound, ConfigError, OppuError, UserIdError
from oppu.ids import validate_user_id
from oppu.serving import user_routes
from oppu.serving.auth import ADMIN_TOKEN_ENV, Authenticator, Caller, ForbiddenError
from oppu.serving.config import ServeConfig
from oppu.serving.http_errors import ModelNotFound, UnknownHistory, as_api_error, error_response
from oppu.serving.model_calls import ModelCalls
from oppu.serving.openai_api import (
    ApiError,
    ChatBody,
    CompletionBody,
    PredictBody,
    chat_logprobs,
    completion_logprobs,
    parse_body,
    usage,
)
from oppu.serving.replica import Delta, GenerateRequest, RequestTooLarge

app = FastAPI(title="OPPU: one personal LoRA per user", version="1")


@app.exception_handler(RequestValidationError)
async def _bad_parameters(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in errors)
    param = str(errors[0]["loc"][-1]) if errors and errors[0]["loc"] else None
    return error_response(ApiError(400, "invalid_value", problems, param))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "route_not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return error_response(ApiError(exc.status_code, code, message, None, dict(exc.headers or {}) or None))


@app.exception_handler(OppuError)
async def _oppu_error(request: Request, exc: OppuError) -> JSONResponse:
    return error_response(as_api_error(exc))


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    return error_response(as_api_error(exc))


@serve.deployment(name="ingress")
@serve.ingress(app)
class OppuIngress:
    """Routes: see the module docstring; the model replicas are reached through ``model``."""

    def __init__(self, model, config: dict):
        import os

        from oppu.serving.events import DeletionEvents
        from oppu.serving.metrics import ServingMetrics
        from oppu.store import AdapterStore, TokenStore
        from oppu.tasks import get_task

        self.config = ServeConfig(**config)
        logs.follow_serve_logging(self.config.log_level)
        self.model = model
        self.task = get_task(self.config.task)
        # The token root may differ from the adapter store (config.tokens), with its own options
        # and credentials (OPPU_TOKENS_AWS_*, read by TokenStore), so adapter writers cannot mint tokens.
        tokens = TokenStore(self.config.token_root, self.config.tokens_storage_options)
        self.auth = Authenticator(tokens, os.environ.get(ADMIN_TOKEN_ENV))
        self.store = AdapterStore(self.config.store)
        self.events = DeletionEvents(serve.get_replica_context().app_name)
        self.metrics = ServingMetrics()
        self.calls = ModelCalls(model, self.config, self.metrics)
        self.histories = None
        if self.config.data:
            from oppu.serving.histories import UserHistories

            self.histories = UserHistories(self.config.data, self.config.history_check_ttl_s, self.store.root_uri)
        self._info: dict | None = None
        self._tokenizer_cache = None

    @app.get("/health")
    async def health(self) -> JSONResponse:
        """200 once a model replica has its model loaded and its scheduler running; 503 before."""
        try:
            ready = await asyncio.wait_for(self.model.ready.remote(), timeout=5)
        except Exception as exc:
            ready, why = False, f"{type(exc).__name__}: {exc}"
        else:
            why = "the model replica's scheduler is not running"
        if not ready:
            return error_response(ApiError(503, "not_ready", f"the model is not ready: {why}"))
        return JSONResponse({"status": "ok", "model": self.config.base_model_id})

    @app.get("/v1/models")
    async def models(self, authorization: str | None = Header(None)) -> dict:
        self.metrics.request("models")
        caller = await self._caller(authorization)
        created = int(time.time())
        return {"object": "list", "data": [self._model_card(model_id, created)
                                           for model_id in await self._visible_models(caller)]}

    @app.get("/v1/models/{model_id}")
    async def model_card(self, model_id: str, authorization: str | None = Header(None)) -> dict:
        self.metrics.request("model")
        caller = await self._caller(authorization)
        if model_id not in await self._visible_models(caller, only=model_id):
            raise ModelNotFound(f"model {model_id!r} does not exist or this token may not use it")
        return self._model_card(model_id, int(time.time()))

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        self.metrics.request("completions")
        caller = await self._caller(request.headers.get("authorization"))
        body: CompletionBody = parse_body(await self._read_body(request), CompletionBody)
        body.check(self.config.max_n)
        generate = self._request(caller, body, body.prompt_text(), body.max_tokens, body.logprobs)
        completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        offsets: dict[int, int] = {}

        def logprobs_of(delta: Delta):
            if body.logprobs is None:
                return None
            out = completion_logprobs(list(delta.logprobs), offsets.get(delta.index, 0))
            offsets[delta.index] = offsets.get(delta.index, 0) + sum(len(t.token) for t in delta.logprobs)
            return out

        def chunk(choices: list[dict], result_usage: dict | None = None) -> dict:
            out = {"id": completion_id, "object": "text_completion", "created": created, "model": body.model,
                   "choices": choices}
            if body.include_usage:
                out["usage"] = result_usage
            return out

        if body.stream:
            return await self.calls.stream(
                generate,
                on_delta=lambda d: chunk([{"index": d.index, "text": d.text, "finish_reason": None,
                                           "logprobs": logprobs_of(d)}]),
                on_end=lambda e: chunk([{"index": e.index, "text": "", "finish_reason": e.finish_reason,
                                         "logprobs": None}]),
                on_result=lambda r: chunk([], usage(r.prompt_tokens, r.completion_tokens)) if body.include_usage
                else None)
        result = await self.calls.generate(generate)
        return {"id": completion_id, "object": "text_completion", "created": created, "model": body.model,
                "choices": [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                             "logprobs": completion_logprobs(list(c.logprobs)) if c.logprobs is not None else None}
                            for c in result.choices],
                "usage": usage(result.prompt_tokens, result.completion_tokens)}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        self.metrics.request("chat_completions")
        caller = await self._caller(request.headers.get("authorization"))
        body: ChatBody = parse_body(await self._read_body(request), ChatBody)
        body.check(self.config.max_n)
        prompt, templated = await self._chat_prompt(body.turns())
        generate = self._request(caller, body, prompt, body.requested_max_tokens(), body.requested_logprobs(),
                                 templated=templated, prompt_field="messages")
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        want_logprobs = body.requested_logprobs() is not None

        def chunk(choices: list[dict], result_usage: dict | None = None) -> dict:
            out = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": body.model,
                   "choices": choices}
            if body.include_usage:
                out["usage"] = result_usage
            return out

        def on_delta(delta: Delta) -> dict:  # the role went out in the first chunk of every choice
            return chunk([{"index": delta.index, "delta": {"content": delta.text}, "finish_reason": None,
                           "logprobs": chat_logprobs(list(delta.logprobs)) if want_logprobs else None}])

        if body.stream:
            return await self.calls.stream(
                generate, on_delta=on_delta,
                on_end=lambda e: chunk([{"index": e.index, "delta": {}, "finish_reason": e.finish_reason,
                                         "logprobs": None}]),
                on_result=lambda r: chunk([], usage(r.prompt_tokens, r.completion_tokens)) if body.include_usage
                else None,
                first=[chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                               "logprobs": None}]) for i in range(body.n)])
        result = await self.calls.generate(generate)
        return {"id": completion_id, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                             "finish_reason": c.finish_reason,
                             "logprobs": chat_logprobs(list(c.logprobs)) if c.logprobs is not None else None}
                            for c in result.choices],
                "usage": usage(result.prompt_tokens, result.completion_tokens)}

    @app.post("/v1/predict")
    async def predict(self, request: Request) -> dict:
        """The task's prompt over the user's own top-k history, answered by the user's model."""
        from oppu.retrieval import BM25Retriever
        from oppu.tasks import get_task

        self.metrics.request("predict")
        caller = await self._caller(request.headers.get("authorization"))
        body: PredictBody = parse_body(await self._read_body(request), PredictBody)
        try:
            user = validate_user_id(body.user)
        except UserIdError as exc:
            raise ApiError(400, "invalid_user_id", str(exc), "user") from None
        caller.require(user)
        try:
            same_task = get_task(body.task) == self.task
        except Exception as exc:
            raise ApiError(400, "invalid_value", f"unknown task {body.task!r}: {exc}", "task") from None
        if not same_task:
            raise ApiError(400, "invalid_value", f"this app serves task {self.task.name}, not {body.task!r}", "task")
        query = self.task.parse_query(body.input)  # DataError(field="input") -> 400 naming "input"
        retrieved = []
        if body.k > 0:
            history = await asyncio.to_thread(self._history, user)
            retrieved = [item.fields for item in BM25Retriever(self.task, history).top_k(query, body.k)]
        prompt = self.task.build_prompt(query, retrieved=retrieved)
        max_tokens = min(self.task.max_new_tokens, self.config.max_tokens_limit)
        result = await self.calls.generate(GenerateRequest(prompt=prompt, user=user, max_tokens=max_tokens,
                                                           as_trained=True))
        return {"task": self.task.name, "user": user, "prediction": self.task.parse_output(result.text),
                "raw": result.text, "k": body.k, "retrieved": len(retrieved),
                "adapter_version": result.adapter_version, "base_fingerprint": result.base_fingerprint,
                "usage": usage(result.prompt_tokens, result.completion_tokens)}

    @app.put("/v1/users/{user}/history")
    async def put_history(self, user: str, request: Request) -> dict:
        """Add history items (``{"history": [LaMP profile items]}``) to the user's row of the data
        set, validated as ``oppu users add`` validates them; a new user joins as a test user.
        ``/v1/predict`` retrieves from them at once on this replica (``history_check_ttl_s`` on
        others); ``oppu users train`` trains the user's adapter on them."""
        self.metrics.request("put_history")
        user = await self._caller_for_user(request.headers.get("authorization"), user)
        if self.histories is None:
            raise ApiError(400, "invalid_request", "this app has no data set: start it with the 'data' "
                           "argument (the prepared data set) to add history")
        items = user_routes.history_items(await self._read_json(request))
        return await asyncio.to_thread(user_routes.add_history, self.histories, self.store.root_uri, user, items)

    @app.delete("/v1/users/{user}/adapter")
    async def delete_adapter(self, user: str, authorization: str | None = Header(None)) -> dict:
        """Delete every version of the user's adapter from the store and from every replica."""
        self.metrics.request("delete_adapter")
        user = await self._caller_for_user(authorization, user)
        deleted = await asyncio.to_thread(self.store.delete_user, user, self.config.task)
        await self.events.record(user)
        if not deleted:
            raise AdapterNotFound(f"user {user!r} has no adapter for task {self.config.task}")
        return {"user": user, "deleted_versions": deleted}

    @app.post("/v1/users/{user}/adapter/rollback")
    async def rollback_adapter(self, user: str, request: Request) -> dict:
        """Make an older version of the user's adapter (this app's task, base and variant) current:
        ``{"version": "v..."}``, the admin token only. Answers the now-current version; every
        replica drops its cached copy at its next request (the event log of deletions), or within
        ``adapter_check_ttl_s`` where the log is unreachable. A later publish is current again."""
        from oppu.store import AdapterKey

        self.metrics.request("rollback_adapter")
        user = await self._caller_for_user(request.headers.get("authorization"), user,
                                           admin_only="roll back an adapter")
        version = user_routes.rollback_version(await self._read_json(request))
        info = await self._model_info()
        key = AdapterKey(self.config.task, info["base_fingerprint"], self.config.variant, user)
        answer = await asyncio.to_thread(user_routes.roll_back, self.store, key, version)
        await self.events.record(user)
        return answer

    @app.delete("/v1/users/{user}")
    async def erase_user(self, user: str, authorization: str | None = Header(None)) -> dict:
        """Erase the user from serving: a tombstone (nothing of theirs is trained or published
        again), every adapter version of every task and variant, their tokens, and every replica's
        caches. Their records in a run directory go with ``oppu users delete`` (docs/erasure.md)."""
        self.metrics.request("erase_user")
        user = await self._caller_for_user(authorization, user)
        deleted, revoked = await asyncio.to_thread(user_routes.erase, self.store, self.histories, self.auth.tokens,
                                                   user)
        await self.events.record(user)
        return {"user": user, "erased": True, "deleted_versions": deleted, "tokens_revoked": revoked}

    # -- helpers -------------------------------------------------------------------------------------

    async def _caller_for_user(self, authorization: str | None, user: str, admin_only: str | None = None) -> str:
        """The validated ``user`` of a per-user route, once the caller may act for them (the admin
        only, where ``admin_only`` names what the route does)."""
        caller = await self._caller(authorization)
        try:
            user = validate_user_id(user)
        except UserIdError as exc:
            raise ApiError(400, "invalid_user_id", str(exc), "user") from None
        if admin_only and not caller.is_admin:
            raise ForbiddenError(f"only the admin token may {admin_only}")
        caller.require(user)
        return user

    async def _caller(self, authorization: str | None) -> Caller:
        try:
            return await asyncio.to_thread(self.auth.caller, authorization)
        except OppuError as exc:
            self.metrics.error(as_api_error(exc).code)
            raise

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length", "")
        too_large = ApiError(413, "body_too_large", f"the request body exceeds {limit} bytes (max_body_bytes)")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for piece in request.stream():
            size += len(piece)
            if size > limit:
                raise too_large
            chunks.append(piece)
        return b"".join(chunks)

    async def _read_json(self, request: Request):
        """The body as JSON (empty: null); 400 ``invalid_json`` where it is not JSON."""
        try:
            return json.loads(await self._read_body(request) or b"null")
        except ValueError as exc:
            raise ApiError(400, "invalid_json", f"the body is not JSON: {exc}") from None

    def _request(self, caller: Caller, body, prompt: str, max_tokens: int | None, logprobs: int | None, *,
                 templated: bool = False, prompt_field: str = "prompt") -> GenerateRequest:
        base, sep, user = body.model.partition(":")
        if base != self.config.base_model_id:
            raise ModelNotFound(f"model {body.model!r} is not served here; use "
                                f"{self.config.base_model_id!r} or '{self.config.base_model_id}:<user>'")
        user_id = validate_user_id(user) if sep else None
        if user_id is not None:
            caller.require(user_id)
        max_tokens = max_tokens or self.config.default_max_tokens
        if max_tokens > self.config.max_tokens_limit:
            raise RequestTooLarge(f"max_tokens {max_tokens} exceeds the limit {self.config.max_tokens_limit}",
                                  "max_completion_tokens" if getattr(body, "max_completion_tokens", None)
                                  else "max_tokens")
        return GenerateRequest(prompt=prompt, user=user_id, max_tokens=max_tokens,
                               params=body.sampling(self.config.default_temperature, logprobs), n=body.n,
                               stop=body.stops(), templated=templated, prompt_field=prompt_field)

    async def _chat_prompt(self, turns: list[dict[str, str]]) -> tuple[str, bool]:
        """The prompt text, and whether a chat template rendered it (its special tokens in the text)."""
        tokenizer = await self._tokenizer()
        if not getattr(tokenizer, "chat_template", None):
            # A base model without a chat template continues the conversation's text.
            return "\n".join(turn["content"] for turn in turns), False
        try:
            text = await asyncio.to_thread(tokenizer.apply_chat_template, turns, tokenize=False,
                                           add_generation_prompt=True)
        except Exception as exc:  # a template that refuses these turns (e.g. no system role)
            raise ApiError(400, "invalid_value", f"the model's chat template refused the messages: {exc}",
                           "messages") from None
        return text, True

    async def _tokenizer(self):
        if self._tokenizer_cache is None:
            from transformers import AutoTokenizer

            from oppu.models import resolve_model_dir

            model_dir = await asyncio.to_thread(resolve_model_dir, self.config.model)
            self._tokenizer_cache = await asyncio.to_thread(AutoTokenizer.from_pretrained, str(model_dir))
        return self._tokenizer_cache

    async def _model_info(self) -> dict:
        if self._info is None:
            self._info = await self.model.info.remote()
        return self._info

    async def _visible_models(self, caller: Caller, only: str | None = None) -> list[str]:
        """The base id and ``<base>:<user>`` of the adapters ``caller`` may use (the admin: all)."""
        base = self.config.base_model_id
        if only is not None:
            model_base, sep, user = only.partition(":")
            if model_base != base:
                return []
            if not sep:
                return [base]
        info = await self._model_info()
        users = await asyncio.to_thread(self.store.users, self.config.task, info["base_fingerprint"],
                                        self.config.variant)
        if not caller.is_admin:
            users = [caller.user] if caller.user in users else []
        return [base] + [f"{base}:{user}" for user in users]

    @staticmethod
    def _model_card(model_id: str, created: int) -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "oppu"}

    def _history(self, user: str):
        if self.histories is None:
            raise ConfigError("k > 0 needs the app's 'data' argument (the prepared data set)")
        try:  # an erased user has none (UserHistories lists the tombstones)
            return self.histories.history(user)
        except KeyError:
            raise UnknownHistory(f"user {user!r} has no history in the data set") from None
