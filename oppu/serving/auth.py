"""Bearer-token checks: a user's own token, or the operator's admin token (``OPPU_ADMIN_TOKEN``)."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from oppu.errors import OppuError
from oppu.store import TokenStore

ADMIN_TOKEN_ENV = "OPPU_ADMIN_TOKEN"


class AuthError(OppuError):
    """No usable credentials (HTTP 401)."""


class ForbiddenError(OppuError):
    """Valid credentials for someone else (HTTP 403)."""


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a user, or the admin (``user`` None)."""

    user: str | None

    @property
    def is_admin(self) -> bool:
        return self.user is None

    def require(self, user: str) -> None:
        if not self.is_admin and self.user != user:
            raise ForbiddenError(f"this token belongs to another user and may not act for user {user!r}")


class Authenticator:
    """Resolves an ``Authorization: Bearer ...`` header to a ``Caller``; calls block on the store."""

    def __init__(self, tokens: TokenStore, admin_token: str | None):
        self.tokens = tokens
        self.admin_token = admin_token or None

    def caller(self, authorization: str | None) -> Caller:
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError("missing bearer token: send 'Authorization: Bearer <token>'")
        if self.admin_token and hmac.compare_digest(token.encode(), self.admin_token.encode()):
            return Caller(user=None)
        user = self.tokens.verify(token)
        if user is None:
            raise AuthError("invalid or revoked token")
        return Caller(user=user)
