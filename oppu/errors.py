"""Errors that carry enough context for a user to find and fix the bad input."""

from __future__ import annotations


class OppuError(Exception):
    """Base class of every error this package raises on purpose."""


class DataError(OppuError):
    """A bad input record: names the file, the record id and the field."""

    def __init__(self, message: str, *, file: str | None = None, record: str | None = None,
                 field: str | None = None, user: str | None = None):
        self.file, self.record, self.field, self.user = file, record, field, user
        where = [f"{k}={v!r}" for k, v in (("file", file), ("user", user), ("record", record),
                                              ("field", field)) if v is not None]
        super().__init__(f"{message} ({', '.join(where)})" if where else message)


class ConfigError(OppuError):
    """A bad configuration value: names the key and the value."""


class UserIdError(OppuError, ValueError):
    """A user id that fails the strict pattern; it never reaches a path."""


class AdapterError(OppuError):
    """A missing, corrupt, incomplete or mismatched adapter in the store."""


class AdapterNotFound(AdapterError):
    """No complete adapter version exists for the key."""


class AdapterIntegrityError(AdapterError):
    """An adapter whose files do not match its manifest (sha256, base fingerprint)."""


class UserErasedError(OppuError):
    """The user was erased (``oppu users delete``): nothing of theirs may be trained or published
    until ``oppu users restore``."""


class NonFiniteError(OppuError):
    """A user's training loss, gradient or adapter weights became NaN or infinite: names the user and step."""

    def __init__(self, message: str, *, user: str | None = None, step: int | None = None):
        self.user, self.step = user, step
        super().__init__(message)


class StageFailed(OppuError):
    """A stage ran to its end, but more of its units failed than its threshold allows
    (``users.max_failed_users``, ``eval.max_failed_queries``): names how many and which."""


def name_list(names: list[str], shown: int = 20) -> str:
    """``names`` comma-separated for an error line: the first ``shown`` of them and how many more."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
