import pytest

from oppu.errors import ConfigError
from oppu.evaluation.methods import Method, resolve_method
from oppu.evaluation.runner import gap_closed, markdown_table
from oppu.tasks import get_task


@pytest.mark.parametrize("name, expected", [
    ("non-personalized", Method("non-personalized", "plain", "none", 0, None)),
    ("random-history", Method("random-history", "rag", "random", 1, None)),
    ("rag-k4", Method("rag-k4", "rag", "bm25", 4, None)),
    ("oppu", Method("oppu", "plain", "none", 0, "oppu")),
    ("rag-k1+oppu", Method("rag-k1+oppu", "rag", "bm25", 1, "rag-k1+oppu")),
])
def test_methods_resolve(name, expected):
    assert resolve_method(name) == expected


@pytest.mark.parametrize("name", ["rag-k0", "pag+", "oppu+rag-k1", ""])
def test_unknown_methods_are_refused(name):
    with pytest.raises(ConfigError):
        resolve_method(name)


def test_gap_closed_accuracy_and_mae():
    accuracy = get_task("LaMP-2M")
    results = {"non-personalized": {"accuracy": 0.4, "f1": 0.3}, "oppu": {"accuracy": 0.7, "f1": 0.6}}
    assert gap_closed(accuracy, results, {"bayes": {"accuracy": 0.9, "f1": 0.9}}) == pytest.approx(0.6)
    mae = get_task("LaMP-3")
    results = {"non-personalized": {"MAE": 1.0, "RMSE": 1.2}, "oppu": {"MAE": 0.5, "RMSE": 0.8}}
    assert gap_closed(mae, results, {"bayes": {"MAE": 0.2, "RMSE": 0.4}}) == pytest.approx(0.625)
    assert gap_closed(mae, results, {}) is None


def test_markdown_table_lists_methods_and_reference():
    task = get_task("LaMP-3")
    table = markdown_table(task, {"non-personalized": {"MAE": 1.0, "RMSE": 1.5},
                                  "oppu": {"MAE": 0.5, "RMSE": 0.75}},
                           {"bayes": {"MAE": 0.25, "RMSE": 0.5}})
    assert "| oppu | 0.5000 | 0.7500 |" in table
    assert "| *reference: bayes* | 0.2500 | 0.5000 |" in table
    assert "MAE ↓" in table and "67%" in table
