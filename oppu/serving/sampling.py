"""Choosing each row's next token with that row's own OpenAI sampling parameters.

A batch mixes rows of different requests; every row is sampled from its own logits with its own
temperature, top-p, top-k, penalties and random generator, so a greedy row (temperature 0, no
penalties) picks the same token as it would alone, and a seeded row draws the same numbers
whatever else is in the batch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI's decoding options for one request (``top_k`` is an extension, 0 = off)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: no logprobs; N: the chosen token's and the N most likely

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that needs the row's own logits on the host side."""
        return self.greedy and not self.presence_penalty and not self.frequency_penalty and self.logprobs is None


@dataclass
class TokenLogprob:
    """The chosen token's log-probability under the model, and the ``top`` most likely alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RowSampler:
    """Per-sequence sampling state: its parameters, its generator and the counts its penalties read."""

    params: SamplingParams
    generator: Any = None  # torch.Generator on the model's device; None for greedy rows
    counts: Counter = field(default_factory=Counter)

    @classmethod
    def create(cls, params: SamplingParams, device: Any) -> RowSampler:
        import random

        import torch

        generator = None
        if not params.greedy:
            generator = torch.Generator(device=device)
            generator.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
        return cls(params, generator)


def choose_tokens(logits: Any, samplers: list[RowSampler]) -> tuple[list[int], list[TokenLogprob | None]]:
    """The next token per row of ``logits`` (``[rows, vocab]``) and, where asked, its logprobs.

    Rows that are plain greedy share one batched argmax; the others are sampled one by one.
    """
    import torch

    tokens: list[int | None] = [None] * len(samplers)
    logprobs: list[TokenLogprob | None] = [None] * len(samplers)
    plain = [i for i, s in enumerate(samplers) if s.params.plain_greedy]
    if plain:
        index = torch.tensor(plain, device=logits.device)
        for i, token in zip(plain, logits.index_select(0, index).argmax(-1).tolist(), strict=True):
            tokens[i] = token
    for i, sampler in enumerate(samplers):
        if tokens[i] is not None:
            continue
        row = logits[i].float()
        token = _sample_row(row, sampler)
        tokens[i] = token
        if sampler.params.logprobs is not None:
            logprobs[i] = _logprobs(row, token, sampler.params.logprobs)
    for i, sampler in enumerate(samplers):
        sampler.counts[tokens[i]] += 1
    return tokens, logprobs


def _sample_row(row: Any, sampler: RowSampler) -> int:
    import torch

    params = sampler.params
    if sampler.counts and (params.presence_penalty or params.frequency_penalty):
        ids = torch.tensor(list(sampler.counts), device=row.device)
        counts = torch.tensor(list(sampler.counts.values()), dtype=row.dtype, device=row.device)
        row = row.clone()
        row[ids] -= params.presence_penalty + params.frequency_penalty * counts
    if params.greedy:
        return int(row.argmax())
    row = row / params.temperature
    if params.top_k and params.top_k < row.shape[-1]:
        kth = torch.topk(row, params.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = cumulative - sorted_logits.softmax(-1) >= params.top_p
        row = row.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = row.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=sampler.generator))


def _logprobs(row: Any, token: int, top: int) -> TokenLogprob:
    import torch

    logprobs = torch.log_softmax(row, -1)
    alternatives: list[tuple[int, float]] = []
    if top:
        values, ids = torch.topk(logprobs, top)
        alternatives = list(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token, float(logprobs[token]), alternatives)

