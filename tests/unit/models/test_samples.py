from __future__ import annotations

import pytest

from oppu.models.samples import IGNORE_INDEX, collate, encode_prompt, encode_sample, target_loss
from oppu.tasks.base import TrainingSample

PROMPT = "description: the robot tells a story about the old city. tag:"
TARGET = " sci-fi"


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return tiny_model[1]


def text_ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_prompt_is_masked_and_target_plus_eos_trained(tokenizer):
    encoded = encode_sample(tokenizer, TrainingSample(PROMPT, TARGET), max_length=256)
    n_prompt = 1 + len(text_ids(tokenizer, PROMPT))
    assert encoded["input_ids"][0] == tokenizer.bos_token_id
    assert encoded["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert encoded["labels"][n_prompt:] == encoded["input_ids"][n_prompt:]
    assert encoded["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(encoded["input_ids"][n_prompt:-1]) == TARGET


def test_tokens_equal_the_joint_tokenization_and_the_generation_prompt(tokenizer):
    encoded = encode_sample(tokenizer, TrainingSample(PROMPT, TARGET), max_length=256)
    joint = [tokenizer.bos_token_id, *text_ids(tokenizer, PROMPT + TARGET), tokenizer.eos_token_id]
    assert encoded["input_ids"] == joint
    prompt_ids = encode_prompt(tokenizer, PROMPT)
    assert encoded["input_ids"][:len(prompt_ids)] == prompt_ids


def test_long_prompt_is_cut_from_the_left_keeping_the_whole_target(tokenizer):
    full = encode_sample(tokenizer, TrainingSample(PROMPT, TARGET), max_length=256)
    n_trained = sum(label != IGNORE_INDEX for label in full["labels"])
    max_length = n_trained + 5  # BOS + the last 4 prompt tokens + target + EOS
    cut = encode_sample(tokenizer, TrainingSample(PROMPT, TARGET), max_length=max_length)
    assert len(cut["input_ids"]) == max_length
    assert cut["input_ids"][0] == tokenizer.bos_token_id
    assert cut["input_ids"][1:5] == text_ids(tokenizer, PROMPT)[-4:]
    assert cut["input_ids"][5:] == full["input_ids"][-n_trained:]
    assert cut["labels"][5:] == full["labels"][-n_trained:]


def test_target_is_cut_from_the_right_once_the_prompt_is_gone(tokenizer):
    target = " the old robot tells a long story about the city and the war in space"
    cut = encode_sample(tokenizer, TrainingSample(PROMPT, target), max_length=6)
    target_ids = text_ids(tokenizer, PROMPT + target)[len(text_ids(tokenizer, PROMPT)):]
    assert cut["input_ids"] == [tokenizer.bos_token_id, *target_ids[:5]]
    assert cut["labels"] == [IGNORE_INDEX, *target_ids[:5]]
    assert tokenizer.eos_token_id not in cut["input_ids"]


def test_empty_prompt_trains_the_whole_text(tokenizer):
    text = "the family keeps a secret until the ending"
    encoded = encode_sample(tokenizer, TrainingSample("", text), max_length=256)
    assert encoded["input_ids"] == [tokenizer.bos_token_id, *text_ids(tokenizer, text), tokenizer.eos_token_id]
    assert encoded["labels"] == [IGNORE_INDEX, *encoded["input_ids"][1:]]


def test_encode_prompt_keeps_the_last_tokens(tokenizer):
    ids = text_ids(tokenizer, PROMPT)
    assert encode_prompt(tokenizer, PROMPT, max_prompt_tokens=3) == [tokenizer.bos_token_id, *ids[-3:]]
    assert encode_prompt(tokenizer, PROMPT, max_prompt_tokens=1000) == [tokenizer.bos_token_id, *ids]


def test_collate_right_pads_with_masked_labels():
    batch = [{"input_ids": [1, 5, 6, 2], "labels": [-100, -100, 6, 2]}, {"input_ids": [1, 7], "labels": [-100, 7]}]
    tensors = collate(batch, pad_id=0)
    assert tensors["input_ids"].tolist() == [[1, 5, 6, 2], [1, 7, 0, 0]]
    assert tensors["labels"].tolist() == [[-100, -100, 6, 2], [-100, 7, -100, -100]]
    assert tensors["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


@pytest.mark.parametrize("peft_config", ["none", "lora", "prompt-tuning"])
def test_target_loss_equals_the_models_own_loss(tiny_model, peft_config):
    import peft
    import torch

    model, tokenizer = tiny_model
    samples = [TrainingSample(PROMPT, TARGET), TrainingSample("a much longer prompt: " + PROMPT * 2, " comedy"),
               TrainingSample("", "the robot tells a story")]  # next-token sample: every position trained
    batch = collate([encode_sample(tokenizer, s, 128) for s in samples], tokenizer.pad_token_id)
    configs = {"lora": peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
               "prompt-tuning": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)}
    if peft_config != "none":
        model = peft.get_peft_model(model, configs[peft_config])
    try:
        with torch.no_grad():
            expected = model(**batch).loss
            assert float(target_loss(model, batch)) == pytest.approx(float(expected), rel=1e-5)
            # rows with prompts only: the answer-only positions are a strict subset of the sequence
            short = collate([encode_sample(tokenizer, s, 128) for s in samples[:2]], tokenizer.pad_token_id)
            assert float(target_loss(model, short)) == pytest.approx(float(model(**short).loss), rel=1e-5)
    finally:
        if peft_config == "lora":
            model.base_model.unload()
