"""In-memory records of a prepared LaMP data set; one ``UserData`` per user.

The prepared data set on disk is ``users.parquet`` (one row per user, see ``oppu.data.dataset``);
these dataclasses are what every job works with after reading a row.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Literal

Role = Literal["test", "base"]


@dataclass(frozen=True)
class HistoryItem:
    """One past behaviour item of a user (a LaMP profile item)."""

    id: str
    fields: dict[str, str]  # task-specific fields, e.g. {"description": ..., "tag": ...}
    date: str | None = None  # ISO-like text where the task has dates; history is sorted by it


@dataclass(frozen=True)
class Query:
    """One query of a user: LaMP's raw ``input``, the gold output and how much history it may see."""

    id: str
    input: str
    gold: str | None
    visible_history: int  # the query may use history[:visible_history] (items before it in time)


@dataclass
class UserData:
    user_id: str
    role: Role
    history: list[HistoryItem] = field(default_factory=list)  # oldest first
    queries: list[Query] = field(default_factory=list)

    def to_row(self) -> dict:
        """The Parquet row: nested lists as JSON text so every task shares one schema."""
        return {
            "user_id": self.user_id,
            "role": self.role,
            "n_history": len(self.history),
            "n_queries": len(self.queries),
            "history": json.dumps([asdict(h) for h in self.history], ensure_ascii=False),
            "queries": json.dumps([asdict(q) for q in self.queries], ensure_ascii=False),
        }

    @classmethod
    def from_row(cls, row: dict) -> UserData:
        return cls(
            user_id=str(row["user_id"]),
            role=row["role"],
            history=[HistoryItem(**h) for h in json.loads(row["history"])],
            queries=[Query(**q) for q in json.loads(row["queries"])],
        )


_YEAR = re.compile(r"\d{4}")
_YEAR_MONTH = re.compile(r"(\d{4})[-/](\d{1,2})")


@functools.lru_cache(maxsize=1 << 16)  # a user's items recur in every query's profile
def parse_date(text: str) -> datetime:
    """A sortable naive-UTC ``datetime`` for the date formats LaMP uses.

    ISO dates and times (``2016-05-22``, ``2016-05-22T10:00:00Z``), bare years (``2005``),
    year-month (``2005-07``) and free text such as tweets' ``Tue Apr 07 02:13:08 PDT 2009``.
    Raises ``ValueError`` when the text is not a date.
    """
    text = text.strip()
    if _YEAR.fullmatch(text):
        return datetime(int(text), 1, 1)
    if match := _YEAR_MONTH.fullmatch(text):
        return datetime(int(match[1]), int(match[2]), 1)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        from dateutil import parser as date_parser

        try:
            # Time-zone abbreviations such as PDT are ambiguous; order by the local wall clock.
            return date_parser.parse(text, ignoretz=True)
        except (ValueError, OverflowError) as exc:
            raise ValueError(f"not a date: {text!r}") from exc
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    return parsed
