"""Label scoring: each answer's log-probability is exactly what training's loss measures on it."""

from __future__ import annotations

import copy

import pytest
import torch

from oppu.models.label_scoring import score_answers
from oppu.models.samples import IGNORE_INDEX, encode_prompt, encode_sample
from oppu.tasks.base import TrainingSample

from .conftest import TAGS, make_corpus
from .test_prompting import CHATML

PROMPTS = [
    "description: the robot tells a story about space, a sci-fi film. tag:",
    "description: a funny family story about love and war in the old city, a comedy film. tag:",
    "tag:",
    "description: the dark",
]
ANSWERS = [" " + tag for tag in TAGS]


def flat(rows: list[list[float]]) -> list[float]:
    return [score for row in rows for score in row]


def trained_log_prob(model, tokenizer, prompt: str, answer: str, prompt_format: str = "plain") -> float:
    """Minus the summed training loss of ``(prompt, answer)``, one unpadded sequence at a time."""
    sample = encode_sample(tokenizer, TrainingSample(prompt, answer), 10_000, prompt_format)
    labels = torch.tensor([sample["labels"]])
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([sample["input_ids"]]), labels=labels)
    return -float(out.loss) * int((labels[:, 1:] != IGNORE_INDEX).sum())


@pytest.mark.parametrize("prompt_format", ["plain", "chat"])
def test_scores_equal_the_training_loss_batched_or_alone(tiny_model, prompt_format):
    model, tokenizer = tiny_model
    if prompt_format == "chat":
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.chat_template = CHATML
    batched = score_answers(model, tokenizer, PROMPTS, ANSWERS, batch_size=7, prompt_format=prompt_format)
    for p, prompt in enumerate(PROMPTS):
        alone = score_answers(model, tokenizer, [prompt], ANSWERS, batch_size=1, prompt_format=prompt_format)[0]
        by_loss = [trained_log_prob(model, tokenizer, prompt, a, prompt_format) for a in ANSWERS]
        assert batched[p] == pytest.approx(alone, abs=1e-4)
        assert batched[p] == pytest.approx(by_loss, abs=1e-4)
    assert all(score < 0 for row in batched for score in row)


def test_long_prompts_keep_their_last_tokens_as_in_generation(tiny_model):
    model, tokenizer = tiny_model
    long_prompt = " ".join(make_corpus(4, seed=1)) + " description: the old robot tag:"
    got = score_answers(model, tokenizer, [long_prompt], ANSWERS, max_prompt_tokens=10)[0]
    head = encode_prompt(tokenizer, long_prompt, max_prompt_tokens=10)
    short = tokenizer.decode(head[1:])  # the kept tokens, re-read as a prompt of their own
    assert got == pytest.approx(score_answers(model, tokenizer, [short], ANSWERS)[0], abs=1e-4)


def test_an_adapter_changes_the_scores(tiny_model):
    peft = pytest.importorskip("peft")
    model, tokenizer = tiny_model
    base = flat(score_answers(model, tokenizer, PROMPTS[:2], ANSWERS))
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    try:
        assert flat(score_answers(lora, tokenizer, PROMPTS[:2], ANSWERS)) == pytest.approx(base, abs=1e-5)
        with torch.no_grad():
            for name, param in lora.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
        assert flat(score_answers(lora, tokenizer, PROMPTS[:2], ANSWERS)) != pytest.approx(base, abs=1e-3)
    finally:
        lora.unload()


def test_no_answers_is_an_error(tiny_model):
    model, tokenizer = tiny_model
    assert score_answers(model, tokenizer, [], ANSWERS) == []
    with pytest.raises(ValueError, match="at least one answer"):
        score_answers(model, tokenizer, PROMPTS, [])
