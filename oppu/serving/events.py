"""Adapter deletions broadcast to every model replica through one named Ray actor.

``DELETE /v1/users/{user}/adapter`` removes the files from the store, then records the user
here; each model replica asks for the deletions it has not seen before it serves a request and
evicts those users from its caches, so the request after a deletion gets 404 on every replica.
(Deletions made outside the app, e.g. from the command line, are noticed within the adapter
cache's ``adapter_check_ttl_s``.)
"""

from __future__ import annotations

import ray

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
