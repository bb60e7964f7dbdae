"""LaMP's metrics: the arithmetic over position-aligned golds and predictions (``lamp``).

Matching predictions to golds by id, and reading LaMP's files, is ``oppu.evaluation.scoring``.
"""

from __future__ import annotations

from oppu.metrics.lamp import classification_scores, generation_scores, rating_scores

__all__ = ["classification_scores", "generation_scores", "rating_scores"]
