from __future__ import annotations

import pytest
import torch

from oppu.models.generation import generate_greedy
from oppu.models.samples import encode_prompt

from .conftest import make_corpus

PROMPTS = [
    "description: the robot tells",
    "description: a funny family story about love and war in the old city, a",
    "tag:",
    "description: the dark",
    "description: space",
]


def greedy_by_hand(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> str:
    """Argmax over the full sequence at every step: no batching, no padding, no KV cache."""
    ids = list(prompt_ids)
    new: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            next_id = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if next_id == tokenizer.eos_token_id:
                break
            ids.append(next_id)
            new.append(next_id)
    return tokenizer.decode(new, skip_special_tokens=True)


def test_batched_output_equals_one_prompt_at_a_time_and_by_hand(tiny_model):
    model, tokenizer = tiny_model
    batched = generate_greedy(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=4)
    alone = [generate_greedy(model, tokenizer, [p], max_new_tokens=8)[0] for p in PROMPTS]
    by_hand = [greedy_by_hand(model, tokenizer, encode_prompt(tokenizer, p), 8) for p in PROMPTS]
    assert batched == alone == by_hand
    assert any(text.strip() for text in batched)  # the pretrained model does continue the text


def test_outputs_come_back_in_input_order(tiny_model):
    model, tokenizer = tiny_model
    forward = generate_greedy(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=2)
    backward = generate_greedy(model, tokenizer, PROMPTS[::-1], max_new_tokens=6, batch_size=3)
    assert backward == forward[::-1]
    assert len(set(forward)) > 1


def test_long_prompt_keeps_its_last_tokens(tiny_model):
    model, tokenizer = tiny_model
    long_prompt = " ".join(make_corpus(4, seed=1)) + " description: the old robot"
    ids = tokenizer(long_prompt, add_special_tokens=False)["input_ids"]
    got = generate_greedy(model, tokenizer, [long_prompt, "tag:"], max_new_tokens=6, max_prompt_tokens=10)
    assert got[0] == greedy_by_hand(model, tokenizer, [tokenizer.bos_token_id, *ids[-10:]], 6)


def test_generation_stops_at_eos(tiny_model):
    model, tokenizer = tiny_model
    # Documents end with EOS in pretraining, so a finished "tag: x" line is followed by EOS quickly.
    outputs = generate_greedy(model, tokenizer, [doc.rsplit(" tag:", 1)[0] + " tag:" for doc in make_corpus(6)],
                              max_new_tokens=40)
    for text in outputs:
        assert tokenizer.eos_token not in text and tokenizer.bos_token not in text
    assert any(len(tokenizer(text, add_special_tokens=False)["input_ids"]) < 40 for text in outputs)


def test_peft_model_generates_like_its_base_until_trained(tiny_model):
    peft = pytest.importorskip("peft")
    model, tokenizer = tiny_model
    base_out = generate_greedy(model, tokenizer, PROMPTS, max_new_tokens=6)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    try:
        assert generate_greedy(lora, tokenizer, PROMPTS, max_new_tokens=6) == base_out  # LoRA B starts at zero
        with torch.no_grad():
            for name, param in lora.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
        assert generate_greedy(lora, tokenizer, PROMPTS, max_new_tokens=6) != base_out
    finally:
        lora.unload()
    assert generate_greedy(model, tokenizer, PROMPTS, max_new_tokens=6) == base_out
