"""Adapter deletions (and rollbacks) broadcast to every model replica through one named Ray actor.

``DELETE /v1/users/{user}/adapter`` removes the files from the store, then records the user
here; each model replica asks for the deletions it has not seen before it serves a request and
evicts those users from its caches, so the request after a deletion gets 404 on every replica.
``POST /v1/users/{user}/adapter/rollback`` records the user the same way once the store names the
older version current: the eviction makes every replica read the current version again at the
user's next request. (Deletions and rollbacks made outside the app, e.g. from the command line,
are noticed within the adapter cache's ``adapter_check_ttl_s``.)

The actor is a fast path, not a dependency: ``DeletionEvents`` gives up on it after a short
timeout or when it is dead, lets the request go on, and looks it up (re-creating it) next time.
A deletion it missed is still honoured, through the store, within ``adapter_check_ttl_s``.
"""

from __future__ import annotations

import asyncio
import logging

import ray

logger = logging.getLogger(__name__)

NAMESPACE = "oppu_serve"


@ray.remote(num_cpus=0)
class AdapterEvents:
    """An append-only log of deleted users, read by sequence number."""

    def __init__(self) -> None:
        self._deleted: list[str] = []

    def record_deletion(self, user: str) -> int:
        self._deleted.append(user)
        return len(self._deleted)

    def deletions_since(self, seen: int) -> tuple[int, list[str]]:
        return len(self._deleted), self._deleted[seen:]


def events_actor(app_name: str):
    """The app's event log, created by whichever replica asks first."""
    return AdapterEvents.options(name=f"adapter_events_{app_name}", namespace=NAMESPACE,
                                 get_if_exists=True, lifetime="detached").remote()


class DeletionEvents:
    """The app's deletion log as seen from one replica, surviving the log actor's death."""

    def __init__(self, app_name: str, timeout_s: float = 2.0):
        self.app_name, self.timeout_s = app_name, timeout_s
        self.seen = 0
        self._actor = None

    async def record(self, user: str) -> bool:
        """Tell every replica that ``user``'s adapters are gone; False when the log is unreachable."""
        return await self._call(lambda actor: actor.record_deletion.remote(user)) is not None

    async def new_deletions(self) -> list[str]:
        """Users deleted since the last call ([] when the log is unreachable)."""
        answer = await self._call(lambda actor: actor.deletions_since.remote(self.seen))
        if answer is None:
            return []
        total, deleted = answer
        if total < self.seen:  # a new log (the old actor died): everything in it is news
            answer = await self._call(lambda actor: actor.deletions_since.remote(0))
            total, deleted = answer if answer is not None else (0, [])
        self.seen = total
        return deleted

    async def _call(self, method):
        try:
            if self._actor is None:
                self._actor = events_actor(self.app_name)
            return await asyncio.wait_for(method(self._actor), self.timeout_s)
        except Exception as exc:  # a dead or unreachable actor (RayActorError, timeout, ...)
            logger.warning("deletion log %s unreachable (%s); deletions reach this replica through the "
                           "store's adapter check instead", self.app_name, type(exc).__name__)
            self._actor = None
            return None
