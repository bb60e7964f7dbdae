"""LaMP's scoring arithmetic against values worked out by hand."""

from __future__ import annotations

import math

import pytest
from rouge_score import rouge_scorer

from oppu.errors import DataError
from oppu.metrics import classification_scores, generation_scores, rating_scores
from oppu.tasks import get_task
from oppu.tasks.labels import LAMP_2M_LABELS


def test_classification_accuracy_and_macro_f1_over_all_labels():
    # Golds: sci-fi, comedy, comedy, action. Predictions: sci-fi, comedy, sci-fi, "horror" (unknown).
    # sci-fi: tp 1, fp 1, fn 0 -> P 1/2, R 1 -> F1 2/3. comedy: tp 1, fn 1 -> P 1, R 1/2 -> F1 2/3.
    # action: tp 0 -> F1 0. The other 12 labels have no example and score 0: macro = (4/3) / 15.
    scores = classification_scores(["sci-fi", "comedy", "comedy", "action"],
                                   ["sci-fi", " comedy ", "sci-fi", "horror"], LAMP_2M_LABELS)
    assert scores["accuracy"] == pytest.approx(0.5)
    assert scores["f1"] == pytest.approx((2 / 3 + 2 / 3) / 15)


def test_classification_matching_is_exact_and_case_sensitive():
    scores = classification_scores(["[1]", "[2]"], ["[1]", "[2] "], ("[1]", "[2]"))
    assert scores == {"accuracy": 1.0, "f1": 1.0}
    assert classification_scores(["comedy"], ["Comedy"], LAMP_2M_LABELS)["accuracy"] == 0.0


def test_rating_unparseable_prediction_becomes_the_farthest_rating():
    # Gold 2 with "n/a" -> 5.0 (|1-2| < |5-2|), error 3; gold 4 with "" -> 1.0, error 3;
    # gold 3 with "3" -> 0; gold 1 with "2.5" -> 1.5. MAE = 7.5/4, RMSE = sqrt((9+9+0+2.25)/4).
    scores = rating_scores(["2", "4", "3", "1"], ["n/a", "", " 3 ", "2.5"])
    assert scores["MAE"] == pytest.approx(7.5 / 4)
    assert scores["RMSE"] == pytest.approx(math.sqrt(20.25 / 4))


def test_rating_gold_that_is_no_number_is_a_data_error():
    with pytest.raises(DataError, match="gold rating 'five'"):
        rating_scores(["five"], ["5"])


def test_generation_rouge_is_the_mean_f_measure_of_rouge_score():
    golds = ["Stocks rally as inflation cools", "The cat sat"]
    preds = ["stocks rally on cooling inflation", "a dog sat down"]
    # Hand count, pair 1: tokens stocks rally as inflation cools | stocks rally on cooling inflation:
    # 3 shared unigrams of 5 and 5 -> ROUGE-1 F 0.6; LCS "stocks rally inflation" = 3 -> ROUGE-L 0.6.
    # Pair 2: the cat sat | a dog sat down: 1 shared of 3 and 4 -> F = 2/7 for both.
    scores = generation_scores(golds, preds)
    assert scores["rouge-1"] == pytest.approx((0.6 + 2 / 7) / 2)
    assert scores["rouge-L"] == pytest.approx((0.6 + 2 / 7) / 2)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    reference = [scorer.score(g, p) for g, p in zip(golds, preds, strict=True)]
    assert scores["rouge-1"] == pytest.approx(sum(r["rouge1"].fmeasure for r in reference) / 2)


def test_no_stemming_in_rouge():
    assert generation_scores(["cooling"], ["cools"]) == {"rouge-1": 0.0, "rouge-L": 0.0}


@pytest.mark.parametrize(("name", "keys"), [
    ("LaMP-1", {"accuracy", "f1"}), ("LaMP-2N", {"accuracy", "f1"}), ("LaMP-2M", {"accuracy", "f1"}),
    ("LaMP-3", {"MAE", "RMSE"}), ("LaMP-4", {"rouge-1", "rouge-L"}), ("LaMP-5", {"rouge-1", "rouge-L"}),
    ("LaMP-7", {"rouge-1", "rouge-L"}),
])
def test_task_score_gives_lamps_keys(name, keys):
    task = get_task(name)
    gold = task.labels[0] if task.labels else "a title"
    assert set(task.score([gold], [gold])) == keys == set(task.metric_names)
    with pytest.raises(DataError, match="nothing to score"):
        task.score([], [])
