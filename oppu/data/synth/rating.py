"""LaMP-3: a review's words convey the product's latent quality; the user's bias sets the score.

Each review is written with sentiment words of one quality level (1-5). The user's score is that
level shifted by their planted bias (harsh, neutral, generous, very generous: a persona's bias
plus a small personal perturbation, drifting mildly), plus a little noise, rounded and clipped to
1..5. The text is the same for every user, so only the user's own history reveals the shift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from oppu.data.synth.vocabulary import FILLER_NOUNS, PERSON_NAMES, PRODUCT_NOUNS, QUALITY_WORDS, VERBS
from oppu.data.synth.world import SynthQuery, filler_phrase, one_of, pick
from oppu.tasks.decisions import least_absolute_error_value

RATINGS = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class RatingSettings:
    persona_biases: tuple[tuple[str, float], ...] = (
        ("harsh", -1.0), ("neutral", 0.0), ("generous", 1.0), ("very generous", 2.0))
    personal_sd: float = 0.15
    drift_sd: float = 0.15
    score_noise_sd: float = 0.3
    reference_population: int = 2000


@dataclass(frozen=True)
class RatingBiasUser:
    persona: str
    persona_bias: float
    bias_start: float
    bias_end: float

    def bias(self, progress: float) -> float:
        return self.bias_start + progress * (self.bias_end - self.bias_start)

    def reference(self) -> dict[str, Any]:
        return {"persona": self.persona, "persona_bias": self.persona_bias,
                "bias": round(self.bias_end, 3), "bias_start": round(self.bias_start, 3)}


def _normal_cdf(x: float, sd: float) -> float:
    return 0.5 * (1.0 + math.erf(x / (sd * math.sqrt(2.0))))


def score_distribution(mean: float, noise_sd: float) -> np.ndarray:
    """P(score = 1..5) for ``clip(round(mean + noise), 1, 5)`` with Gaussian noise."""
    upper = [_normal_cdf(r + 0.5 - mean, noise_sd) for r in RATINGS[:-1]] + [1.0]
    lower = [0.0] + upper[:-1]
    return np.array(upper) - np.array(lower)


def mae_optimal_score(distribution: np.ndarray) -> int:
    """The score with the least expected absolute error (then squared error) under ``distribution``."""
    return RATINGS[least_absolute_error_value(RATINGS, distribution)]


class RatingBiasWorld:
    def __init__(self, layout_rng: np.random.Generator, settings: RatingSettings | None = None):
        self.settings = settings or RatingSettings()
        s = self.settings
        self.personas = tuple(name for name, _ in s.persona_biases)
        reference_users = [self.new_user(layout_rng, p % len(self.personas)) for p in range(s.reference_population)]
        self._population_score = {
            quality: mae_optimal_score(np.mean(
                [score_distribution(quality + u.bias(1.0), s.score_noise_sd) for u in reference_users], axis=0))
            for quality in RATINGS}

    def new_user(self, rng: np.random.Generator, persona: int) -> RatingBiasUser:
        s = self.settings
        name, bias = s.persona_biases[persona]
        start = bias + rng.normal(0.0, s.personal_sd)
        end = start + rng.normal(0.0, s.drift_sd)
        return RatingBiasUser(persona=name, persona_bias=bias, bias_start=float(start), bias_end=float(end))

    def _review(self, quality: int, rng: np.random.Generator) -> str:
        product = one_of(rng, PRODUCT_NOUNS)
        sentiment = pick(rng, QUALITY_WORDS[quality], 3)
        sentences = [
            f"I bought this {product} for my {one_of(rng, FILLER_NOUNS)}.",
            f"The {product} is {sentiment[0]} and the {one_of(rng, FILLER_NOUNS)} is {sentiment[1]}.",
            f"{one_of(rng, PERSON_NAMES)} {one_of(rng, VERBS)} the {filler_phrase(rng)} with it.",
            f"Overall it is {sentiment[2]}.",
        ]
        if rng.random() < 0.5:
            sentences.insert(2, f"We used it at the {filler_phrase(rng)} every {one_of(rng, FILLER_NOUNS)}.")
        return " ".join(sentences)

    def _score(self, quality: int, bias: float, rng: np.random.Generator) -> int:
        noisy = quality + bias + rng.normal(0.0, self.settings.score_noise_sd)
        return int(np.clip(np.floor(noisy + 0.5), 1, 5))

    def history_item(self, user: RatingBiasUser, rng: np.random.Generator, progress: float) -> dict[str, str]:
        quality = int(rng.integers(1, 6))
        score = self._score(quality, user.bias(progress), rng)
        return {"text": self._review(quality, rng), "score": str(score)}

    def query(self, user: RatingBiasUser, rng: np.random.Generator, query_index: int) -> SynthQuery:
        quality = int(rng.integers(1, 6))
        bias = user.bias(1.0)
        gold = self._score(quality, bias, rng)
        bayes = mae_optimal_score(score_distribution(quality + bias, self.settings.score_noise_sd))
        return SynthQuery(fields={"text": self._review(quality, rng)}, gold=str(gold), bayes=str(bayes),
                          population=str(self._population_score[quality]))
