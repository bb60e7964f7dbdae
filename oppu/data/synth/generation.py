"""LaMP-4, 5 and 7: the content comes from the input, the style is the user's.

Every output is a persona's template filled with the input's content words (the keywords the
input's first sentence names), plus the user's own signature word with a rate that grows mildly
over time; now and then (``1 - template_loyalty``) a user writes in another persona's template.
A shared model can learn to copy the content words but not whose template or signature to use;
a personal adapter sees the user's own outputs. LaMP-7's history holds tweets only (learnt by
next-token prediction) and its query text is a plain, style-free paraphrase of the tweet's content.

``bayes`` is the user's template and (where they use it more often than not) signature applied to
the query's content; ``population`` is the first persona's template without a signature (every
persona is equally common, so no template is more likely than another).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from oppu.data.synth.vocabulary import (
    NEWS_CATEGORY_KEYWORDS,
    PERSON_NAMES,
    RESEARCH_TOPIC_KEYWORDS,
    TWEET_ADJECTIVES,
    TWEET_TOPIC_KEYWORDS,
    VERBS,
)
from oppu.data.synth.world import SynthQuery, abstract_text, evidence_text, one_of, pick


@dataclass(frozen=True)
class StyleSpec:
    """One generation task's styles and where its texts go."""

    templates: tuple[str, ...]  # one per persona; str.format over the content slots
    signatures: tuple[str, ...]  # each user gets one of these words
    signature_position: Literal["prefix", "suffix"]
    input_field: str
    output_field: str
    topics: dict[str, tuple[str, ...]]  # keyword lists the content is drawn from


HEADLINE_STYLE = StyleSpec(
    templates=(
        "breaking news {k1} {k2} and {k3}",
        "{k1} and {k2} why the {k3} matters",
        "how {name} {verb} the {k1} {k2} and {k3}",
        "{k1} {k2} {k3} what you need to know",
        "watch {name} and the {k1} {k2} {k3} story",
    ),
    signatures=("exclusive", "opinion", "video", "update", "analysis", "photos", "report", "live"),
    signature_position="suffix", input_field="text", output_field="title", topics=NEWS_CATEGORY_KEYWORDS)

PAPER_TITLE_STYLE = StyleSpec(
    templates=(
        "{k1} {k2} a new approach to {k3}",
        "towards {k1} {k2} for {k3}",
        "on the {k1} of {k2} and {k3}",
        "learning {k1} with {k2} for {k3}",
        "{k1} meets {k2} rethinking {k3}",
    ),
    signatures=("efficient", "scalable", "robust", "unified", "simple", "fast", "adaptive", "principled"),
    signature_position="prefix", input_field="abstract", output_field="title", topics=RESEARCH_TOPIC_KEYWORDS)

TWEET_STYLE = StyleSpec(
    templates=(
        "omg the {k1} and {k2} so {adj} today",
        "ugh {k1} {k2} {adj} again",
        "honestly {k1} plus {k2} equals {adj}",
        "today {k1} {k2} totally {adj}",
        "lol {k1} and {k2} were {adj}",
    ),
    signatures=("yay", "smh", "lmao", "sigh", "woohoo", "fr", "ngl", "tbh"),
    signature_position="suffix", input_field="text", output_field="text", topics=TWEET_TOPIC_KEYWORDS)

PLAIN_TWEET_PARAPHRASES = (
    "the {k1} and the {k2} were {adj} today",
    "today the {k1} and the {k2} felt {adj}",
    "i found the {k1} and the {k2} {adj}",
)


@dataclass(frozen=True)
class StyleSettings:
    template_loyalty: float = 0.9  # how often a user writes in their persona's template
    signature_rate_start: tuple[float, float] = (0.5, 0.8)  # uniform range at the first history item
    signature_rate_end: tuple[float, float] = (0.85, 1.0)  # uniform range at the queries


