"""One LaMP record at a time, checked before anything is built from it: ids, text fields, dates,
profile items, a query's input, a user's id, and a user's history merged from their profiles.

Every error names the file, the record id and the field (``DataError(file=, record=, field=,
user=)``) and goes to a ``Collector``: raised at once (strict), or gathered per user so the user
is dropped (``collect_errors=True``). The readers of whole files are ``oppu.data.lamp_io``'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from oppu.data.records import HistoryItem, parse_date
from oppu.errors import DataError, UserIdError
from oppu.ids import validate_user_id

if TYPE_CHECKING:
    from oppu.tasks import Task

# Profile fields that LaMP stores as numbers in some releases (LaMP-3 review scores).
NUMERIC_TEXT_FIELDS = frozenset({"score"})


@dataclass
class Collector:
    """Gathers errors per user; in strict mode the first error raises."""

    strict: bool
    errors: list[DataError] = field(default_factory=list)
    bad_users: set[str] = field(default_factory=set)  # grouping keys of users to drop

    def add(self, message: str, *, file: str, record: str | None, field: str | None = None,
            user: str | None = None, user_key: str | None = None) -> None:
        error = DataError(message, file=file, record=record, field=field, user=user)
        if self.strict:
            raise error
        self.errors.append(error)
        if user_key is not None:
            self.bad_users.add(user_key)

    def at(self, where: Where, message: str, field: str | None = None) -> None:
        """An error in the record ``where`` points at; its user is dropped."""
        self.add(message, file=where.file, record=where.record, field=field, user=where.user,
                 user_key=where.user_key)


@dataclass
class Where:
    """The record being validated, for error messages."""

    file: str
    record: str
    user: str | None
    user_key: str



def record_id(value: Any) -> str | None:
    """LaMP ids are strings; some files carry ints. Anything else is not an id."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    text = str(value).strip()
    return text or None


def read_text(raw: dict, name: str, where: Where, errors: Collector, *,
               field_label: str | None = None) -> str | None:
    label = field_label or name
    if name not in raw:
        errors.at(where, f"missing field {name!r}", label)
        return None
    value = raw[name]
    if name in NUMERIC_TEXT_FIELDS and isinstance(value, int | float) and not isinstance(value, bool):
        return str(int(value)) if float(value).is_integer() else str(value)
    if not isinstance(value, str):
        errors.at(where, f"{name!r} must be a string, got {type(value).__name__}", label)
        return None
    return value


def read_output(raw: dict, name: str, where: Where, errors: Collector) -> str | None:
    """A gold output: text, though some files store LaMP-3 ratings as numbers."""
    value = raw.get(name)
    if isinstance(value, int | float) and not isinstance(value, bool):
        raw = {**raw, name: str(int(value)) if float(value).is_integer() else str(value)}
    return read_text(raw, name, where, errors)


def read_item(task: Task, raw: Any, label: str, where: Where,
               errors: Collector) -> HistoryItem | None:
    """One profile item, or ``None`` (with errors added) when it is bad."""
    if not isinstance(raw, dict):
        errors.at(where, f"a profile item must be an object, got {type(raw).__name__}", label)
        return None
    item_id = record_id(raw.get("id"))
    if item_id is None:
        errors.at(where, f"profile item needs an 'id' (string), got {raw.get('id')!r}", f"{label}.id")
    fields = {name: read_text(raw, name, where, errors, field_label=f"{label}.{name}")
              for name in task.item_fields}
    date, date_ok = None, True
    if raw.get("date") is not None:
        date_value = raw["date"]
        if isinstance(date_value, int) and not isinstance(date_value, bool):
            date_value = str(date_value)
        if not isinstance(date_value, str):
            errors.at(where, f"'date' must be a string, got {type(date_value).__name__}", f"{label}.date")
            date_ok = False
        else:
            try:
                parse_date(date_value)
                date = date_value
            except ValueError:
                errors.at(where, f"'date' is not a date: {date_value[:64]!r}", f"{label}.date")
                date_ok = False
    if item_id is None or not date_ok or any(value is None for value in fields.values()):
        return None
    return HistoryItem(id=item_id, fields=fields, date=date)


def read_profile(task: Task, raw: dict, where: Where, errors: Collector,
                  name: str = "profile") -> list[HistoryItem] | None:
    if name not in raw:
        errors.at(where, f"missing field {name!r}", name)
        return None
    if not isinstance(raw[name], list):
        errors.at(where, f"{name!r} must be a list, got {type(raw[name]).__name__}", name)
        return None
    items = [read_item(task, item, f"{name}[{index}]", where, errors)
             for index, item in enumerate(raw[name])]
    if any(item is None for item in items):
        return None
    return items


def read_input(task: Task, raw: dict, where: Where, errors: Collector) -> str | None:
    text = read_text(raw, "input", where, errors)
    if text is None:
        return None
    try:
        task.parse_query(text)
    except (DataError, ValueError, KeyError) as exc:
        reason = str(exc).removesuffix(" (field='input')")
        errors.at(where, f"input is not a {task.name} query: {reason}", "input")
        return None
    return text


def merge_history(profiles: list[tuple[str, list[HistoryItem]]], where_file: str, user: str,
                   errors: Collector, *, sort_by_date: bool = True) -> list[HistoryItem] | None:
    """Union of the queries' profiles, deduplicated by item id, oldest first.

    Sorted by date when every item has one (stable, so ties keep first-seen order); otherwise
    kept in first-seen order, because a partial ordering would interleave dated and undated
    items arbitrarily.
    """
    merged: dict[str, HistoryItem] = {}
    ok = True
    for query_id, profile in profiles:
        for item in profile:
            known = merged.get(item.id)
            if known is None:
                merged[item.id] = item
            elif known != item:
                errors.add(f"profile item {item.id!r} appears twice for this user with different "
                           "content", file=where_file, record=query_id, field="profile",
                           user=user, user_key=user)
                ok = False
    if not ok:
        return None
    history = list(merged.values())
    if sort_by_date and all(item.date is not None for item in history):
        history.sort(key=lambda item: parse_date(item.date))
    return history


def user_of(raw: dict, question_id: str | None, index: int, file: str,
              errors: Collector) -> tuple[str, str | None]:
    """The grouping key and displayed user of a question (``user_id``, else the question id)."""
    if "user_id" in raw:
        shown = str(raw["user_id"])[:64]
        try:
            return validate_user_id(raw["user_id"]), shown
        except UserIdError as exc:
            key = f"#invalid-user:{index}"  # ':' never appears in a valid id
            errors.add(str(exc), file=file, record=question_id or f"#{index}", field="user_id",
                       user=shown, user_key=key)
            return key, shown
    if question_id is None:
        return f"#invalid-user:{index}", None
    try:
        return validate_user_id(question_id), question_id
    except UserIdError as exc:
        key = f"#invalid-user:{index}"
        errors.add(f"the question id is the user id here and {exc}", file=file,
                   record=question_id, field="id", user=question_id, user_key=key)
        return key, question_id
