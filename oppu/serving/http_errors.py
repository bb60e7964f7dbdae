"""What an exception means over HTTP: its status, OpenAI error code and body field, and the JSON
error response in OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``).

The ingress (``oppu.serving.ingress``) answers every error through :func:`as_api_error`, so
a status is decided in one table (``ERROR_STATUS``).
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from oppu.errors import AdapterError, AdapterNotFound, ConfigError, DataError, OppuError, UserIdError
from oppu.serving.auth import AuthError, ForbiddenError
from oppu.serving.openai_api import ApiError, error_body
from oppu.serving.replica import QueueFull, RequestTimeout, RequestTooLarge
from oppu.serving.sequences import SequenceTooLong


class ModelNotFound(OppuError):
    """A ``model`` that is neither the base id nor ``<base id>:<user>`` (HTTP 404)."""


class UnknownHistory(OppuError):
    """``/v1/predict`` with k > 0 for a user the data set has no history for (HTTP 404)."""


# (error class, HTTP status, code, the body field it is about)
ERROR_STATUS: list[tuple[type[Exception], int, str, str | None]] = [
    (UserIdError, 400, "invalid_user_id", "model"),
    (RequestTooLarge, 400, "request_too_large", None),
    (SequenceTooLong, 400, "request_too_large", "max_tokens"),
    (DataError, 400, "invalid_input", "input"),
    (ConfigError, 400, "invalid_request", None),
    (AuthError, 401, "unauthorized", None),
    (ForbiddenError, 403, "forbidden", "model"),
    (AdapterNotFound, 404, "adapter_not_found", "model"),
    (ModelNotFound, 404, "model_not_found", "model"),
    (UnknownHistory, 404, "user_not_found", "user"),
    # Stored adapter corrupt or trained on another base: not the request's fault, and retrying
    # cannot help (a 5xx would make clients retry), so it is "unprocessable".
    (AdapterError, 422, "adapter_unusable", "model"),
    (QueueFull, 429, "queue_full", None),
    (RequestTimeout, 504, "timeout", None),
]


def as_api_error(exc: BaseException, retry_after_s: int = 1) -> ApiError:
    """The HTTP status, code and field of an exception (500 ``internal_error`` if unknown)."""
    from ray.serve.exceptions import BackPressureError

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, BackPressureError):  # Serve's own queue in front of the model replicas
        exc = QueueFull(f"the model replicas' queues are full: {exc}")
    for error_type, status, code, param in ERROR_STATUS:
        if isinstance(exc, error_type):
            param = getattr(exc, "param", None) or getattr(exc, "field", None) or param
            headers = {"Retry-After": str(retry_after_s)} if status == 429 else None
            return ApiError(status, code, str(exc), param, headers)
    return ApiError(500, "internal_error", f"{type(exc).__name__}: {exc}")


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(status_code=error.status, headers=error.headers,
                        content=error_body(error.status, error.code, error.message, error.param))
