"""How a task with a label set turns the model's belief over its labels into one answer.

Scored against LaMP's metrics, the best answer depends on the metric, not only on the model:
accuracy rewards the likeliest label (the mode), mean absolute error the label with the least
expected absolute error (for ordered scores, a median). Greedy decoding always picks something
like the mode, so on a rating task whose scores are spread over several values by users the model
cannot see, it answers worse than the median would from the very same belief. The generator's
population and Bayes references are both minimum-risk answers in this sense
(``oppu.data.synth.rating`` uses ``least_absolute_error_value``), so evaluating with the
matching rule compares like with like.

A rule takes the labels and their log-probabilities (any scale: they are normalised here) and
returns one label.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def label_probabilities(log_probs: Sequence[float]) -> np.ndarray:
    """Normalised probabilities from unnormalised log-probabilities (a softmax)."""
    values = np.asarray(log_probs, dtype=float)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"expected one log-probability per label, got shape {values.shape}")
    weights = np.exp(values - values.max())
    return weights / weights.sum()


def least_absolute_error_value(values: Sequence[float], probabilities: Sequence[float]) -> int:
    """The index of the value with the least expected absolute error under ``probabilities``; ties go
    to the least expected squared error, then to the first."""
    points = np.asarray(values, dtype=float)
    p = np.asarray(probabilities, dtype=float)
    costs = [(float(p @ np.abs(points - v)), float(p @ (points - v) ** 2)) for v in points]
    return min(range(len(points)), key=costs.__getitem__)


@dataclass(frozen=True)
class MostLikelyLabel:
    """Accuracy's answer: the label the model finds likeliest."""

    def __call__(self, labels: Sequence[str], log_probs: Sequence[float]) -> str:
        return labels[int(np.argmax(label_probabilities(log_probs)))]


@dataclass(frozen=True)
class LeastAbsoluteErrorLabel:
    """Mean absolute error's answer for labels that name numbers ("1".."5"): the label whose value has
    the least expected absolute error under the model's normalised belief."""

    def __call__(self, labels: Sequence[str], log_probs: Sequence[float]) -> str:
        values = [float(label) for label in labels]
        return labels[least_absolute_error_value(values, label_probabilities(log_probs))]


LabelDecision = MostLikelyLabel | LeastAbsoluteErrorLabel
