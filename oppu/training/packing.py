"""Group tokenised samples of many users into forward passes with little padding.

Two ways, both keeping every sample whole:

- Packing (``pack_rows`` / ``collate_packed``, what ``oppu.training.batched`` uses): samples of
  many users are laid end to end in one flat sequence of up to ``max_tokens`` tokens per forward
  pass (as few passes as first-fit decreasing finds, tokens spread evenly over them). Attention
  stays inside each sample through variable-length ("varlen") causal flash attention over the samples' boundaries
  (``cu_seqlens``; ``oppu.training.varlen``), positions restart at 0 in every sample, and each
  token goes through its own user's LoRA (per-token slot selection, ``oppu.models.multi_lora``).
  No padding but a pass's tail rounded up to ``width_multiple``.
- Length grouping (``group_by_length`` / ``collate``): each row of a pass is one sample, rows of
  similar length right-padded together, where causal attention keeps the padding invisible to
  the real tokens; PyTorch's plain SDPA applies. The padding left is a few percent to ~10%
  (``MicroBatch.padding_tokens`` counts it), and every pass has its own shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Row:
    """One tokenised sample of one owner (a user, or the adapter slot that user trains in)."""

    owner: int
    sample: int  # the sample's index in its owner's list
    input_ids: Sequence[int]
    labels: Sequence[int]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels) or not self.input_ids:
            raise ValueError(f"sample {self.sample} of owner {self.owner}: input_ids ({len(self.input_ids)}) "
                             f"and labels ({len(self.labels)}) must be equally long and non-empty")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def target_tokens(self) -> int:
        """Tokens this row is trained to predict (labels are shifted left by one in the loss)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


@dataclass(frozen=True)
class MicroBatch:
    """Rows that go through the model together, right-padded to ``width``."""

    rows: tuple[Row, ...]
    width: int

    @property
    def real_tokens(self) -> int:
        return sum(len(row) for row in self.rows)

    @property
    def padding_tokens(self) -> int:
        return len(self.rows) * self.width - self.real_tokens


