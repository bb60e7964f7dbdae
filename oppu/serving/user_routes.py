"""What the ingress's per-user routes do once the caller may act for the user: history items added
to the data set (``PUT /v1/users/{user}/history``), an adapter rolled back
(``POST /v1/users/{user}/adapter/rollback``) and the user erased (``DELETE /v1/users/{user}``).

Bodies are checked here (400 naming the field); the store's and the data set's own refusals become
their HTTP errors. The blocking calls run in a thread (the ingress's ``asyncio.to_thread``).
"""

from __future__ import annotations

import logging
from typing import Any

from oppu.errors import AdapterNotFound
from oppu.serving.openai_api import ApiError

logger = logging.getLogger(__name__)

SHOWN_HISTORY_ERRORS = 20


def history_items(body: Any) -> list:
    """The items of a history body, which must be ``{"history": [profile items]}`` and nothing else."""
    if not isinstance(body, dict) or not isinstance(body.get("history"), list) or set(body) != {"history"}:
        raise ApiError(400, "invalid_value", 'the body must be {"history": [profile items]} and nothing '
                       "else", "history")
    return body["history"]


def add_history(histories, store_root: str, user: str, items: list) -> dict:
    """Add ``items`` to ``user``'s row (``UserHistories.add``); the route's answer. An erased user is
    409 ``user_erased``, bad items 400 ``invalid_history`` naming them."""
    from oppu.errors import UserErasedError
    from oppu.user_history import HistoryErrors

    try:
        update = histories.add(store_root, user, items)
    except UserErasedError as exc:
        raise ApiError(409, "user_erased", str(exc), "user") from None
    except HistoryErrors as exc:
        shown = "; ".join(str(error) for error in exc.errors[:SHOWN_HISTORY_ERRORS])
        more = (f" (and {len(exc.errors) - SHOWN_HISTORY_ERRORS} more)"
                if len(exc.errors) > SHOWN_HISTORY_ERRORS else "")
        raise ApiError(400, "invalid_history", f"{len(exc.errors)} bad history item(s): {shown}{more}",
                       exc.field) from None
    return {"user": user, "created": update.created, "role": update.user.role, "added": update.added,
            "already_there": update.already_there, "n_history": len(update.user.history)}


def rollback_version(body: Any) -> str:
    """The version id of a rollback body, which must be ``{"version": "<version id>"}`` and nothing else."""
    if not isinstance(body, dict) or set(body) != {"version"} or not isinstance(body["version"], str):
        raise ApiError(400, "invalid_value", 'the body must be {"version": "<version id>"} and nothing else',
                       "version")
    return body["version"]


def roll_back(store, key, version: str) -> dict:
    """``store.rollback(key, version)``; the route's answer. A version not there is 404, one whose
    files do not verify 422, one a newer publish overtook 409."""
    from oppu.errors import AdapterError, AdapterIntegrityError

    try:
        manifest = store.rollback(key, version)
    except AdapterNotFound as exc:
        raise ApiError(404, "version_not_found", str(exc), "version") from None
    except AdapterIntegrityError as exc:
        raise ApiError(422, "adapter_unusable", str(exc), "version") from None
    except AdapterError as exc:  # a newer version was published meanwhile
        raise ApiError(409, "conflict", str(exc), "version") from None
    return {"user": key.user, "variant": key.variant, "version": manifest.version,
            "created": manifest.created, "trainer": manifest.trainer, "current": True}


def erase(store, histories, tokens, user: str) -> tuple[int, int | None]:
    """A tombstone first (a publish racing this delete undoes itself), then the user's history
    forgotten, every adapter version deleted and their tokens revoked: ``(versions deleted, tokens
    revoked)``, None for the tokens where the token root is read-only here."""
    from oppu.erasure import add_tombstone

    add_tombstone(store.root_uri, user)
    if histories is not None:
        histories.forget(user)
    deleted = store.delete_user(user)
    try:
        revoked = tokens.revoke(user)
    except PermissionError:  # the shipped serving keys cannot write the token root (docs/cluster.md)
        logger.warning("erase: the token root is read-only here; revoke with `oppu token revoke`")
        revoked = None
    return deleted, revoked
