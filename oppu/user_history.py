"""A user's history in: validate LaMP profile items and add them to the prepared data set.

``oppu users add`` and the serve app's ``PUT /v1/users/{user}/history`` go through
``add_user_history`` (items validated as ``oppu prepare`` validates a profile item:
``oppu.data.lamp_io.read_history``); an erased user (``oppu users delete``) is refused.
``oppu.onboarding.train_named_users`` then trains the user.
"""

from __future__ import annotations

from pathlib import Path

from oppu.data.dataset import HistoryUpdate
from oppu.errors import DataError, UserErasedError
from oppu.ids import validate_user_id


class HistoryErrors(DataError):
    """Every bad item of one history, each a ``DataError`` naming the file, item and field."""

    def __init__(self, errors: list[DataError]):
        self.errors = errors
        first = errors[0]
        super().__init__(f"{len(errors)} bad history item(s); the first: {first}")
        self.file, self.record, self.field, self.user = first.file, first.record, first.field, first.user


def refuse_erased(store_uri: str, user: str) -> None:
    """``UserErasedError`` when ``user`` has a tombstone in the store (``oppu users delete``)."""
    from oppu.erasure import is_tombstoned

    if is_tombstoned(store_uri, user):
        raise UserErasedError(f"user {user!r} was erased (oppu users delete) and may not be added or "
                              f"trained again until `oppu users restore --user {user}` lifts the "
                              f"tombstone in {store_uri}")


def add_user_history(data_uri: str, store_uri: str, user: str, history: str | Path | list, *,
                     file: str | None = None) -> HistoryUpdate:
    """Validate ``history`` (a file of LaMP profile items, or the parsed list) and add it to the
    user's row of the data set at ``data_uri``; a new user joins as a test user.

    Raises ``UserErasedError`` for an erased user, ``HistoryErrors`` listing every bad item, and
    ``DataError`` for an item id the user already has with other content.
    """
    from oppu.data.dataset import add_history, dataset_json_path
    from oppu.data.lamp_io import read_history
    from oppu.fsutil import read_json
    from oppu.tasks import get_task

    user = validate_user_id(user)
    refuse_erased(store_uri, user)
    meta_path = dataset_json_path(data_uri)
    try:
        task = get_task(read_json(meta_path)["task"])
    except FileNotFoundError:
        raise DataError("not a prepared data set: dataset.json is missing (run `oppu prepare`)",
                        file=meta_path) from None
    source = file or ("<request>" if isinstance(history, list) else str(history))
    items, errors = read_history(task, history, user=user, file=source, collect_errors=True)
    if errors:
        raise HistoryErrors(errors)
    return add_history(data_uri, user, items, source=source)
