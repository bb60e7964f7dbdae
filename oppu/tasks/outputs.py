"""Turning a model's generation into the prediction LaMP scores.

Parsing is lenient (a label in other case, a label followed by an explanation, a rating inside a
sentence); scoring stays strict and exactly LaMP's, so whatever these parsers cannot map is
passed on as text and scores as LaMP scores an unknown prediction.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field


def first_line(text: str) -> str:
    """The first line of the stripped text (a generation often runs on past its answer)."""
    stripped = text.strip()
    return stripped.split("\n", 1)[0].strip()


@dataclass(frozen=True)
class LabelParser:
    """A classification label: exact, case-insensitive, or the label the answer starts with."""

    labels: tuple[str, ...]
    aliases: Mapping[str, str] = field(default_factory=dict)  # other spellings -> label

    def __call__(self, text: str) -> str:
        answer = first_line(text)
        spellings = [(label, label) for label in self.labels] + list(self.aliases.items())
        for spelling, label in spellings:
            if answer == spelling:
                return label
        folded = answer.casefold()
        for spelling, label in spellings:
            if folded == spelling.casefold():
                return label
        # Longest first so "dark comedy ..." is not read as a shorter label that prefixes it; the
        # label must end at a word boundary ("1." is [1], "12" is not).
        for spelling, label in sorted(spellings, key=lambda pair: -len(pair[0])):
            prefix = spelling.casefold()
            rest = folded[len(prefix):]
            if folded.startswith(prefix) and not rest[:1].isalnum():
                return label
        return answer


_RATING_DIGIT = re.compile(r"[1-5]")


def parse_rating(text: str) -> str:
    """The first digit 1..5 in the text; else the stripped text, which LaMP scores as unparseable."""
    match = _RATING_DIGIT.search(text)
    return match.group(0) if match else text.strip()


@dataclass(frozen=True)
class TextParser:
    """Generated text: first line, without the field name the prompt ended in if it was echoed."""

    echoed_prefixes: tuple[str, ...]

    def __call__(self, text: str) -> str:
        answer = first_line(text)
        for prefix in self.echoed_prefixes:
            if answer.casefold().startswith(prefix.casefold()):
                return answer[len(prefix):].strip()
        return answer
