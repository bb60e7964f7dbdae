"""LaMP-1: researchers write about their topics; the related reference is on one of them.

Each persona works on two of the ten research topics; a user's topic distribution is a softmax of
their persona's logits plus a small personal perturbation, drifting mildly. History items are the
user's papers (title and abstract on a topic drawn from that distribution). A query gives a new
paper title made only of generic words, so it says nothing about the topic, and two reference
titles: the related one on a topic drawn from the user's distribution, the other on a different
topic drawn uniformly. Which option is related alternates over a user's queries ([1]/[2]
balanced). Only the user's own papers tell which topic is theirs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from oppu.data.synth.vocabulary import GENERIC_TITLE_NOUNS, RESEARCH_ADJECTIVES, RESEARCH_TOPIC_KEYWORDS
from oppu.data.synth.world import SynthQuery, abstract_text, one_of, pick, rounded, softmax, with_article

OPTIONS = ("[1]", "[2]")


@dataclass(frozen=True)
class TopicSettings:
    topics_per_persona: int = 2
    persona_logit: float = 3.0  # a persona topic's logit; other topics start at 0
    personal_sd: float = 0.4
    drift_sd: float = 0.3
    reference_population: int = 2000


@dataclass(frozen=True)
class TopicUser:
    persona: str
    persona_topics: tuple[str, ...]
    topics: tuple[str, ...]
    logits_start: np.ndarray
    logits_end: np.ndarray
    answer_offset: int  # which option holds the related reference in the user's first query

    def topic_probability(self, progress: float) -> np.ndarray:
        return softmax(self.logits_start + progress * (self.logits_end - self.logits_start))

    def reference(self) -> dict[str, Any]:
        probability = self.topic_probability(1.0)
        order = np.argsort(-probability, kind="stable")
        return {
            "persona": self.persona,
            "persona_topics": list(self.persona_topics),
            "top_topics": [self.topics[i] for i in order[:len(self.persona_topics)]],
            "topic_probability": dict(zip(self.topics, rounded(probability), strict=True)),
        }


class CitationWorld:
    def __init__(self, layout_rng: np.random.Generator, settings: TopicSettings | None = None):
        self.settings = settings or TopicSettings()
        s = self.settings
        self.topics = tuple(RESEARCH_TOPIC_KEYWORDS)
        order = layout_rng.permutation(len(self.topics))
        n_personas = len(self.topics) // s.topics_per_persona
        self.persona_topic_ids = [order[p * s.topics_per_persona:(p + 1) * s.topics_per_persona]
                                  for p in range(n_personas)]
        self.personas = tuple("+".join(self.topics[i] for i in ids) for ids in self.persona_topic_ids)
        reference_users = [self.new_user(layout_rng, p % n_personas) for p in range(s.reference_population)]
        self._population_topic_probability = np.mean([u.topic_probability(1.0) for u in reference_users], axis=0)

    def new_user(self, rng: np.random.Generator, persona: int) -> TopicUser:
        s = self.settings
        base = np.zeros(len(self.topics))
        base[self.persona_topic_ids[persona]] = s.persona_logit
        start = base + rng.normal(0.0, s.personal_sd, size=len(self.topics))
        end = start + rng.normal(0.0, s.drift_sd, size=len(self.topics))
        return TopicUser(persona=self.personas[persona],
                         persona_topics=tuple(self.topics[i] for i in self.persona_topic_ids[persona]),
                         topics=self.topics, logits_start=start, logits_end=end,
                         answer_offset=int(rng.integers(2)))

    def _paper_title(self, topic: int, rng: np.random.Generator) -> tuple[str, list[str]]:
        """A title on ``topic`` and the topic keywords it used."""
        words = pick(rng, RESEARCH_TOPIC_KEYWORDS[self.topics[topic]], 3)
        return f"{one_of(rng, RESEARCH_ADJECTIVES)} {words[0]} and {words[1]} for {words[2]}", words

    def history_item(self, user: TopicUser, rng: np.random.Generator, progress: float) -> dict[str, str]:
        topic = int(rng.choice(len(self.topics), p=user.topic_probability(progress)))
        title, used = self._paper_title(topic, rng)
        keywords = RESEARCH_TOPIC_KEYWORDS[self.topics[topic]]
        others = pick(rng, [k for k in keywords if k not in used], 4)
        lead = f"We study {used[0]} and {used[1]} in the setting of {used[2]}."
        return {"title": title, "abstract": abstract_text(rng, lead, others)}

    def query(self, user: TopicUser, rng: np.random.Generator, query_index: int) -> SynthQuery:
        probability = user.topic_probability(1.0)
        related = int(rng.choice(len(self.topics), p=probability))
        unrelated = int(rng.choice([t for t in range(len(self.topics)) if t != related]))
        related_slot = (user.answer_offset + query_index) % 2
        option_topics = [unrelated, unrelated]
        option_topics[related_slot] = related
        titles = [self._paper_title(t, rng)[0] for t in option_topics]
        nouns = pick(rng, GENERIC_TITLE_NOUNS, 2)
        title = (f"{with_article(one_of(rng, RESEARCH_ADJECTIVES))} {nouns[0]} for "
                 f"{one_of(rng, RESEARCH_ADJECTIVES)} {nouns[1]}")

        def likelier(topic_probability: np.ndarray) -> str:
            # P(option i is the related one) is proportional to P(its topic) under the user's distribution.
            first, second = (topic_probability[t] for t in option_topics)
            return OPTIONS[0] if first >= second else OPTIONS[1]

        return SynthQuery(fields={"title": title, "option1": titles[0], "option2": titles[1]},
                          gold=OPTIONS[related_slot], bayes=likelier(probability),
                          population=likelier(self._population_topic_probability))
