"""Group tokenised samples of many users into forward passes with little padding.

Each row of a forward pass is one whole sample of one user, so per-row adapter selection
(``oppu.models.multi_lora``) applies the right user's LoRA to every token. Rows are grouped by
length: the samples of a step are sorted longest first and cut into runs of similar length whose
padded size (rows x longest row) stays within ``max_tokens``. Padding goes on the right, where causal
attention keeps it invisible to the real tokens; so no attention mask is needed and PyTorch's
scaled-dot-product attention can take its fused causal kernel. True packing (several samples in a
row) would need a block-diagonal mask, which takes that kernel away; with a step's samples sorted
by length the padding left by grouping is a few percent (``MicroBatch.padding_tokens`` counts it).
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
