"""What every task's synthetic world provides, and the shared pieces: texts, personas, drift.

A *world* is one task's generative process. It draws users' planted preferences (a persona plus a
small personal perturbation), writes history items and queries for a user at a point in time
(``progress`` runs from 0 at the user's first item to 1 at their queries, so preferences can
drift), and knows the two reference predictions of each query: ``population`` (the best guess
knowing the generative process but not the user) and ``bayes`` (knowing the user's planted
preference).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from oppu.data.synth.vocabulary import (
    FILLER_ADJECTIVES,
    FILLER_NOUNS,
    PERSON_NAMES,
    RESEARCH_ADJECTIVES,
    RESEARCH_VERBS,
    VERBS,
)


@dataclass(frozen=True)
class SynthQuery:
    """One query: its fields (``Task.lamp_input`` turns them into LaMP's ``input``) and outputs."""

    fields: dict[str, str]
    gold: str
    bayes: str  # the prediction that knows the user's planted preference
    population: str  # the prediction that knows the generative process but not the user


class PlantedUser(Protocol):
    """A user's planted preference; ``reference()`` is what ``reference.json`` records."""

    persona: str

    def reference(self) -> dict[str, Any]: ...


class World(Protocol):
    """One task's generative process (a world that can shift a user's behaviour also has
    ``shifted(user, rng, at) -> user``: the generator's ``shift_at``)."""

    personas: tuple[str, ...]

    def new_user(self, rng: np.random.Generator, persona: int) -> PlantedUser: ...

    def history_item(self, user: Any, rng: np.random.Generator, progress: float) -> dict[str, str]: ...

    def query(self, user: Any, rng: np.random.Generator, query_index: int) -> SynthQuery: ...


def pick(rng: np.random.Generator, words: Sequence[str], n: int = 1) -> list[str]:
    """``n`` distinct words of ``words``, in random order."""
    return [words[i] for i in rng.choice(len(words), size=n, replace=False)]


def one_of(rng: np.random.Generator, words: Sequence[str]) -> str:
    return words[rng.integers(len(words))]


def filler_phrase(rng: np.random.Generator) -> str:
    """A neutral "adjective noun" pair that is evidence for nothing."""
    return f"{one_of(rng, FILLER_ADJECTIVES)} {one_of(rng, FILLER_NOUNS)}"


def evidence_text(rng: np.random.Generator, keywords: Sequence[str], n_sentences: int) -> str:
    """Sentences that each carry one or two of ``keywords`` among neutral filler words.

    The keywords are spread over the sentences in random order, so their position says nothing
    about which label they stand for.
    """
    words = list(keywords)
    rng.shuffle(words)
    slots: list[list[str]] = [[] for _ in range(n_sentences)]
    for i, word in enumerate(words):
        slots[i % n_sentences].append(word)
    sentences = []
    for carried in slots:
        tail = " and the ".join(carried) if carried else filler_phrase(rng)
        sentences.append(f"{one_of(rng, PERSON_NAMES)} {one_of(rng, VERBS)} the {filler_phrase(rng)} "
                         f"with the {tail}.")
    return " ".join(sentences)


def with_article(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def abstract_text(rng: np.random.Generator, lead: str, keywords: Sequence[str]) -> str:
    """A paper abstract: ``lead`` as its first sentence, then research sentences around ``keywords``."""
    words = list(keywords)
    rng.shuffle(words)
    sentences = [lead]
    for first, second in zip(words[::2], words[1::2], strict=False):
        if rng.random() < 0.5:
            sentences.append(f"We propose {with_article(one_of(rng, RESEARCH_ADJECTIVES))} method that "
                             f"{one_of(rng, RESEARCH_VERBS)} {first} and {second}.")
        else:
            sentences.append(f"Experiments on {first} with {second} show {one_of(rng, RESEARCH_ADJECTIVES)} "
                             f"results for the {one_of(rng, FILLER_NOUNS)}.")
    return " ".join(sentences)


def persona_of_users(rng: np.random.Generator, n_users: int, n_personas: int) -> list[int]:
    """Personas as equal in number as ``n_users`` allows, in random order."""
    personas = np.arange(n_users) % n_personas
    rng.shuffle(personas)
    return [int(p) for p in personas]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def rounded(values: np.ndarray | Sequence[float], digits: int = 3) -> list[float]:
    return [round(float(v), digits) for v in values]
