"""Training samples as token ids: ``[BOS] prompt target [EOS]`` with only ``target [EOS]`` trained.

Training and generation must see the same prompt tokens, so both go through
``encode_prompt``: the prompt is tokenized on its own (no special tokens) and BOS is put in
front by hand. Under the ``chat`` prompt format (``oppu.models.prompting``) the prompt is the
user turn of the model's chat template instead, and the target is the assistant's answer ending
in the template's end-of-turn token. The target's tokens are the continuation of the prompt's in the joint
tokenization of ``prompt + target`` (a supervised target starts with a space, so for the usual
tokenizers the joint text splits exactly at the boundary); what the model learns to emit after
the prompt is what the tokenizer would produce for the whole text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from oppu.models.prompting import PLAIN, chat_frame

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100  # label of a position the loss skips (prompt, padding); torch's default


class PromptTarget(Protocol):
    """What ``encode_sample`` needs of a sample (``oppu.tasks.base.TrainingSample`` fits)."""

    prompt: str
    target: str


def _text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _bos(tokenizer) -> list[int]:
    # Some tokenizers (Qwen, GPT-2 style) have no BOS; their models were trained without one.
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _frame(tokenizer, prompt_format: str) -> tuple[list[int], list[int]]:
    """Token ids around the prompt: (BOS, nothing) in plain format, the chat template's turn else."""
    return (_bos(tokenizer), []) if prompt_format == PLAIN else chat_frame(tokenizer)


def encode_prompt(tokenizer, prompt: str, max_prompt_tokens: int | None = None,
                  prompt_format: str = PLAIN) -> list[int]:
    """BOS + the prompt's tokens (or the chat turn around them), keeping only the last
    ``max_prompt_tokens`` of the prompt's own tokens."""
    head, tail = _frame(tokenizer, prompt_format)
    ids = _text_ids(tokenizer, prompt)
    if max_prompt_tokens is not None:
        ids = ids[max(0, len(ids) - max_prompt_tokens):] if max_prompt_tokens > 0 else []
    return head + ids + tail


def encode_sample(tokenizer, sample: PromptTarget, max_length: int,
                  prompt_format: str = PLAIN) -> dict[str, list[int]]:
    """Token ids and labels of one sample, at most ``max_length`` long.

    Labels are -100 on BOS and the prompt and equal the ids on the target and EOS. When too
    long, the prompt loses tokens from the left (LaMP prompts end with the query), then the
    target (with its EOS) from the right. An empty prompt trains the whole text, in either
    format (history text learnt by next-token prediction has no turn to answer).
    In ``chat`` format the prompt sits in the template's user turn (its frame never cut) and the
    target, without its leading separator space, is the assistant's answer.
    """
    return encode_samples(tokenizer, [sample], max_length, prompt_format)[0]


def encode_samples(tokenizer, samples: Sequence[PromptTarget], max_length: int,
                   prompt_format: str = PLAIN) -> list[dict[str, list[int]]]:
    """``encode_sample`` of each of ``samples``, the tokenizer called on all their texts at once.

    A fast tokenizer encodes a list in parallel, outside the GIL; one sample at a time cost about
    1 ms of Python per LaMP-2M sample (the chat frame rendered, four tokenizer calls), on the
    critical path of every training step that tokenizes its batch.
    """
    if not samples:
        return []
    formats = [prompt_format if sample.prompt else PLAIN for sample in samples]
    frames = {fmt: _frame(tokenizer, fmt) for fmt in set(formats)}
    prompt_ids = _texts_ids(tokenizer, [sample.prompt for sample in samples])
    # Plain: the target as it tokenizes after the prompt, unless the prompt's last token merges
    # with the target's first in the joint text: generation only ever sees the prompt's own
    # tokens, so such a target is tokenized on its own. Chat: the target is the answer's own text.
    joint = [i for i, (sample, fmt) in enumerate(zip(samples, formats, strict=True))
             if fmt == PLAIN and sample.prompt]
    target_ids: list[list[int] | None] = [None] * len(samples)
    for i, ids in zip(joint, _texts_ids(tokenizer, [samples[i].prompt + samples[i].target for i in joint]),
                      strict=True):
        if ids[:len(prompt_ids[i])] == prompt_ids[i]:
            target_ids[i] = ids[len(prompt_ids[i]):]
    alone = [i for i in range(len(samples)) if target_ids[i] is None]
    texts = [samples[i].target.lstrip() if formats[i] != PLAIN else samples[i].target for i in alone]
    for i, ids in zip(alone, _texts_ids(tokenizer, texts), strict=True):
        target_ids[i] = ids
    return [_assemble(*frames[fmt], prompt, target + [tokenizer.eos_token_id], max_length)
            for fmt, prompt, target in zip(formats, prompt_ids, target_ids, strict=True)]


def _texts_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """``_text_ids`` of each text, in one tokenizer call (empty texts: no tokens)."""
    wanted = [i for i, text in enumerate(texts) if text]
    out: list[list[int]] = [[] for _ in texts]
    if wanted:
        for i, ids in zip(wanted, tokenizer([texts[i] for i in wanted], add_special_tokens=False)["input_ids"],
                          strict=True):
            out[i] = list(ids)
    return out


def _assemble(head: list[int], tail: list[int], prompt_ids: list[int], trained: list[int],
              max_length: int) -> dict[str, list[int]]:
    frame = len(head) + len(tail)
    if max_length <= frame:
        raise ValueError(f"max_length={max_length} leaves no room for any token after the prompt's "
                         f"{frame} frame tokens")
    prompt_budget = max(0, max_length - frame - len(trained))
    prompt_ids = prompt_ids[max(0, len(prompt_ids) - prompt_budget):] if prompt_budget else []
    trained = trained[:max_length - frame - len(prompt_ids)]
    masked = head + prompt_ids + tail
    return {"input_ids": masked + trained, "labels": [IGNORE_INDEX] * len(masked) + trained}


def collate(batch: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded samples into ``input_ids``, ``labels`` (-100 on padding), ``attention_mask``."""
    import torch

    width = max(len(row["input_ids"]) for row in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, row in enumerate(batch):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(row["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def target_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens: the loss ``model(**batch).loss`` gives.

    The LM head runs only at the positions that predict a labelled token in some row. A
    supervised LaMP sample trains a few answer tokens after a prompt of hundreds; with a real
    LLM's vocabulary the float32 logits of every prompt position are the largest activation of
    the step (8 x 512 positions x 32k vocabulary = 0.5 GB) and are thrown away. (On the tiny
    CPU default, 3k vocabulary and ~100-token prompts, the step time measured the same either
    way.) Prompt learning (PEFT prompt tuning) prepends virtual tokens, which shifts every
    position, so such a model takes the ordinary path.
    """
    import torch

    if _prepends_virtual_tokens(model):
        return model(**batch).loss
    labels = batch["labels"]
    positions = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    logits = model(**inputs, logits_to_keep=positions).logits
    return torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), labels[:, positions + 1].flatten(), ignore_index=IGNORE_INDEX)


def _prepends_virtual_tokens(model) -> bool:
    model = getattr(model, "module", model)  # DDP and DeepSpeed engines wrap the model
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))
