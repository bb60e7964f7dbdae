"""OpenAI's wire format: request bodies checked field by field, errors in OpenAI's shape, response bodies.

A body field OpenAI does not define is refused (400 ``unknown_field``), and so is a field OpenAI
defines that this server does not implement, unless it carries its no-op value (``echo: false``,
``logit_bias: {}``, ``response_format: {"type": "text"}``; 400 ``unsupported_field``). Every
error names the offending field in ``param``. The shape of every error, on every route:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": "invalid_value"}}
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from oppu.errors import OppuError
from oppu.serving.sampling import SamplingParams

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error"}


class ApiError(OppuError):
    """An error answered in OpenAI's shape: HTTP status, ``code``, message and the field at fault."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.param, self.headers = status, code, message, param, headers


def error_body(status: int, code: str, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def _no_op(*allowed: Any) -> Callable[[Any], bool]:
    return lambda value: value in (None, *allowed)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False


class _Common(BaseModel):
    """Fields both completion routes share (OpenAI's names, ranges and defaults)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, description="extension (vLLM's): sample among the k most likely; 0 or -1: off")
    n: int = Field(1, ge=1)
    stream: StrictBool = False  # "yes" or 1 is a 400, as OpenAI answers, not a quiet True
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    seed: int | None = None
    user: str | None = None  # OpenAI's end-user tag for abuse monitoring; accepted, not used

    UNSUPPORTED: ClassVar[dict[str, Callable[[Any], bool]]] = {
        "logit_bias": _no_op({}), "best_of": _no_op(1), "service_tier": _no_op("auto", "default"),
        "store": _no_op(False), "metadata": _no_op({})}

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if len(stops) > 4:
            raise ApiError(400, "invalid_value", f"stop takes at most 4 sequences, got {len(stops)}", "stop")
        return stops

    def check(self, max_n: int) -> None:
        if self.n > max_n:
            raise ApiError(400, "invalid_value", f"n={self.n} exceeds this server's limit of {max_n}", "n")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "invalid_value", "stream_options is only allowed with stream: true",
                           "stream_options")
        self.stops()

    def sampling(self, default_temperature: float, logprobs: int | None) -> SamplingParams:
        temperature = default_temperature if self.temperature is None else self.temperature
        return SamplingParams(temperature=temperature, top_p=self.top_p, top_k=max(0, self.top_k), seed=self.seed,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                              logprobs=logprobs)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionBody(_Common):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)

    UNSUPPORTED: ClassVar[dict[str, Callable[[Any], bool]]] = _Common.UNSUPPORTED | {
        "echo": _no_op(False), "suffix": _no_op("")}

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ApiError(400, "unsupported_value", f"one prompt per request, got {len(self.prompt)}", "prompt")
        return self.prompt[0]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatBody(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    UNSUPPORTED: ClassVar[dict[str, Callable[[Any], bool]]] = _Common.UNSUPPORTED | {
        "tools": _no_op([]), "tool_choice": _no_op("none"), "parallel_tool_calls": _no_op(),
        "functions": _no_op([]), "function_call": _no_op("none"),
        "response_format": lambda value: value is None or value == {"type": "text"},
        "modalities": _no_op(["text"]), "audio": _no_op(), "prediction": _no_op(), "reasoning_effort": _no_op(),
        "web_search_options": _no_op(), "verbosity": _no_op()}

    def check(self, max_n: int) -> None:
        super().check(max_n)
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "invalid_value", "top_logprobs needs logprobs: true", "top_logprobs")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def turns(self) -> list[dict[str, str]]:
        # OpenAI's "developer" role is the newer name of "system"; chat templates know "system".
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class PredictBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str
    user: str | int
    input: str
    k: int = Field(0, ge=0, le=64)

    UNSUPPORTED: ClassVar[dict[str, Callable[[Any], bool]]] = {}


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """Decode and check a JSON body; ``ApiError`` (400) naming the field at fault."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_request", f"the body must be a JSON object, got {type(data).__name__}")
    for key in list(data):
        if key in model.UNSUPPORTED:
            if not model.UNSUPPORTED[key](data[key]):
                raise ApiError(400, "unsupported_field", f"{key!r} is not supported by this server "
                               f"(got {json.dumps(data[key])[:100]})", key)
            del data[key]
        elif key not in model.model_fields:
            raise ApiError(400, "unknown_field", f"Unrecognized request argument supplied: {key}", key)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        param = _param(max(errors, key=lambda err: len(err["loc"]))["loc"])  # the most specific place
        problems = "; ".join(f"{_param(err['loc']) or 'body'}: {err['msg']}" for err in errors)
        raise ApiError(400, "invalid_value", problems, param) from None


def _param(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[str]", "list[TextPart]", "function-after", "literal_error"):
            continue  # pydantic's union-branch labels
        else:
            out += f".{part}" if out else str(part)
    return out


# -- responses ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenInfo:
    """One generated token for logprobs: its text, logprob, and the most likely alternatives."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


def completion_logprobs(tokens: list[TokenInfo], offset: int = 0) -> dict:
    """Completions' legacy ``logprobs`` object; ``offset`` is where these tokens' text starts."""
    offsets = []
    for info in tokens:
        offsets.append(offset)
        offset += len(info.token)
    return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [dict(t.top) for t in tokens], "text_offset": offsets}


def chat_logprobs(tokens: list[TokenInfo]) -> dict:
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [entry(t.token, t.logprob) | {"top_logprobs": [entry(s, lp) for s, lp in t.top]}
                        for t in tokens], "refusal": None}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
