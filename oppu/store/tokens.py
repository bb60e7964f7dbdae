"""Per-user bearer tokens for the serving API; only their sha256 hashes are ever stored.

Layout under the root URI::

    {root}/_auth/{user}.json              {"user", "tokens": [{"sha256", "created"}]}  (source of truth)
    {root}/_auth/by-hash/{sha256}.json    {"user", "created"}                           (lookup index)

The root is the serve app's ``tokens`` (default: its adapter ``store``). On a cluster it is a
bucket or prefix of its own, reached with credentials of its own: ``OPPU_TOKENS_AWS_ACCESS_KEY_ID``
and ``OPPU_TOKENS_AWS_SECRET_ACCESS_KEY`` (and ``..._SESSION_TOKEN``), when set, replace the
``AWS_*`` ones for this store only. So the adapter store's write credentials (training jobs; the
serving pods' delete right) cannot mint a token, and the serving pods get read-only ones here.

``verify`` finds the user through the index (one read, however many users) and then requires
the hash in that user's own file, so a token whose index entry outlived a revoke, or whose
user-file entry was lost to two concurrent writers, is refused: the store fails closed.
"""

from __future__ import annotations

import hmac
import json
import os
import re
import secrets
from datetime import UTC, datetime
from typing import Any

from oppu.errors import UserIdError
from oppu.ids import validate_user_id
from oppu.store.objects import open_root, sha256_hex, write_atomic

TOKEN_PREFIX = "oppu_"
TOKEN_PATTERN = re.compile(rf"{TOKEN_PREFIX}[A-Za-z0-9_-]{{43}}")
AUTH_DIR = "_auth"


# s3fs option -> the environment variable holding the token store's own credential.
CREDENTIAL_ENV = {"key": "OPPU_TOKENS_AWS_ACCESS_KEY_ID", "secret": "OPPU_TOKENS_AWS_SECRET_ACCESS_KEY",
                  "token": "OPPU_TOKENS_AWS_SESSION_TOKEN"}


def token_storage_options(root_uri: str, given: dict[str, Any] | None = None,
                          environ: dict[str, str] | None = None) -> dict[str, Any]:
    """``given``, plus the token store's own S3 credentials from ``OPPU_TOKENS_AWS_*`` where set."""
    environ = os.environ if environ is None else environ
    options = dict(given or {})
    if root_uri.startswith(("s3://", "s3a://")):
        for option, variable in CREDENTIAL_ENV.items():
            if environ.get(variable):
                options.setdefault(option, environ[variable])
    return options


def token_hash(token: str) -> str:
    return sha256_hex(token.encode())


class TokenStore:
    """Create, verify, rotate and revoke users' API tokens under ``root_uri``."""

    def __init__(self, root_uri: str, storage_options: dict[str, Any] | None = None):
        self.root_uri = root_uri
        self._fs, root = open_root(root_uri, token_storage_options(root_uri, storage_options))
        self._auth = f"{root}/{AUTH_DIR}"

    def __repr__(self) -> str:
        return f"TokenStore({self.root_uri!r})"

    def create(self, user: str) -> str:
        """A new token for ``user`` (existing ones stay valid). The plain token is not kept."""
        user = validate_user_id(user)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        digest = token_hash(token)
        created = datetime.now(UTC).isoformat()
        write_atomic(self._fs, self._index_path(digest),
                     json.dumps({"user": user, "created": created}).encode())
        entries = self._entries(user)
        entries.append({"sha256": digest, "created": created})
        self._write_entries(user, entries)
        return token

    def rotate(self, user: str) -> str:
        """A new token for ``user``; every older one is revoked."""
        user = validate_user_id(user)
        old_entries = self._entries(user)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        digest = token_hash(token)
        created = datetime.now(UTC).isoformat()
        write_atomic(self._fs, self._index_path(digest),
                     json.dumps({"user": user, "created": created}).encode())
        self._write_entries(user, [{"sha256": digest, "created": created}])
        self._remove_index([entry["sha256"] for entry in old_entries])
        return token

    def revoke(self, user: str, token: str | None = None) -> int:
        """Revoke one token of ``user`` (or all of them when ``token`` is None); return how many."""
        user = validate_user_id(user)
        entries = self._entries(user)
        if token is None:
            revoked = entries
        else:
            digest = token_hash(token)
            revoked = [entry for entry in entries if hmac.compare_digest(entry["sha256"], digest)]
        if not revoked:
            return 0
        kept = [entry for entry in entries if entry not in revoked]
        if kept:
            self._write_entries(user, kept)
        else:
            self._fs.rm_file(self._user_path(user))
        self._remove_index([entry["sha256"] for entry in revoked])
        return len(revoked)

    def verify(self, token: str) -> str | None:
        """The user a valid token belongs to, or None for any unknown, revoked or malformed token."""
        if not isinstance(token, str) or not TOKEN_PATTERN.fullmatch(token):
            return None
        digest = token_hash(token)
        try:
            indexed = json.loads(self._fs.cat_file(self._index_path(digest)))
            user = validate_user_id(indexed["user"])
        except (FileNotFoundError, KeyError, ValueError, UserIdError):
            return None
        matches = [hmac.compare_digest(entry["sha256"], digest) for entry in self._entries(user)]
        return user if any(matches) else None

    def user_has_tokens(self, user: str) -> bool:
        return bool(self._entries(validate_user_id(user)))

    def _user_path(self, user: str) -> str:
        return f"{self._auth}/{user}.json"

    def _index_path(self, digest: str) -> str:
        return f"{self._auth}/by-hash/{digest}.json"

    def _entries(self, user: str) -> list[dict[str, str]]:
        try:
            return json.loads(self._fs.cat_file(self._user_path(user)))["tokens"]
        except FileNotFoundError:
            return []

    def _write_entries(self, user: str, entries: list[dict[str, str]]) -> None:
        write_atomic(self._fs, self._user_path(user),
                     json.dumps({"user": user, "tokens": entries}, indent=1).encode())

    def _remove_index(self, digests: list[str]) -> None:
        paths = [self._index_path(digest) for digest in digests]
        existing = [path for path in paths if self._fs.exists(path)]
        if existing:
            self._fs.rm(existing)
