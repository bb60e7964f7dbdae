"""User identity: one strict pattern, checked once at the edge, before any path is built."""

from __future__ import annotations

import re

from oppu.errors import UserIdError

USER_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")


def validate_user_id(user_id: object) -> str:
    """Return ``user_id`` as a string if it matches the strict pattern, else raise UserIdError.

    Letters, digits, ``.``, ``_`` and ``-``; 1 to 128 characters; ``.`` and ``..`` alone are
    refused because they are path components. LaMP's numeric ids pass (ints are accepted as text).
    """
    if isinstance(user_id, bool) or not isinstance(user_id, str | int):
        raise UserIdError(f"user id must be a string, got {type(user_id).__name__}")
    text = str(user_id)
    if not USER_ID_PATTERN.fullmatch(text) or text in (".", ".."):
        raise UserIdError(
            f"invalid user id {text[:64]!r}: use 1-128 letters, digits, '.', '_' or '-'")
    return text
