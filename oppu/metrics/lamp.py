"""LaMP's scoring arithmetic, exactly as its evaluator does it (see lamp-formats.md).

Golds and predictions arrive position-aligned; ``oppu.evaluation.scoring`` does the id matching.
sklearn and rouge_score are imported when first used, so importing tasks stays cheap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from oppu.errors import DataError

_UNKNOWN_LABEL = -1


def classification_scores(golds: Sequence[str], preds: Sequence[str],
                          labels: Sequence[str]) -> dict[str, float]:
    """Accuracy and macro-F1 over all ``labels``; text outside the label set maps to index -1."""
    from sklearn.metrics import f1_score

    index = {label: position for position, label in enumerate(labels)}
    gold_ids = [index.get(str(gold).strip(), _UNKNOWN_LABEL) for gold in golds]
    pred_ids = [index.get(str(pred).strip(), _UNKNOWN_LABEL) for pred in preds]
    accuracy = sum(g == p for g, p in zip(gold_ids, pred_ids, strict=True)) / len(gold_ids)
    f1 = f1_score(gold_ids, pred_ids, labels=list(range(len(labels))), average="macro",
                  zero_division=0)
    return {"accuracy": float(accuracy), "f1": float(f1)}


def _gold_rating(gold: str) -> float:
    try:
        value = float(str(gold).strip())
    except ValueError:
        raise DataError(f"gold rating {gold!r} is not a number") from None
    if not math.isfinite(value):
        raise DataError(f"gold rating {gold!r} is not a finite number")
    return value


def _predicted_rating(pred: str, gold: float) -> float:
    """LaMP's rule: an unparseable prediction becomes the rating farthest from the gold."""
    try:
        value = float(str(pred).strip())
    except ValueError:
        value = math.nan
    # float() also accepts "nan"/"inf"; treated as unparseable so the mean stays a number.
    if math.isfinite(value):
        return value
    return 1.0 if abs(1 - gold) > abs(5 - gold) else 5.0


def rating_scores(golds: Sequence[str], preds: Sequence[str]) -> dict[str, float]:
    """MAE and RMSE between ratings, with LaMP's farthest-rating rule for unparseable predictions."""
    from sklearn.metrics import mean_absolute_error, mean_squared_error

    gold_values = [_gold_rating(gold) for gold in golds]
    pred_values = [_predicted_rating(pred, gold) for pred, gold in zip(preds, gold_values, strict=True)]
    mae = mean_absolute_error(gold_values, pred_values)
    rmse = math.sqrt(mean_squared_error(gold_values, pred_values))
    return {"MAE": float(mae), "RMSE": float(rmse)}


def generation_scores(golds: Sequence[str], preds: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1 and ROUGE-L F-measure (Google's rouge_score, no stemmer)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    rouge1 = rouge_l = 0.0
    for gold, pred in zip(golds, preds, strict=True):
        result = scorer.score(str(gold).strip(), str(pred).strip())
        rouge1 += result["rouge1"].fmeasure
        rouge_l += result["rougeL"].fmeasure
    return {"rouge-1": rouge1 / len(golds), "rouge-L": rouge_l / len(golds)}
