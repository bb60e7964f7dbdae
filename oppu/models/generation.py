"""Batched greedy decoding that gives the same text as decoding each prompt alone.

Prompts are encoded exactly as in training (``encode_prompt``: BOS + the prompt's own tokens, or
the chat template's user turn around them in ``chat`` format),
left-padded so every row's continuation starts at the same column, and decoded with
``model.generate(do_sample=False)`` (KV cache; Llama-style models derive positions from the
attention mask, so padding does not shift them). Prompts are sorted by length so a batch wastes
little on padding; results come back in input order.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

from oppu.models.samples import encode_prompt


def _stop_ids(model, tokenizer) -> set[int]:
    stop = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:  # chat models stop on extra ids too (Llama 3's <|eot_id|>)
        stop |= set(configured) if isinstance(configured, list | tuple) else {configured}
    return {i for i in stop if i is not None}


@contextmanager
def inference(model):
    """The block runs ``model`` in eval mode without autograd; its training mode comes back after."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def left_padded(rows: Sequence[Sequence[int]], pad_id: int):
    """``(input_ids, attention_mask)`` of ``rows`` padded on the left to the longest, so every row
    ends in the last column (where decoding continues, or where a scored answer ends)."""
    import torch

    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, ids in enumerate(rows):
        input_ids[r, width - len(ids):] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[r, width - len(ids):] = 1
    return input_ids, attention_mask


def generate_greedy(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 16,
                    max_prompt_tokens: int | None = None, prompt_format: str = "plain") -> list[str]:
    """The greedy continuation of each prompt, up to ``max_new_tokens`` tokens, stopped at EOS.

    Only the continuation is returned, decoded without special tokens. A prompt longer than
    ``max_prompt_tokens`` tokens keeps its last ones (LaMP prompts end with the query). Works
    for plain and ``PeftModel`` models; the model is put in eval mode for the call.
    """
    from transformers import GenerationConfig

    if not prompts:
        return []
    stop_ids = _stop_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generation_config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                         pad_token_id=pad_id, eos_token_id=sorted(stop_ids))
    device = next(model.parameters()).device
    encoded = [encode_prompt(tokenizer, prompt, max_prompt_tokens, prompt_format) for prompt in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
    outputs: list[str] = [""] * len(prompts)

    with inference(model):
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            input_ids, attention_mask = left_padded([encoded[i] for i in rows], pad_id)
            width = input_ids.shape[1]
            generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                       generation_config=generation_config)
            for r, i in enumerate(rows):
                continuation = generated[r, width:].tolist()
                end = next((k for k, t in enumerate(continuation) if t in stop_ids), len(continuation))
                outputs[i] = tokenizer.decode(continuation[:end], skip_special_tokens=True)
    return outputs