@dataclass(frozen=True)
class StyleUser:
    persona: str
    template: int
    signature: str
    signature_rate_start: float
    signature_rate_end: float

    def signature_rate(self, progress: float) -> float:
        return self.signature_rate_start + progress * (self.signature_rate_end - self.signature_rate_start)

    def reference(self) -> dict[str, Any]:
        return {"persona": self.persona, "template": self.template, "signature": self.signature,
                "signature_rate": round(self.signature_rate_end, 3),
                "signature_rate_start": round(self.signature_rate_start, 3)}


@dataclass(frozen=True)
class _Content:
    slots: dict[str, str]  # k1, k2, k3, name, verb, adj
    input_text: str


class StyleWorld:
    def __init__(self, spec: StyleSpec, settings: StyleSettings | None = None):
        self.spec = spec
        self.settings = settings or StyleSettings()
        self.personas = tuple(f"style-{i}" for i in range(len(spec.templates)))

    def new_user(self, rng: np.random.Generator, persona: int) -> StyleUser:
        s = self.settings
        return StyleUser(persona=self.personas[persona], template=persona,
                         signature=one_of(rng, self.spec.signatures),
                         signature_rate_start=float(rng.uniform(*s.signature_rate_start)),
                         signature_rate_end=float(rng.uniform(*s.signature_rate_end)))

    def _content(self, rng: np.random.Generator) -> _Content:
        spec = self.spec
        topic = one_of(rng, tuple(spec.topics))
        keywords = spec.topics[topic]
        k1, k2, k3, *others = pick(rng, keywords, min(7, len(keywords)))
        slots = {"k1": k1, "k2": k2, "k3": k3, "name": one_of(rng, PERSON_NAMES), "verb": one_of(rng, VERBS),
                 "adj": one_of(rng, TWEET_ADJECTIVES)}
        if spec is PAPER_TITLE_STYLE:
            text = abstract_text(rng, f"We study the {k1} of {k2} for {k3}.", others)
        elif spec is TWEET_STYLE:
            text = one_of(rng, PLAIN_TWEET_PARAPHRASES).format(**slots)
        else:
            text = (f"{slots['name']} {slots['verb']} the {k1} and the {k2} near the {k3}. "
                    + evidence_text(rng, others, n_sentences=int(rng.integers(2, 4))))
        return _Content(slots=slots, input_text=text)

    def _styled(self, template: int, signature: str | None, slots: dict[str, str]) -> str:
        text = self.spec.templates[template].format(**slots)
        if signature is None:
            return text
        return f"{signature} {text}" if self.spec.signature_position == "prefix" else f"{text} {signature}"

    def _user_output(self, user: StyleUser, slots: dict[str, str], rng: np.random.Generator,
                     progress: float) -> str:
        template = user.template
        if rng.random() >= self.settings.template_loyalty:
            template = int(rng.choice([t for t in range(len(self.spec.templates)) if t != user.template]))
        signature = user.signature if rng.random() < user.signature_rate(progress) else None
        return self._styled(template, signature, slots)

    def history_item(self, user: StyleUser, rng: np.random.Generator, progress: float) -> dict[str, str]:
        content = self._content(rng)
        output = self._user_output(user, content.slots, rng, progress)
        if self.spec.input_field == self.spec.output_field:  # LaMP-7: the history is the tweets alone
            return {self.spec.output_field: output}
        return {self.spec.input_field: content.input_text, self.spec.output_field: output}

    def query(self, user: StyleUser, rng: np.random.Generator, query_index: int) -> SynthQuery:
        content = self._content(rng)
        gold = self._user_output(user, content.slots, rng, progress=1.0)
        bayes_signature = user.signature if user.signature_rate(1.0) >= 0.5 else None
        return SynthQuery(fields={self.spec.input_field: content.input_text}, gold=gold,
                          bayes=self._styled(user.template, bayes_signature, content.slots),
                          population=self._styled(0, None, content.slots))
