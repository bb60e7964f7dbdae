"""Label decisions: each task's rule picks the answer its own metric rewards most."""

from __future__ import annotations

import math

import numpy as np
import pytest

from oppu.data.synth.rating import mae_optimal_score
from oppu.tasks import get_task
from oppu.tasks.decisions import label_probabilities


def log(probabilities):
    return [math.log(p) if p > 0 else -1e9 for p in probabilities]


def expected(metric, task, probabilities) -> list[float]:
    """Each label's expected score under ``probabilities`` when the gold is drawn from them."""
    golds = list(task.labels)
    weights = dict(zip(golds, probabilities, strict=True))
    return [sum(weights[g] * task.score([g], [answer])[metric] for g in golds) for answer in task.labels]


def test_rating_takes_the_median_where_the_mode_loses_on_mae():
    task = get_task("LaMP-3")
    # Users the model cannot see spread one review's score over 1..4; 1 is the likeliest by a hair.
    belief = [0.27, 0.25, 0.25, 0.23, 0.0]
    assert task.decide(log(belief)) in ("2", "3")
    mae = expected("MAE", task, belief)
    assert mae[int(task.decide(log(belief))) - 1] == pytest.approx(min(mae))
    assert mae[0] > min(mae) + 0.3  # the likeliest score (what greedy decoding tends to give) costs more


@pytest.mark.parametrize("seed", range(20))
def test_rating_decision_minimises_expected_mae(seed):
    task = get_task("LaMP-3")
    belief = np.random.default_rng(seed).dirichlet(np.ones(5) * 0.7)
    mae = expected("MAE", task, belief)
    assert mae[int(task.decide(np.log(belief + 1e-300))) - 1] == pytest.approx(min(mae))
    assert task.decide(np.log(belief + 1e-300)) == str(mae_optimal_score(belief))  # the generator's own rule


@pytest.mark.parametrize("name", ["LaMP-1", "LaMP-2N", "LaMP-2M"])
def test_classification_takes_the_likeliest_label(name):
    task = get_task(name)
    for winner in range(len(task.labels)):
        scores = [-5.0] * len(task.labels)
        scores[winner] = -1.0
        assert task.decide(scores) == task.labels[winner]


def test_log_probabilities_on_any_scale_are_normalised():
    assert label_probabilities([-1000.0, -1000.0]) == pytest.approx([0.5, 0.5])
    assert get_task("LaMP-3").decide([-1000.0 + x for x in (0, 0, 3, 0, 0)]) == "3"


def test_generation_tasks_have_no_label_decision_and_wrong_lengths_are_refused():
    assert not get_task("LaMP-4").answers_by_label
    with pytest.raises(ValueError, match="no label set"):
        get_task("LaMP-5").decide([0.0])
    with pytest.raises(ValueError, match="2 log-probabilities for 5 labels"):
        get_task("LaMP-3").decide([0.0, 1.0])
    assert all(get_task(n).answers_by_label for n in ("LaMP-1", "LaMP-2N", "LaMP-2M", "LaMP-3"))
