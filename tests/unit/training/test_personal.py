"""The per-user path: samples use only earlier history; adapters depend on the user's data alone."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from oppu.data.records import HistoryItem, UserData
from oppu.run_config import OptimSettings, PeftSettings
from oppu.tasks import get_task
from oppu.training.samples import personal_samples
from tests.unit.tiny_models import MOVIE_TAGS, build_movie_tag_base, movie_user


def test_samples_retrieve_only_earlier_items():
    task = get_task("LaMP-2M")
    user = movie_user("u1", 6)
    plain = personal_samples(task, user, k=0)
    with_rag = personal_samples(task, user, k=2)
    assert len(plain) == len(with_rag) == 6
    assert plain[0] == with_rag[0]  # nothing before the first item
    for position, sample in enumerate(with_rag):
        later = [item.fields["description"] for item in user.history[position:]]
        prompt_before_query = sample.prompt.split("Which tag")[0]
        assert not any(text in prompt_before_query for text in later)
    assert user.history[0].fields["description"] in with_rag[1].prompt
    assert all(s.target.strip() in MOVIE_TAGS for s in with_rag)


def test_next_token_tasks_train_on_history_text():
    task = get_task("LaMP-7")
    user = UserData("u", "test", [HistoryItem("t1", {"text": "so happy today #blessed"})], [])
    (sample,) = personal_samples(task, user, k=1)
    assert sample.prompt == "" and "#blessed" in sample.target


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from oppu.models import load_model

    path = build_movie_tag_base(tmp_path_factory.mktemp("tiny") / "model")
    return path, load_model(str(path))


def _train(model, tokenizer, user, out_dir):
    from oppu.training.personal import train_user_adapter

    samples = personal_samples(get_task("LaMP-2M"), user)
    stats = train_user_adapter(model, tokenizer, samples, PeftSettings().to_peft_config(), OptimSettings(lr=1e-2, batch_size=4),
                               epochs=2, seed=7, user_id=user.user_id, out_dir=out_dir)
    return stats, load_file(out_dir / "adapter_model.safetensors")


def test_adapter_is_bit_identical_with_or_without_other_users(tiny_base, tmp_path):
    import torch

    from oppu.models import load_model

    path, (model, tokenizer) = tiny_base
    before = {k: v.clone() for k, v in model.state_dict().items()}
    target = movie_user("target", 10)
    _, alone = _train(model, tokenizer, target, tmp_path / "alone")
    # a fresh process-like start: new base instance, other users trained first
    model2, tokenizer2 = load_model(str(path))
    _train(model2, tokenizer2, movie_user("other-a", 12, offset=1), tmp_path / "a")
    _train(model2, tokenizer2, movie_user("other-b", 7, offset=2), tmp_path / "b")
    stats, after_others = _train(model2, tokenizer2, target, tmp_path / "after")
    assert stats.samples == 10 and stats.steps == 6 and stats.target_tokens > 0 and len(stats.losses) == 6
    assert alone.keys() == after_others.keys() and len(alone) == 4  # q_proj and v_proj, A and B, 1 layer
    for key in alone:
        assert torch.equal(alone[key], after_others[key]), key
    # the base is left exactly as it was, without adapter layers
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    other = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert any(not torch.equal(other[k], alone[k]) for k in alone)
