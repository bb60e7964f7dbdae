"""The running batch's rows and their KV cache, for continuous batching (``oppu.serving.scheduler``).

Rows are left-padded: a row that joins with a shorter history gets masked columns in front
(:func:`merge_rows`), and columns no remaining row uses are cut off when rows leave
(:func:`select_rows`). A cache's layers append a decode step's keys and values in place, into
buffers with headroom (:func:`grow_in_place`), instead of copying the whole history every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Rows:
    """Rows decoded together: their sequences, one KV cache and its ``[rows, length]`` mask."""

    seqs: list[Any]  # the scheduler's sequences, one a row
    cache: Any
    mask: Any
    slot_ids: Any = None  # the rows' slots on the device, made once per composition of the batch


def new_cache():
    from transformers import DynamicCache

    return DynamicCache()


def select_rows(rows: Rows, index: list[int]) -> Rows:
    """Keep the rows at ``index``, then drop leading columns none of them attends to."""
    import torch

    if index != list(range(len(rows.seqs))):
        picked = torch.tensor(index, device=rows.mask.device)
        for layer in rows.cache.layers:
            layer.keys, layer.values = layer.keys.index_select(0, picked), layer.values.index_select(0, picked)
        rows = Rows([rows.seqs[i] for i in index], rows.cache, rows.mask.index_select(0, picked))
    used = rows.mask.any(0)
    first = int(used.int().argmax()) if bool(used.any()) else 0
    if first:
        for layer in rows.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
        rows.mask = rows.mask[:, first:]
    return rows


def merge_rows(running: Rows, joining: Rows) -> Rows:
    """One batch of both: the shorter history is left-padded with masked columns."""
    import torch

    length = max(running.mask.shape[1], joining.mask.shape[1])

    def pad(tensor, dim: int):
        missing = length - tensor.shape[dim]
        if not missing:
            return tensor
        shape = list(tensor.shape)
        shape[dim] = missing
        return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

    for mine, theirs in zip(running.cache.layers, joining.cache.layers, strict=True):
        mine.keys = torch.cat([pad(mine.keys, 2), pad(theirs.keys, 2)], dim=0)
        mine.values = torch.cat([pad(mine.values, 2), pad(theirs.values, 2)], dim=0)
    mask = torch.cat([pad(running.mask, 1), pad(joining.mask, 1)], dim=0)
    return Rows(running.seqs + joining.seqs, running.cache, mask)


KV_HEADROOM = 64  # columns a layer's key/value buffers keep free: one reallocation every 64 decode steps


def grow_in_place(cache: Any) -> None:
    """Let every layer of a ``DynamicCache`` append new keys and values in place (``_GrowingLayer``)."""
    from transformers.cache_utils import DynamicLayer

    for layer in cache.layers:
        if type(layer) is DynamicLayer:
            layer.__class__ = _make_growing_layer(DynamicLayer)


_GROWING: dict[type, type] = {}


def _make_growing_layer(base: type) -> type:
    """``DynamicLayer`` whose ``update`` writes into buffers with headroom instead of concatenating.

    transformers' ``DynamicLayer`` copies the whole history of a layer on every step (``torch.cat``);
    here the keys and values are views of larger buffers and a decode step writes one column. When
    the scheduler replaces a layer's tensors (rows left or joined), the next update starts new buffers.
    """
    if base not in _GROWING:
        class GrowingLayer(base):
            def update(self, key_states, value_states, *args, **kwargs):
                if not self.is_initialized or self.keys.numel() == 0:
                    out = super().update(key_states, value_states, *args, **kwargs)
                    self._growth = None
                    return out
                keys, values = self.keys, self.values
                length, new = keys.shape[-2], key_states.shape[-2]
                growth = getattr(self, "_growth", None)
                if growth is None or growth[0] is not keys or growth[2].shape[-2] < length + new:
                    capacity = length + new + KV_HEADROOM
                    key_buffer = keys.new_empty((*keys.shape[:2], capacity, keys.shape[-1]))
                    value_buffer = values.new_empty((*values.shape[:2], capacity, values.shape[-1]))
                    key_buffer[:, :, :length] = keys
                    value_buffer[:, :, :length] = values
                else:
                    key_buffer, value_buffer = growth[2], growth[3]
                key_buffer[:, :, length:length + new] = key_states
                value_buffer[:, :, length:length + new] = value_states
                self.keys, self.values = key_buffer[:, :, :length + new], value_buffer[:, :, :length + new]
                self._growth = (self.keys, self.values, key_buffer, value_buffer)
                return self.keys, self.values

        _GROWING[base] = GrowingLayer
    return _GROWING[base]
