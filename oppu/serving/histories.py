"""Users' histories for ``/v1/predict`` (k > 0): the prepared data set, kept current.

The ingress reads ``users.parquet`` at start. A history added through this replica
(``PUT /v1/users/{user}/history``) is seen at once; one added elsewhere (``oppu users add``,
another ingress replica) within ``history_check_ttl_s``: at most that often the file's stat
(size, mtime or ETag) is compared, and the table re-read when it changed.

Erased users (``DELETE /v1/users/{user}``, ``oppu users delete``) have no history here: one
erased through this replica at once (``forget``), one erased elsewhere within the same
``history_check_ttl_s``, from one listing of the store's tombstones a check instead of two storage
reads a request.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from oppu import fsutil
from oppu.data.dataset import HistoryUpdate, read_dataset, read_users, users_parquet_path
from oppu.data.records import HistoryItem


class UserHistories:
    def __init__(self, data_uri: str, check_ttl_s: float, store_uri: str | None = None):
        self.data_uri, self.check_ttl_s, self.store_uri = data_uri, check_ttl_s, store_uri
        self._path = users_parquet_path(data_uri)
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._by_id = {user.user_id: user for user in read_dataset(data_uri).users}
        self._erased = self._tombstones()
        self._erased_here: set[str] = set()
        self._checked = time.monotonic()

    def history(self, user: str) -> list[HistoryItem]:
        """The user's current history; ``KeyError`` when the data set has no such user, or the
        user was erased."""
        with self._lock:
            if time.monotonic() - self._checked >= self.check_ttl_s:
                stamp = self._stat()
                if stamp != self._stamp:
                    self._by_id = {row.user_id: row for row in read_users(self._path)}
                    self._stamp = stamp
                # The listing holds every tombstone written before it, this replica's too; a
                # user restored since (``oppu users restore``) has a history again.
                self._erased, self._erased_here = self._tombstones(), set()
                self._checked = time.monotonic()
            if user in self._erased_here or self._erased(user):
                raise KeyError(user)
            return self._by_id[user].history

    def forget(self, user: str) -> None:
        """``user`` was erased through this replica: no history for them from now on."""
        with self._lock:
            self._erased_here.add(user)

    def add(self, store_uri: str, user: str, items: list | str | Path) -> HistoryUpdate:
        """``oppu.onboarding.add_user_history`` on this data set, seen by this replica at once."""
        from oppu.user_history import add_user_history

        with self._lock:  # one writer a replica (writers elsewhere are not locked out)
            changed_elsewhere = self._stat() != self._stamp
            update = add_user_history(self.data_uri, store_uri, user, items)
            if changed_elsewhere:  # others' additions too, not just this user's
                self._by_id = {row.user_id: row for row in read_users(self._path)}
            self._by_id[update.user.user_id] = update.user
            self._stamp, self._checked = self._stat(), time.monotonic()
            return update

    def _tombstones(self):
        from oppu.erasure import tombstone_check

        return tombstone_check(self.store_uri) if self.store_uri else (lambda user: False)

    def _stat(self) -> tuple:
        fs, path = fsutil.filesystem(self._path)
        fs.invalidate_cache(path)
        info = fs.info(path)
        return tuple(info.get(key) for key in ("size", "mtime", "ino", "ETag", "LastModified"))
