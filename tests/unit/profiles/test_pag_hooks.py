"""The PAG hooks in the pipeline: profile-flavour samples, methods, adapter variant, HF writer."""

from __future__ import annotations

import pytest

from oppu.config import from_dict
from oppu.data.records import HistoryItem, Query, UserData
from oppu.errors import ConfigError
from oppu.evaluation.methods import resolve_method
from oppu.run_config import RunConfig, parse_variant
from oppu.tasks import get_task
from oppu.training.samples import base_samples, personal_samples

TASK = get_task("LaMP-2M")


def _user(user_id: str) -> UserData:
    history = [HistoryItem(f"{user_id}-{i}", {"description": f"film {i}", "tag": "comedy"}) for i in range(3)]
    query = Query(f"{user_id}-q", TASK.lamp_input({"description": "a new film"}), "sci-fi", 3)
    return UserData(user_id, "base", history, [query])


def test_profile_leads_every_personal_and_base_prompt():
    samples = personal_samples(TASK, _user("a"), profile="[statistical profile] likes comedy")
    assert all(s.prompt.startswith("[statistical profile] likes comedy\n") for s in samples)
    assert not personal_samples(TASK, _user("a"))[0].prompt.startswith("[statistical")
    mixed = base_samples(TASK, [_user("a"), _user("b")], 0, True, seed=0,
                         profiles={"a": "profile A", "b": "profile B"})
    leads = sorted(s.prompt.split("\n", 1)[0] for s in mixed)
    assert leads == ["profile A"] * 4 + ["profile B"] * 4  # 1 query + 3 history items each


def test_pag_methods_and_variant():
    shared = from_dict(RunConfig, {"base": {"flavours": ["plain", "rag", "profile"]}})
    per_k = from_dict(RunConfig, {"base": {"flavours": ["plain", "rag-k1", "profile", "profile+rag-k1"]}})
    pag, pag_rag, pag_oppu = resolve_method("pag"), resolve_method("pag+rag-k1"), resolve_method("pag+oppu")
    assert (pag.base_flavour(shared), pag.retrieval, pag.profile, pag.adapter_variant) == (
        "profile", "none", True, None)
    assert (pag_rag.retrieval, pag_rag.k, pag_rag.profile) == ("bm25", 1, True)
    assert (pag_rag.base_flavour(shared), pag_rag.base_flavour(per_k)) == ("profile", "profile+rag-k1")
    assert (pag_oppu.adapter_variant, pag_oppu.base_flavour(per_k)) == ("pag+oppu", "profile")
    assert not resolve_method("rag-k1").profile
    assert parse_variant("pag+oppu") == (True, 0)
    assert parse_variant("pag+rag-k1+oppu") == (True, 1)
    assert per_k.variant_base("pag+rag-k1+oppu") == "profile+rag-k1"
    assert shared.variant_base("pag+rag-k1+oppu") == "profile"
    pag_rag_oppu = resolve_method("pag+rag-k1+oppu")
    assert (pag_rag_oppu.adapter_variant, pag_rag_oppu.k, pag_rag_oppu.profile) == ("pag+rag-k1+oppu", 1, True)
    for bad in ("pag+rag", "rag-k1+pag", "pagoppu"):
        with pytest.raises(ConfigError):
            resolve_method(bad)
    with pytest.raises(ConfigError):
        parse_variant("rag-k1+pag+oppu")


def test_default_run_config_needs_no_profiles():
    cfg = RunConfig()
    assert "profile" not in cfg.base.flavours
    assert not any(resolve_method(m).profile for m in cfg.eval.methods)
    assert cfg.profiles.writer == "statistical"


def test_hf_writer_generates_one_profile_per_user_from_the_appendix_i_prompt(tmp_path, monkeypatch):
    from oppu.models.tiny import TinyModelConfig, build_tiny_base
    from oppu.profiles import HFProfileWriter

    monkeypatch.setenv("OPPU_CACHE_DIR", str(tmp_path / "cache"))
    config = TinyModelConfig(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                             intermediate_size=64, max_position_embeddings=512, pretrain_steps=5,
                             pretrain_batch_size=4, pretrain_seq_len=32, num_threads=1)
    corpus = [f"description: film {i} about a robot. tag: comedy" for i in range(60)]
    model_dir = build_tiny_base(corpus, tmp_path / "model", config, seed=0)
    writer = HFProfileWriter(str(model_dir), items_per_user=2, batch_size=2, max_new_tokens=6)
    users = [_user("a"), _user("b"), _user("c")]
    first = writer.write(TASK, users)
    assert list(first) == ["a", "b", "c"] and all(isinstance(t, str) for t in first.values())
    assert writer.write(TASK, users) == first  # greedy: the same profiles again
