"""Where LaMP's official ``input`` text keeps the query, and how to cut it out again.

LaMP ships each question as one instruction string with the query text inside. Parsing follows
the OPPU authors: the query text is everything after a fixed marker; LaMP-1 holds a paper title
and two quoted reference options.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from oppu.errors import DataError

_SNIPPET_CHARS = 80


def _snippet(text: str) -> str:
    return text if len(text) <= _SNIPPET_CHARS else text[:_SNIPPET_CHARS] + "..."


@dataclass(frozen=True)
class MarkerQuery:
    """An input of the form ``<instruction><marker><query text>``: one query field."""

    instruction: str  # the official text before the marker, including the marker's lead-in
    marker: str  # what the OPPU authors search for; the query text follows it
    field: str  # the query field name, the same as the history item's input field

    @property
    def fields(self) -> tuple[str, ...]:
        return (self.field,)

    def parse(self, lamp_input: str) -> dict[str, str]:
        position = lamp_input.find(self.marker)
        if position == -1:
            raise DataError(f"input lacks the marker {self.marker!r}: {_snippet(lamp_input)!r}",
                            field="input")
        return {self.field: lamp_input[position + len(self.marker):]}

    def render(self, query: Mapping[str, str]) -> str:
        return self.instruction + query[self.field]


_CITATION_INSTRUCTION = "which reference is related? Just answer with [1] or [2] without explanation."
# Greedy groups anchored on the fixed text between them, so quotes inside a title still parse.
_CITATION_PATTERN = re.compile(
    r'written the paper with the title "(?P<title>.*)",\s*which reference is related\?.*?'
    r'\[1\]:\s*"(?P<option1>.*)"\s*\[2\]:\s*"(?P<option2>.*)"\s*\Z',
    re.DOTALL,
)


@dataclass(frozen=True)
class CitationQuery:
    """LaMP-1: ``For an author who has written the paper with the title "T", ... [1]: "A" [2]: "B"``."""

    fields: tuple[str, ...] = ("title", "option1", "option2")

    def parse(self, lamp_input: str) -> dict[str, str]:
        match = _CITATION_PATTERN.search(lamp_input)
        if match is None:
            raise DataError(
                'input lacks \'written the paper with the title "..."\' with options [1]: "..." '
                f'[2]: "...": {_snippet(lamp_input)!r}', field="input")
        return {name: match.group(name) for name in self.fields}

    def render(self, query: Mapping[str, str]) -> str:
        return (f'For an author who has written the paper with the title "{query["title"]}", '
                f'{_CITATION_INSTRUCTION} [1]: "{query["option1"]}" [2]: "{query["option2"]}"')
