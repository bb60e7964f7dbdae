"""The model's log-probability of each candidate answer after each prompt (label scoring).

A task with a fixed label set can be answered without free generation: every label is scored as
the complete answer the model was trained to give (its tokens and the end-of-answer token, in
exactly the tokens ``encode_samples`` trains on), and the task's decision rule picks one
(``oppu.tasks.decisions``). Prompts are encoded as for generation (``encode_prompt``), so a
scored prompt is the generated prompt token for token.

Each (prompt, label) pair is one row, left-padded so that every row's answer ends at the last
column; positions are counted from each row's first real token (as ``generate`` does), and only
the last columns' logits are computed (``logits_to_keep``), so a 49k-token vocabulary costs a few
columns per row, not the whole prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from oppu.models.generation import inference, left_padded
from oppu.models.samples import IGNORE_INDEX, encode_prompt, encode_samples

_NO_LIMIT = 1 << 30  # encode_samples' max_length when nothing may be cut from the answer


@dataclass(frozen=True)
class _Answer:
    prompt: str
    target: str


def answer_ids(tokenizer, prompt: str, answers: Sequence[str], prompt_format: str) -> list[list[int]]:
    """Each answer's trained tokens after ``prompt``: its text as training tokenizes it plus EOS.

    An answer is given as the task writes it in a training target (``" " + label``)."""
    encoded = encode_samples(tokenizer, [_Answer(prompt, answer) for answer in answers], _NO_LIMIT, prompt_format)
    return [[t for t, label in zip(e["input_ids"], e["labels"], strict=True) if label != IGNORE_INDEX]
            for e in encoded]


def score_answers(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 16,
                  max_prompt_tokens: int | None = None, prompt_format: str = "plain") -> list[list[float]]:
    """``[prompt][answer]``: the summed log-probability of each whole answer after each prompt.

    ``batch_size`` counts rows, one per (prompt, answer) pair. Works for plain and ``PeftModel``
    models; the model is put in eval mode for the call.
    """
    import torch

    if not prompts:
        return []
    if not answers:
        raise ValueError("score_answers needs at least one answer to score")
    rows: list[tuple[int, int, list[int], int]] = []  # (prompt, answer, ids, answer length)
    for p, prompt in enumerate(prompts):
        head = encode_prompt(tokenizer, prompt, max_prompt_tokens, prompt_format)
        for a, ids in enumerate(answer_ids(tokenizer, prompt, answers, prompt_format)):
            rows.append((p, a, head + ids, len(ids)))
    rows.sort(key=lambda row: len(row[2]), reverse=True)  # a batch wastes little on padding
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    scores = [[0.0] * len(answers) for _ in prompts]

    with inference(model):
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            keep = max(n for *_, n in batch) + 1  # the answer's tokens are predicted from one column earlier
            input_ids, attention_mask = left_padded([ids for _, _, ids, _ in batch], pad_id)
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                           position_ids=position_ids.to(device), logits_to_keep=keep).logits
            log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # column j predicts j + 1
            # Row r's answer is its last n tokens, predicted by the last n of these columns.
            targets = torch.zeros((len(batch), keep - 1), dtype=torch.long)
            counted = torch.zeros((len(batch), keep - 1), dtype=torch.bool)
            for r, (_, _, ids, n) in enumerate(batch):
                targets[r, keep - 1 - n:] = torch.tensor(ids[-n:], dtype=torch.long)
                counted[r, keep - 1 - n:] = True
            picked = log_probs.gather(-1, targets.to(device)[..., None]).squeeze(-1)
            sums = picked.masked_fill(~counted.to(device), 0.0).sum(-1).tolist()
            for (p, a, _, _), total in zip(batch, sums, strict=True):
                scores[p][a] = total
    return scores
