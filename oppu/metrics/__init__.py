"""LaMP's metrics: the arithmetic (``lamp``) and scoring by id or from files (``scoring``)."""

from __future__ import annotations

from oppu.metrics.lamp import classification_scores, generation_scores, rating_scores
from oppu.metrics.scoring import read_outputs_file, score_files, score_predictions

__all__ = ["classification_scores", "generation_scores", "rating_scores", "read_outputs_file",
           "score_files", "score_predictions"]
