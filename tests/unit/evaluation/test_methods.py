import pytest

from oppu.config import from_dict
from oppu.errors import ConfigError
from oppu.evaluation.methods import Method, resolve_method
from oppu.evaluation.runner import gap_closed, markdown_table
from oppu.tasks import get_task


@pytest.mark.parametrize("name, expected, shared_base, per_k_base", [
    ("non-personalized", Method("non-personalized", "none", 0, None), "plain", "plain"),
    ("random-history", Method("random-history", "random", 1, None), "rag", "rag-k1"),
    ("rag-k4", Method("rag-k4", "bm25", 4, None), "rag", "rag-k4"),
    ("oppu", Method("oppu", "none", 0, "oppu"), "plain", "plain"),
    ("rag-k1+oppu", Method("rag-k1+oppu", "bm25", 1, "rag-k1+oppu"), "rag", "rag-k1"),
    ("pag+rag-k1+oppu", Method("pag+rag-k1+oppu", "bm25", 1, "pag+rag-k1+oppu", profile=True),
     "profile", "profile+rag-k1"),
])
def test_methods_resolve_to_their_base(name, expected, shared_base, per_k_base):
    from oppu.run_config import RunConfig

    assert resolve_method(name) == expected
    shared = from_dict(RunConfig, {"base": {"flavours": ["plain", "rag", "profile"]}})
    per_k = from_dict(RunConfig, {"base": {"flavours": ["plain", "rag-k1", "rag-k4", "profile", "profile+rag-k1"]}})
    assert expected.base_flavour(shared) == shared_base
    assert expected.base_flavour(per_k) == per_k_base


@pytest.mark.parametrize("name", ["rag-k0", "pag+", "oppu+rag-k1", "", "+oppu", "oppu+pag"])
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


def test_population_gap_is_stated_beside_every_method():
    from oppu.evaluation.runner import population_gap_shares

    task = get_task("LaMP-2M")
    results = {"non-personalized": {"accuracy": 0.1, "f1": 0.1}, "oppu": {"accuracy": 0.6, "f1": 0.5}}
    reference = {"population": {"accuracy": 0.5, "f1": 0.3}, "bayes": {"accuracy": 0.9, "f1": 0.8}}
    shares = population_gap_shares(task, results, reference)
    # A collapsed non-personalized base sits below the population reference: a negative share.
    assert shares == {"non-personalized": pytest.approx(-1.0), "oppu": pytest.approx(0.25)}
    table = markdown_table(task, results, reference)
    assert "| oppu | 0.6000 | 0.5000 | 25% |" in table
    assert "OPPU closes 25% of the gap between the population reference" in table
    assert "62% of the gap between non-personalized" in table
    assert population_gap_shares(task, results, {"bayes": reference["bayes"]}) == {}
