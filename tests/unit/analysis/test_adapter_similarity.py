"""Appendix F's adapter similarity, and the within/across-cluster summary."""

from __future__ import annotations

import pytest
import torch

from oppu.analysis.adapter_similarity import (
    adapter_cosine_matrix,
    fitted_clusters,
    lora_deltas,
    within_across,
)
from oppu.errors import ConfigError


def appendix_f(peft_1: dict, peft_2: dict) -> float:
    """The paper's pseudo-code, transcribed."""
    similarity_sum, count = 0.0, 0
    for key in peft_1:
        if key in peft_2:
            v1, v2 = peft_1[key].flatten(), peft_2[key].flatten()
            similarity_sum += float(torch.dot(v1, v2) / (torch.linalg.norm(v1) * torch.linalg.norm(v2)))
            count += 1
    return similarity_sum / count


def test_matrix_matches_the_appendix_f_pseudo_code():
    generator = torch.Generator().manual_seed(0)
    adapters = {u: {"a.lora_A.weight": torch.randn(4, 8, generator=generator, dtype=torch.float64),
                    "a.lora_B.weight": torch.randn(8, 4, generator=generator, dtype=torch.float64)}
                for u in ("u1", "u2", "u3")}
    adapters["u3"]["only_u3"] = torch.ones(3, dtype=torch.float64)  # keys one side lacks are skipped
    users, matrix = adapter_cosine_matrix(adapters)
    assert users == ["u1", "u2", "u3"]
    for i, a in enumerate(users):
        assert matrix[i][i] == pytest.approx(1.0)
        for j, b in enumerate(users):
            assert matrix[i][j] == pytest.approx(appendix_f(adapters[a], adapters[b]))
            assert matrix[i][j] == matrix[j][i]


def test_adapters_without_shared_tensors_are_refused():
    with pytest.raises(ConfigError, match="share no tensor"):
        adapter_cosine_matrix({"a": {"x": torch.ones(2)}, "b": {"y": torch.ones(2)}})


def test_within_and_across_cluster_means():
    users = ["a", "b", "c"]
    matrix = [[1, 0.9, 0.1], [0.9, 1, 0.3], [0.1, 0.3, 1]]
    summary = within_across(users, matrix, {"a": "p", "b": "p", "c": "q"})
    assert summary == {"within": 0.9, "across": pytest.approx(0.2), "n_within_pairs": 1, "n_across_pairs": 2}
    fitted = fitted_clusters(users, matrix, n_clusters=2)
    assert fitted["a"] == fitted["b"] != fitted["c"]


def test_weight_change_is_the_same_for_the_same_update_whatever_the_lora_basis():
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(2, 6, generator=generator, dtype=torch.float64)
    b = torch.randn(6, 2, generator=generator, dtype=torch.float64)
    mix = torch.tensor([[2.0, 1.0], [0.0, 1.0]], dtype=torch.float64)  # another basis, same B @ A
    first = {"m.lora_A.weight": a, "m.lora_B.weight": b}
    second = {"m.lora_A.weight": mix @ a, "m.lora_B.weight": b @ torch.linalg.inv(mix)}
    deltas = {"u1": lora_deltas(first), "u2": lora_deltas(second)}
    assert list(deltas["u1"]) == ["m.weight"]
    assert adapter_cosine_matrix(deltas)[1][0][1] == pytest.approx(1.0)
    assert adapter_cosine_matrix({"u1": first, "u2": second})[1][0][1] < 0.99
    assert lora_deltas({"prompt_embeddings": torch.ones(2)}) == {}