def group_by_length(rows: Sequence[Row], max_tokens: int, batch_overhead_tokens: int = 256,
                    width_multiple: int = 1) -> list[MicroBatch]:
    """Cut ``rows`` into micro-batches of at most ``max_tokens`` padded tokens, longest rows first.

    Rows sorted by length are split into consecutive runs chosen (by dynamic programming) to
    minimise padded tokens plus ``batch_overhead_tokens`` per micro-batch: the overhead prices
    the fixed cost of a forward/backward pass, so the split trades a little padding for fewer,
    fuller passes. ``width_multiple`` rounds each micro-batch's width up (64 on GPU: fewer
    distinct shapes for kernels that plan per shape, better matmul tiles). The order (length
    descending, then owner, then sample) depends only on the rows, so the same rows always make
    the same micro-batches.
    """
    ordered = sorted(rows, key=lambda row: (-len(row), row.owner, row.sample))
    for row in ordered:
        if len(row) > max_tokens:
            raise ValueError(f"sample {row.sample} of owner {row.owner} has {len(row)} tokens, "
                             f"more than max_tokens={max_tokens}")
    n = len(ordered)
    lengths = [len(row) for row in ordered]
    widths = [min(max_tokens, -(-length // width_multiple) * width_multiple) for length in lengths]
    # best[i]: least cost of batching ordered[i:]; cut[i]: where the first batch of that split ends.
    best = [0.0] * (n + 1)
    cut = [n] * (n + 1)
    for start in range(n - 1, -1, -1):
        width = widths[start]
        best[start] = float("inf")
        real = 0
        for end in range(start + 1, min(n, start + max_tokens // width) + 1):
            real += lengths[end - 1]
            cost = (end - start) * width - real + batch_overhead_tokens + best[end]
            if cost < best[start]:
                best[start], cut[start] = cost, end
    batches = []
    start = 0
    while start < n:
        end = cut[start]
        batches.append(MicroBatch(tuple(ordered[start:end]), widths[start]))
        start = end
    return batches


def collate(batch: MicroBatch, pad_token_id: int, device=None) -> dict:
    """Tensors for one micro-batch, built on the host and copied without a sync (pinned, non-blocking).

    ``input_ids`` / ``labels`` are ``[rows, width]`` (pads: ``pad_token_id`` / ``IGNORE_INDEX``),
    ``owners`` ``[rows]``; ``trained_positions`` indexes the flattened ``[rows, width - 1]``
    predictions that have a target (labels shifted left by one), ``trained_labels`` and
    ``trained_owners`` are those targets and their rows' owners. Selecting trained positions with
    an index made here, rather than a boolean mask on the device, keeps the host from waiting
    for the GPU.
    """
    import torch

    input_ids = torch.full((len(batch.rows), batch.width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch.rows), batch.width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(batch.rows):
        input_ids[i, :len(row)] = torch.as_tensor(row.input_ids, dtype=torch.long)
        labels[i, :len(row)] = torch.as_tensor(row.labels, dtype=torch.long)
    owners = torch.tensor([row.owner for row in batch.rows], dtype=torch.long)
    shifted = labels[:, 1:]
    trained = shifted != IGNORE_INDEX
    tensors = {"input_ids": input_ids, "labels": labels, "owners": owners,
               "trained_positions": trained.flatten().nonzero().squeeze(1),
               "trained_labels": shifted[trained],
               "trained_owners": owners[:, None].expand_as(shifted)[trained]}
    return {name: to_device(tensor, device) for name, tensor in tensors.items()}


def to_device(tensor, device):
    """Host tensor -> ``device``; to a GPU through pinned memory, asynchronously."""
    import torch

    if device is None or torch.device(device).type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True)
class PackedBatch:
    """Whole samples laid end to end in one sequence of ``width`` tokens (the tail is padding)."""

    rows: tuple[Row, ...]
    width: int

    @property
    def real_tokens(self) -> int:
        return sum(len(row) for row in self.rows)

    @property
    def padding_tokens(self) -> int:
        return self.width - self.real_tokens


def pack_rows(rows: Sequence[Row], max_tokens: int, width_multiple: int = 1, owner_align: int = 1) -> list[PackedBatch]:
    """Pack ``rows`` into as few sequences of at most ``max_tokens`` tokens as first-fit decreasing
    finds, with the tokens spread evenly over them.

    ``owner_align`` > 1 counts each owner's tokens in a pass rounded up to a multiple of it, the room
    ``collate_packed(..., owner_align)`` pads each owner's block to.

    First-fit decreasing fixes the number of passes; the rows are then dealt, longest first, to
    the least loaded pass with room (kept only if every row fits), so a step does not end in
    one small pass: on a GPU a short pass cannot hide the host's kernel launches behind its
    work, and the GPU waits. Ties go by owner, sample: the same rows always pack the same way.
    A pass's width is its tokens rounded up to ``width_multiple`` (at most ``max_tokens``); the
    rounding is its only padding.
    """
    ordered = sorted(rows, key=lambda row: (-len(row), row.owner, row.sample))
    for row in ordered:
        if len(row) > max_tokens:
            raise ValueError(f"sample {row.sample} of owner {row.owner} has {len(row)} tokens, "
                             f"more than max_tokens={max_tokens}")
    bins = _first_fit_decreasing(ordered, max_tokens, owner_align)
    balanced = _least_loaded(ordered, len(bins), max_tokens, owner_align)
    if balanced is not None:
        bins = balanced
    # Within a pass, each owner's samples side by side: the LoRA runs one owner's tokens at a
    # time (``collate_packed``'s ``owner_spans``), so fewer runs are fewer kernels.
    return [PackedBatch(tuple(sorted(pass_bin.rows, key=lambda row: (row.owner, row.sample))),
                        min(max_tokens, -(-pass_bin.load // width_multiple) * width_multiple))
            for pass_bin in bins]


class _Bin:
    """A pass being filled: its rows and its tokens, each owner's rounded up to ``owner_align``."""

    def __init__(self, owner_align: int):
        self.rows: list[Row] = []
        self.load = 0
        self._align = owner_align
        self._owner_tokens: dict[int, int] = {}

    def load_with(self, row: Row) -> int:
        before = self._owner_tokens.get(row.owner, 0)
        return self.load - _round_up(before, self._align) + _round_up(before + len(row), self._align)

    def add(self, row: Row) -> None:
        self.load = self.load_with(row)
        self._owner_tokens[row.owner] = self._owner_tokens.get(row.owner, 0) + len(row)
        self.rows.append(row)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _first_fit_decreasing(ordered: Sequence[Row], max_tokens: int, owner_align: int) -> list[_Bin]:
    bins: list[_Bin] = []
    for row in ordered:
        for pass_bin in bins:
            if pass_bin.load_with(row) <= max_tokens:
                pass_bin.add(row)
                break
        else:
            if _round_up(len(row), owner_align) > max_tokens:
                raise ValueError(f"sample {row.sample} of owner {row.owner} has {len(row)} tokens, more than "
                                 f"max_tokens={max_tokens} once its owner's block is padded to {owner_align}")
            bins.append(_Bin(owner_align))
            bins[-1].add(row)
    return bins


def _least_loaded(ordered: Sequence[Row], n_bins: int, max_tokens: int, owner_align: int) -> list[_Bin] | None:
    """``ordered`` dealt to ``n_bins`` bins, each row to the least loaded one; None if a row would overflow."""
    bins = [_Bin(owner_align) for _ in range(n_bins)]
    for row in ordered:
        target = min(bins, key=lambda pass_bin: pass_bin.load)  # min keeps the first of equal loads
        if target.load_with(row) > max_tokens:
            return None
        target.add(row)
    return bins


def collate_packed(batch: PackedBatch, pad_token_id: int, device=None, owner_align: int = 1) -> dict:
    """Tensors for one packed pass, built on the host and copied without a sync.

    ``input_ids``, ``position_ids`` (restarting at 0 in every sample) and ``owners`` (the row's
    owner for each token, -1 on padding) are ``[1, width]``; ``cu_seqlens`` (int32) are the
    sample boundaries, the padding tail counted as one more segment so that every position has
    defined attention, and ``max_seqlen`` (a host int) the longest segment.
    ``trained_positions`` index the positions that predict a labelled token of their own sample
    (position ``t`` predicts token ``t + 1``), with ``trained_labels`` / ``trained_owners``.
    ``owner_spans`` (host ints, for ``multi_lora.model_adapters``) are the runs of one owner's
    tokens, ``(owner, start, end)``, padding left out: built here so the LoRA layers learn
    where each owner's tokens lie without reading ``owners`` back from the device.

    ``owner_align`` > 1 pads each owner's block of samples to a multiple of it with a segment of
    padding of that owner's (attending only to itself, predicting nothing): the owners' runs then
    start at multiples of ``owner_align`` and follow one another, so the LoRA's grouped GEMM reads
    the pass's tokens where they lie (``oppu.models.span_lora``) instead of copying them into a layout.
    The pass's padding tail, where it is a multiple of ``owner_align``, is the last owner's too.
    """
    import itertools

    import torch

    width = batch.width
    # (owner, token ids, the label each position predicts): samples, and each owner's alignment padding.
    segments: list[tuple[int, Sequence[int], Sequence[int]]] = []
    for owner, rows in itertools.groupby(batch.rows, key=lambda row: row.owner):
        block = 0
        for row in rows:
            segments.append((owner, row.input_ids,
                             list(itertools.chain(itertools.islice(row.labels, 1, None), (IGNORE_INDEX,)))))
            block += len(row)
        if block % owner_align:
            pad = owner_align - block % owner_align
            segments.append((owner, [pad_token_id] * pad, [IGNORE_INDEX] * pad))
    lengths = [len(ids) for _, ids, _ in segments]
    offset = sum(lengths)
    if owner_align > 1 and segments and 0 < width - offset and (width - offset) % owner_align == 0:
        # The pass's padding tail counted as the last owner's too: the runs then cover every token,
        # and the LoRA adds its update to the whole output rather than to a slice of it.
        segments.append((segments[-1][0], [pad_token_id] * (width - offset), [IGNORE_INDEX] * (width - offset)))
        lengths.append(width - offset)
        offset = width
    if offset > width:
        raise ValueError(f"packed rows hold {offset} tokens (each owner's padded to {owner_align}), "
                         f"more than the width {width}")
    # Built as whole lists and a few tensor ops, not per row: ~200 rows a step made this loop a
    # visible share of the host's time, with the GPU waiting on it.
    ids = list(itertools.chain.from_iterable(ids for _, ids, _ in segments))
    next_labels = list(itertools.chain.from_iterable(labels for _, _, labels in segments))
    boundaries = [0, *itertools.accumulate(lengths)]
    spans: list[tuple[int, int, int]] = []
    for (owner, _, _), start, end in zip(segments, boundaries, boundaries[1:], strict=False):
        if spans and spans[-1][0] == owner and spans[-1][2] == start:
            spans[-1] = (owner, spans[-1][1], end)
        else:
            spans.append((owner, start, end))
    if offset < width:
        boundaries.append(width)  # the padding tail: one more segment
    segment_lengths = torch.tensor([end - start for start, end in zip(boundaries, boundaries[1:], strict=False)])
    starts = torch.tensor(boundaries[:-1])
    positions = torch.arange(width) - torch.repeat_interleave(starts, segment_lengths)
    input_ids = torch.full((1, width), pad_token_id, dtype=torch.long)
    input_ids[0, :offset] = torch.tensor(ids, dtype=torch.long)
    owners = torch.full((width,), -1, dtype=torch.long)
    owners[:offset] = torch.repeat_interleave(torch.tensor([owner for owner, _, _ in segments], dtype=torch.long),
                                              torch.tensor(lengths, dtype=torch.long))
    targets = torch.tensor(next_labels, dtype=torch.long)
    trained = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    lengths = segment_lengths.tolist()
    tensors = {"input_ids": input_ids, "position_ids": positions[None, :], "owners": owners[None, :],
               "cu_seqlens": torch.tensor(boundaries, dtype=torch.int32),
               "trained_positions": trained, "trained_labels": targets[trained], "trained_owners": owners[trained]}
    out = {name: to_device(tensor, device) for name, tensor in tensors.items()}
    out["max_seqlen"] = max(lengths)
    out["owner_spans"] = spans
    return out
