"""Read and validate LaMP files (official and the OPPU authors' per-user JSON) into ``UserData``.

Every record is checked before anything is built from it, and every error names the file, the
record id and the field (``DataError(file=, record=, field=, user=)``). With
``collect_errors=True`` a reader keeps going past bad records: users with a bad record are
dropped and ``(users, errors)`` is returned, so one bad user does not sink a whole run. Errors
that make a whole file unreadable (malformed JSON, wrong top-level shape, another task's
outputs) always raise.

Readers return every user with role ``"base"``; roles are chosen afterwards
(``oppu.data.dataset.assign_roles`` or ``oppu prepare``). The checks of single records are
``oppu.data.lamp_validation``'s; here are the files' shapes and how records make users.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

from oppu import fsutil
from oppu.data.lamp_validation import (
    Collector,
    Where,
    merge_history,
    read_input,
    read_item,
    read_output,
    read_profile,
    record_id,
    user_of,
)
from oppu.data.records import HistoryItem, Query, UserData
from oppu.errors import ConfigError, DataError

if TYPE_CHECKING:
    from oppu.tasks import Task


def _load_json(path: str | Path) -> Any:
    try:
        fs, fs_path = fsutil.filesystem(str(path))
        with fs.open(fs_path, "rt", encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise DataError("file not found", file=str(path)) from None
    except json.JSONDecodeError as exc:
        raise DataError(f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}",
                        file=str(path)) from None
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text: {exc}", file=str(path)) from None


def _visible_history(profile: list[HistoryItem], position: dict[str, int]) -> int:
    return max((position[item.id] + 1 for item in profile), default=0)


def _lamp_task_names_match(task: Task, file_task: str) -> bool:
    from oppu.tasks import get_task

    # LaMP's own releases call the movie-tagging (and, earlier, news) task plain "LaMP_2".
    if file_task.replace("-", "_").upper() == "LAMP_2":
        return task.lamp_name.upper().startswith("LAMP_2")
    try:
        return get_task(file_task).name == task.name
    except ConfigError:
        return False


def _read_golds(task: Task, outputs_path: str, errors: Collector) -> dict[str, str | None]:
    """Gold outputs by question id; ``None`` for a gold whose record is bad."""
    raw = _load_json(outputs_path)
    if not isinstance(raw, dict) or not isinstance(raw.get("golds"), list):
        raise DataError('an outputs file must be an object {"task": ..., "golds": [...]}',
                        file=outputs_path, field="golds")
    file_task = raw.get("task")
    if not isinstance(file_task, str) or not _lamp_task_names_match(task, file_task):
        raise DataError(f"outputs are for task {file_task!r}, not {task.name} ({task.lamp_name})",
                        file=outputs_path, field="task")
    golds: dict[str, str | None] = {}
    for index, gold in enumerate(raw["golds"]):
        if not isinstance(gold, dict):
            errors.add(f"a gold must be an object, got {type(gold).__name__}", file=outputs_path,
                       record=f"#{index}")
            continue
        gold_id = record_id(gold.get("id"))
        if gold_id is None:
            errors.add(f"a gold needs an 'id' (string), got {gold.get('id')!r}", file=outputs_path,
                       record=f"#{index}", field="id")
            continue
        where = Where(outputs_path, gold_id, None, f"#gold:{gold_id}")
        if gold_id in golds:
            errors.add("duplicate gold id", file=outputs_path, record=gold_id, field="id")
            golds[gold_id] = None
            continue
        golds[gold_id] = read_output(gold, "output", where, errors)
    return golds


@dataclass
class _Question:
    id: str
    input: str
    profile: list[HistoryItem]


@overload
def read_lamp(task: Task, questions_path: str | Path, outputs_path: str | Path, *,
              collect_errors: Literal[False] = False) -> list[UserData]: ...
@overload
def read_lamp(task: Task, questions_path: str | Path, outputs_path: str | Path, *,
              collect_errors: Literal[True]) -> tuple[list[UserData], list[DataError]]: ...
def read_lamp(task: Task, questions_path: str | Path, outputs_path: str | Path, *,
              collect_errors: bool = False) -> list[UserData] | tuple[list[UserData], list[DataError]]:
    """Users of an official LaMP split (``*_questions.json`` + ``*_outputs.json``).

    Queries are grouped into users by ``user_id`` (time-based split), else one question is one
    user whose id is the question id. A user's history is the union of its queries' profiles,
    deduplicated by item id and sorted by date where the items carry dates; a query's
    ``visible_history`` is how many leading history items its own profile reaches.
    Users come in order of their first question.
    """
    errors = Collector(strict=not collect_errors)
    questions_file, outputs_file = str(questions_path), str(outputs_path)
    raw_questions = _load_json(questions_file)
    if not isinstance(raw_questions, list):
        raise DataError(f"a questions file must be a JSON list, got {type(raw_questions).__name__}",
                        file=questions_file)
    golds = _read_golds(task, outputs_file, errors)

    questions_by_user: dict[str, list[_Question]] = {}
    shown_user: dict[str, str | None] = {}
    user_of_question: dict[str, str] = {}
    for index, raw in enumerate(raw_questions):
        if not isinstance(raw, dict):
            errors.add(f"a question must be an object, got {type(raw).__name__}",
                       file=questions_file, record=f"#{index}")
            continue
        question_id = record_id(raw.get("id"))
        key, user = user_of(raw, question_id, index, questions_file, errors)
        questions_by_user.setdefault(key, [])
        shown_user.setdefault(key, user)
        where = Where(questions_file, question_id or f"#{index}", user, key)
        if question_id is None:
            errors.at(where, f"a question needs an 'id' (string), got {raw.get('id')!r}", "id")
            continue
        if question_id in user_of_question:
            first_key = user_of_question[question_id]
            for dup_key in dict.fromkeys((first_key, key)):
                errors.add("duplicate question id", file=questions_file, record=question_id,
                           field="id", user=shown_user[dup_key], user_key=dup_key)
            continue
        user_of_question[question_id] = key
        text = read_input(task, raw, where, errors)
        profile = read_profile(task, raw, where, errors)
        if question_id not in golds:
            errors.at(where, f"question has no gold output in {outputs_file}", "output")
        elif golds[question_id] is None:
            errors.at(where, f"the question's gold record in {outputs_file} is bad (see its error)",
                      "output")
        if text is not None and profile is not None:
            questions_by_user[key].append(_Question(question_id, text, profile))

    for gold_id in golds:
        if gold_id not in user_of_question:
            errors.add("gold output has no question in " + questions_file, file=outputs_file,
                       record=gold_id, field="id")

    users = []
    for key, questions in questions_by_user.items():
        if key in errors.bad_users:
            continue
        history = merge_history([(q.id, q.profile) for q in questions], questions_file, key, errors)
        if history is None:
            continue
        position = {item.id: index for index, item in enumerate(history)}
        queries = [Query(id=q.id, input=q.input, gold=golds[q.id],
                         visible_history=_visible_history(q.profile, position)) for q in questions]
        users.append(UserData(user_id=key, role="base", history=history, queries=queries))
    return (users, errors.errors) if collect_errors else users


@overload
def read_oppu_format(task: Task, path: str | Path, *,
                     collect_errors: Literal[False] = False) -> list[UserData]: ...
@overload
def read_oppu_format(task: Task, path: str | Path, *,
                     collect_errors: Literal[True]) -> tuple[list[UserData], list[DataError]]: ...
def read_oppu_format(task: Task, path: str | Path, *, collect_errors: bool = False
                     ) -> list[UserData] | tuple[list[UserData], list[DataError]]:
    """Users of the OPPU authors' per-user JSON (``user_top_100_history.json``, ``user_others.json``).

    Each entry is ``{"user_id", "profile": [item...], "query": [{"id", "input", "gold"}...]}``
    with the profile already in time order, which is kept. Every query sees the whole profile
    (these are the users' test queries, later than all their history). An entry without
    ``query`` is a user with history only.
    """
    errors = Collector(strict=not collect_errors)
    file = str(path)
    raw_users = _load_json(file)
    if not isinstance(raw_users, list):
        raise DataError(f"a per-user file must be a JSON list, got {type(raw_users).__name__}",
                        file=file)
    users = []
    seen_users: set[str] = set()
    seen_queries: dict[str, tuple[str, str | None]] = {}
    for index, raw in enumerate(raw_users):
        if not isinstance(raw, dict):
            errors.add(f"a user entry must be an object, got {type(raw).__name__}", file=file,
                       record=f"#{index}")
            continue
        key, user = user_of({"user_id": raw.get("user_id")}, None, index, file, errors)
        where = Where(file, user or f"#{index}", user, key)
        if key in seen_users:
            errors.at(where, "duplicate user id", "user_id")
            continue
        seen_users.add(key)
        profile = read_profile(task, raw, where, errors)
        history = None
        if profile is not None:
            history = merge_history([(where.record, profile)], file, key, errors,
                                     sort_by_date=False)

        raw_queries = raw.get("query", [])
        if not isinstance(raw_queries, list):
            errors.at(where, f"'query' must be a list, got {type(raw_queries).__name__}", "query")
            raw_queries = []
        queries = []
        for q_index, raw_query in enumerate(raw_queries):
            label = f"query[{q_index}]"
            if not isinstance(raw_query, dict):
                errors.at(where, f"a query must be an object, got {type(raw_query).__name__}", label)
                continue
            query_id = record_id(raw_query.get("id"))
            if query_id is None:
                errors.at(where, f"a query needs an 'id' (string), got {raw_query.get('id')!r}",
                          f"{label}.id")
                continue
            query_where = Where(file, query_id, user, key)
            if query_id in seen_queries:
                first_key, first_user = seen_queries[query_id]
                for dup_key, dup_user in dict.fromkeys(((first_key, first_user), (key, user))):
                    errors.add("duplicate query id", file=file, record=query_id, field=f"{label}.id",
                               user=dup_user, user_key=dup_key)
                continue
            seen_queries[query_id] = (key, user)
            text = read_input(task, raw_query, query_where, errors)
            gold = read_output(raw_query, "gold", query_where, errors)
            if text is not None and gold is not None:
                queries.append(Query(id=query_id, input=text, gold=gold,
                                     visible_history=len(history or [])))
        if history is not None and key not in errors.bad_users:
            users.append(UserData(user_id=key, role="base", history=history, queries=queries))
    users = [user for user in users if user.user_id not in errors.bad_users]
    return (users, errors.errors) if collect_errors else users


def read_history(task: Task, source: str | Path | list, *, user: str, file: str | None = None,
                 collect_errors: bool = False) -> list[HistoryItem] | tuple[list[HistoryItem], list[DataError]]:
    """One user's new history items: a JSON list of profile items, as in a LaMP question's
    ``"profile"`` (``[{"id", <the task's item fields>, "date"?}, ...]``).

    ``source`` is the file (path or URI) or the already-parsed list (an HTTP body's ``history``;
    ``file`` then names it in errors). Each item is validated as ``oppu prepare`` validates a
    profile item; an error names the file, the item (its id, else ``#index``) and the field
    (``profile[i].<field>``). Items repeated with the same id and content count once; the same id
    with other content is an error. Dated items are sorted by date when every item has one.
    Queries are not history: an entry with an ``input`` (a LaMP question) is refused.
    """
    errors = Collector(strict=not collect_errors)
    where_file = file or ("<request>" if isinstance(source, list) else str(source))
    raw = _load_json(source) if not isinstance(source, list) else source
    if isinstance(raw, dict) and "profile" in raw:
        raise DataError("expected a JSON list of profile items, got an object with a 'profile' (pass "
                        "that list itself)", file=where_file)
    if not isinstance(raw, list):
        raise DataError(f"history must be a JSON list of profile items, got {type(raw).__name__}",
                        file=where_file)
    items: list[HistoryItem] = []
    for index, entry in enumerate(raw):
        record = (record_id(entry.get("id")) if isinstance(entry, dict) else None) or f"#{index}"
        where = Where(where_file, record, user, user)
        if isinstance(entry, dict) and "input" in entry:
            errors.at(where, "a query (it has 'input'), not a history item: queries are not accepted "
                      "here", f"profile[{index}].input")
            continue
        item = read_item(task, entry, f"profile[{index}]", where, errors)
        if item is not None:
            items.append(item)
    history = None
    if not errors.errors:
        history = merge_history([(item.id, [item]) for item in items], where_file, user, errors)
    history = history or []
    return (history, errors.errors) if collect_errors else history
