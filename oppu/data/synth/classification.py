"""LaMP-2M and LaMP-2N: every item offers 2-3 candidate labels; the user's label utilities choose.

An item's text carries equal keyword evidence for each candidate, so the text narrows the answer
to the candidates but never says which one this user picks. Each persona favours a few labels
(every label is a favourite of exactly one persona, so the population as a whole favours none);
a user's utilities are their persona's plus a small personal perturbation and drift mildly over
time. The first candidate is drawn from the user's own taste (people watch and read what they
like), the others uniformly, and the user picks among them by a softmax of their utilities with a
low temperature: a per-user label bias that a personal adapter can learn and a shared model cannot
know.

A behaviour shift (``shifted``, the generator's ``shift_at``) makes a user take up another
persona's taste at a known point of their history: from there on (and at the queries) their
utilities are that persona's plus a fresh personal perturbation, drifting as before.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from oppu.data.synth.world import SynthQuery, evidence_text, pick, rounded, softmax


@dataclass(frozen=True)
class LabelChoiceSettings:
    n_personas: int = 5
    favourite_utilities: tuple[float, ...] = (3.0, 2.5, 2.0)  # a persona's favourite labels, best first
    personal_sd: float = 0.4  # the user's own perturbation of every label's utility
    drift_sd: float = 0.3  # how far each utility moves from the first history item to the queries
    candidate_skew: float = 0.9  # inverse temperature of drawing the first candidate from the utilities
    choice_temperature: float = 0.5
    three_candidates_rate: float = 0.2
    keywords_per_candidate: tuple[int, int] = (2, 3)  # inclusive range, the label's genre word included
    reference_population: int = 2000  # simulated users behind the population prediction


@dataclass(frozen=True)
class LabelShift:
    """A user's taste from progress ``at`` on: another persona's, drifting to the queries."""

    at: float  # progress of the first item with the new taste
    persona: str
    persona_labels: tuple[str, ...]
    utility_start: np.ndarray  # per label, at the shift
    utility_end: np.ndarray  # per label, at the user's queries


@dataclass(frozen=True)
class LabelPreferenceUser:
    persona: str
    persona_labels: tuple[str, ...]
    labels: tuple[str, ...]
    utility_start: np.ndarray  # per label, at the user's first history item
    utility_end: np.ndarray  # per label, at the user's queries (without a shift)
    shift: LabelShift | None = None

    def utility(self, progress: float) -> np.ndarray:
        if self.shift is not None and progress >= self.shift.at:
            t = (progress - self.shift.at) / (1.0 - self.shift.at)
            return self.shift.utility_start + t * (self.shift.utility_end - self.shift.utility_start)
        return self.utility_start + progress * (self.utility_end - self.utility_start)

    def reference(self) -> dict[str, Any]:
        at_queries = self.utility_end if self.shift is None else self.shift.utility_end
        order = np.argsort(-at_queries, kind="stable")
        reference = {
            "persona": self.persona,
            "persona_labels": list(self.persona_labels),
            "top_labels": [self.labels[i] for i in order[:len(self.persona_labels)]],
            "utility": dict(zip(self.labels, rounded(at_queries), strict=True)),
            "utility_start": dict(zip(self.labels, rounded(self.utility_start), strict=True)),
        }
        if self.shift is not None:
            reference["shift"] = {"at": self.shift.at, "persona": self.shift.persona,
                                  "persona_labels": list(self.shift.persona_labels)}
        return reference


@dataclass(frozen=True)
class ItemFields:
    """Which profile-item fields hold the text, the optional title and the label."""

    text: str
    label: str
    title: str | None = None


class LabelChoiceWorld:
    def __init__(self, labels: tuple[str, ...], keywords: dict[str, tuple[str, ...]], fields: ItemFields,
                 layout_rng: np.random.Generator, settings: LabelChoiceSettings | None = None):
        self.labels = labels
        self.keywords = keywords
        self.fields = fields
        self.settings = settings or LabelChoiceSettings()
        s = self.settings
        per_persona = len(s.favourite_utilities)
        if s.n_personas * per_persona != len(labels):
            raise ValueError(f"{s.n_personas} personas x {per_persona} favourites must cover "
                             f"the {len(labels)} labels exactly once")
        order = layout_rng.permutation(len(labels))
        self.persona_label_ids = [order[p * per_persona:(p + 1) * per_persona] for p in range(s.n_personas)]
        self.personas = tuple("+".join(labels[i] for i in ids) for ids in self.persona_label_ids)
        reference_users = [self.new_user(layout_rng, p % s.n_personas) for p in range(s.reference_population)]
        self._reference_utility = np.stack([u.utility(1.0) for u in reference_users])

    def new_user(self, rng: np.random.Generator, persona: int) -> LabelPreferenceUser:
        s = self.settings
        base = np.zeros(len(self.labels))
        base[self.persona_label_ids[persona]] = s.favourite_utilities
        start = base + rng.normal(0.0, s.personal_sd, size=len(self.labels))
        end = start + rng.normal(0.0, s.drift_sd, size=len(self.labels))
        return LabelPreferenceUser(
            persona=self.personas[persona],
            persona_labels=tuple(self.labels[i] for i in self.persona_label_ids[persona]),
            labels=self.labels, utility_start=start, utility_end=end)

    def shifted(self, user: LabelPreferenceUser, rng: np.random.Generator, at: float) -> LabelPreferenceUser:
        """``user`` taking up another persona's taste (with a fresh personal perturbation) at progress ``at``."""
        s = self.settings
        current = self.personas.index(user.persona)
        persona = (current + 1 + int(rng.integers(s.n_personas - 1))) % s.n_personas
        base = np.zeros(len(self.labels))
        base[self.persona_label_ids[persona]] = s.favourite_utilities
        start = base + rng.normal(0.0, s.personal_sd, size=len(self.labels))
        end = start + rng.normal(0.0, s.drift_sd, size=len(self.labels))
        shift = LabelShift(at=at, persona=self.personas[persona],
                           persona_labels=tuple(self.labels[i] for i in self.persona_label_ids[persona]),
                           utility_start=start, utility_end=end)
        return dataclasses.replace(user, shift=shift)

    def _candidates(self, utility: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        s = self.settings
        first = rng.choice(len(self.labels), p=softmax(s.candidate_skew * utility))
        n_others = 2 if rng.random() < s.three_candidates_rate else 1
        others = rng.choice([i for i in range(len(self.labels)) if i != first], size=n_others, replace=False)
        return np.array([first, *others])

    def _choose(self, utility: np.ndarray, candidates: np.ndarray, rng: np.random.Generator) -> int:
        noisy = utility[candidates] / self.settings.choice_temperature + rng.gumbel(size=len(candidates))
        return int(candidates[np.argmax(noisy)])

    def _text(self, candidates: np.ndarray, rng: np.random.Generator) -> tuple[str, str]:
        low, high = self.settings.keywords_per_candidate
        per_candidate = int(rng.integers(low, high + 1))
        chosen = []
        for c in candidates:
            genre_word, *others = self.keywords[self.labels[c]]
            chosen.append([genre_word, *pick(rng, others, per_candidate - 1)])
        words = [word for group in chosen for word in group]
        text = evidence_text(rng, words, n_sentences=int(rng.integers(3, 5)))
        title_words = [group[-1] for group in chosen]
        rng.shuffle(title_words)
        return text, "the " + " and the ".join(title_words)

    def history_item(self, user: LabelPreferenceUser, rng: np.random.Generator,
                     progress: float) -> dict[str, str]:
        utility = user.utility(progress)
        candidates = self._candidates(utility, rng)
        label = self.labels[self._choose(utility, candidates, rng)]
        text, title = self._text(candidates, rng)
        item = {self.fields.text: text}
        if self.fields.title:
            item[self.fields.title] = title
        item[self.fields.label] = label
        return item

    def population_choice(self, candidates: np.ndarray) -> int:
        """The candidate most likely chosen by a user unknown but for having been offered ``candidates``.

        Exact over the simulated reference population: each user's chance of being offered this
        set (proportional to the first-draw probability of its members) times their choice
        probabilities.
        """
        utility = self._reference_utility
        offered = softmax(self.settings.candidate_skew * utility)[:, candidates].sum(axis=1)
        choice = softmax(utility[:, candidates] / self.settings.choice_temperature)
        return int(candidates[np.argmax(offered @ choice)])

    def query(self, user: LabelPreferenceUser, rng: np.random.Generator, query_index: int) -> SynthQuery:
        utility = user.utility(1.0)
        candidates = self._candidates(utility, rng)
        gold = self._choose(utility, candidates, rng)
        text, _ = self._text(candidates, rng)
        bayes = int(candidates[np.argmax(utility[candidates])])
        return SynthQuery(fields={self.fields.text: text}, gold=self.labels[gold],
                          bayes=self.labels[bayes], population=self.labels[self.population_choice(candidates)])
