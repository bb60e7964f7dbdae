"""The running batch's KV cache: one row of static buffers per sequence, and graphed forwards.

Each sequence the scheduler runs owns a row of every layer's key and value buffers
(``[rows, kv_heads, columns, head_dim]``) and keeps its tokens in columns ``0 .. length-1`` of that
row, the column being the token's position. A newcomer's prompt is prefilled straight into its row;
a decode step writes one column per row, at that row's own length; a row that leaves is handed to
the next newcomer. No step copies the cache (the left-padded ``DynamicCache`` this replaces was
re-concatenated whenever a row joined or left), and every forward has one of a few shapes: rows
rounded up to a power of two, decode columns up to a multiple of ``column_block``, prefill chunks
padded as ``_prefill_shape`` says. On CUDA each shape is captured once as a CUDA graph and replayed,
so that a 7B step costs the GPU's time for it, not the Python and kernel launches of 32 layers
(about 100 ms a decode step eager on the GPU machine; graphed, 32 streams through the serve app got a
token every ~13 ms, ``bench/results/serve_http-short-2026-12-07.json``).

``warm_up`` (a replica calls it before serving) allocates the buffers and captures every shape up
front. Without it, buffers grow (rows and columns, by doubling) when a sequence needs more; growing
drops the captured graphs, which are captured again on first use. One extra column per row takes
the writes of rows that are not decoding (free rows, rows still being prefilled) and of a prefill's
padding.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from oppu.serving.shape_graphs import ShapeGraphs

log = logging.getLogger(__name__)

SlotsSetter = Callable[[torch.Tensor | None], None]  # sets (or clears) every LoRA layer's per-row slots


class RowKVCache:
    """Per-row KV buffers of ``model`` for up to ``max_rows`` sequences, and the forwards over them."""

    def __init__(self, model: Any, *, max_rows: int, set_slots: SlotsSetter | None = None,
                 cuda_graphs: bool | None = None, column_block: int = 128, initial_columns: int = 256,
                 max_graphs: int = 256):
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
            raise ValueError(f"{type(model).__name__} uses sliding-window attention, which the serving cache "
                             "does not implement (full-attention decoder models only)")
        parameter = next(model.parameters())
        self.model, self.device, self.dtype = model, parameter.device, parameter.dtype
        self.n_layers = config.num_hidden_layers
        self.kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.max_rows = max_rows
        self.column_block = column_block
        self.set_slots = set_slots
        self.graphs = ShapeGraphs(self._forward, max_graphs=max_graphs,
                                  enabled=self.device.type == "cuda" if cuda_graphs is None else cuda_graphs)
        # Architectures whose logits are exactly the output embedding of the decoder's last hidden states
        # (no soft-capping or scaling after it): for them the head runs on the rows' last tokens only.
        head_only = config.model_type in HEAD_ONLY_MODEL_TYPES and hasattr(model, "get_decoder")
        self._decoder = model.get_decoder() if head_only else None
        self._head = model.get_output_embeddings() if head_only else None
        # Prefill shape floors (see _prefill_shape): only where shapes are captured; on a CPU padding costs.
        self.prefill_min_tokens = 256 if self.graphs.enabled else 16
        self.prefill_min_span = 512 if self.graphs.enabled else column_block
        self.lengths: list[int] = []  # tokens in each row's cache (host truth)
        self._free: list[int] = []
        self.rows, self.columns = 0, 0
        self.max_columns: int | None = None  # set by warm_up: the longest sequence a request may make
        self.token_limit: int | None = None  # set by warm_up where memory cut the columns: a row holds no more
        self._allocate(1, max(column_block, initial_columns))
        self._view = _cache_view(self)

    # -- rows -------------------------------------------------------------------------------------

    def acquire_row(self) -> int:
        """A free row (the lowest, so decode batches stay small), growing the buffers if none is free."""
        if not self._free:
            if self.rows >= self.max_rows:
                raise RuntimeError(f"all {self.max_rows} rows are taken")
            self._allocate(min(self.max_rows, self.rows * 2), self.columns)
        row = min(self._free)
        self._free.remove(row)
        self.lengths[row] = 0
        return row

    def release_row(self, row: int) -> None:
        self.lengths[row] = 0
        self._free.append(row)

    def reserve_columns(self, columns: int) -> None:
        """Make room for ``columns`` tokens in a row (doubling the buffers' columns as needed)."""
        if self.token_limit is not None and columns > self.token_limit:
            raise RuntimeError(f"a sequence needs {columns} tokens of KV cache; rows hold {self.token_limit}")
        if columns > self.columns:
            grown = self.columns
            while grown < columns:
                grown *= 2
            if self.max_columns is not None:  # no further than the longest sequence a request may make
                grown = max(columns, min(grown, self.max_columns))
            self._allocate(self.rows, grown)

    def warm_up(self, columns: int, with_slots: bool, prefill_chunk_tokens: int | None = None,
                memory_fraction: float = 0.5, allocate: bool | None = None) -> int:
        """Allocate every row with room for ``columns`` tokens and capture every decode shape now, and
        every prefill shape of chunks of at most ``prefill_chunk_tokens`` tokens shared among the rows.

        A replica that captures on first use pays each capture (an eager forward plus the capture) in
        the middle of serving, and the buffers' growth drops the graphs to capture them again: on the
        GPU machine a short HTTP phase saw a dozen captures. On CUDA the columns are cut to what fits
        in ``memory_fraction`` of the free device memory. ``allocate`` (default: on CUDA only) allocates
        the rows and columns now; otherwise they grow as needed (on a CPU, without graphs to keep,
        growing costs little and memory is scarcer). Returns the columns allocated.
        """
        columns = _round_up(max(columns, self.column_block), self.column_block)
        self.max_columns = columns
        if not (self.device.type == "cuda" if allocate is None else allocate):
            return self.columns
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            per_column = self.max_rows * self.n_layers * 2 * self.kv_heads * self.head_dim * self.keys[0].element_size()
            fits = max(self.column_block, int(free * memory_fraction) // per_column - 1
                       ) // self.column_block * self.column_block
            if fits < columns:
                log.warning("the KV cache holds %d tokens a row, not the %d asked, in %.0f%% of the free GPU "
                            "memory; longer requests are refused", fits, columns, 100 * memory_fraction)
                columns = self.max_columns = self.token_limit = fits
        if self.max_rows > self.rows or columns > self.columns:
            self._allocate(self.max_rows, max(columns, self.columns))
        if not self.graphs.enabled:
            return self.columns
        shapes = self._decode_shapes(with_slots)
        if prefill_chunk_tokens:
            shapes += self._prefill_shapes(prefill_chunk_tokens, with_slots)
        if len(shapes) > self.graphs.max_graphs:
            log.warning("warm-up: %d shapes but room for %d graphs; the rest are captured on first use",
                        len(shapes), self.graphs.max_graphs)
        for done, shape in enumerate(shapes[:self.graphs.max_graphs]):
            low = _low_memory(self.device)
            if low is not None:
                # Seen on an H100 with a 7B model (2026-12-07): warm-up captures ran the device out of
                # memory, and then the eager forward of the same shape failed too, killing the replica.
                log.warning("warm-up stops capturing after %d of %d shapes: %s; the rest are captured on "
                            "first use", done, len(shapes), low)
                break
            self._idle_inputs(shape)
            self.graphs.run(shape)
            if not self.graphs.enabled:  # a capture failed: eager from now on, nothing more to capture
                break
        if self.device.type == "cuda":
            log.info("warm-up: %d rows x %d columns of KV cache, %d graphs captured; %.1f GiB allocated, "
                     "%.1f GiB free", self.rows, self.columns, len(self.graphs),
                     torch.cuda.memory_allocated(self.device) / 2**30,
                     torch.cuda.mem_get_info(self.device)[0] / 2**30)
        return self.columns

    def _decode_shapes(self, with_slots: bool) -> list[tuple]:
        batches = sorted({min(1 << k, self.rows) for k in range(self.rows.bit_length() + 1)})  # as decode() rounds
        return [("decode", batch, 1, span, with_slots)
                for batch in batches for span in range(self.column_block, self.columns + 1, self.column_block)]

    def _prefill_shapes(self, chunk_tokens: int, with_slots: bool) -> list[tuple]:
        """Every shape ``prefill`` can take when ``chunk_tokens`` are shared among the rows prefilled."""
        shapes = set()
        for n_rows in range(1, self.rows + 1):
            share = max(1, chunk_tokens // n_rows)  # the scheduler's share: a row's chunk is at most this
            longest = 1
            while True:
                for needed in _powers_of_two_up_to(self.columns):
                    if needed < min(longest, share):  # a row's columns hold at least its chunk
                        continue
                    n, width, span = self._prefill_shape(n_rows, min(longest, share), needed)
                    shapes.add(("prefill", n, width, span, with_slots))
                if longest >= share:
                    break
                longest = min(share, longest * 2)
        return sorted(shapes, key=lambda shape: (shape[1] * shape[2], shape[3], shape[1]))

    def _idle_inputs(self, shape: tuple) -> None:
        """Inputs under which ``shape``'s forward writes only the spare column: for capturing at warm-up."""
        kind, batch, width, _, _ = shape
        if kind == "decode":
            self._step_inputs[:batch].copy_(torch.tensor([[0, 0, self.columns, -1]], device=self.device)
                                            .expand(batch, 4))
            return
        tokens, per_row, _ = self._prefill_buffers(batch, width)
        tokens.copy_(torch.tensor([0, self.columns, self.columns, 0], device=self.device).expand(batch, width, 4))
        per_row.copy_(torch.tensor([0, -1, 0], device=self.device).expand(batch, 3))
        per_row[:, 0] = torch.arange(batch, device=self.device)

    # -- forwards ---------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, rows: Sequence[int], chunks: Sequence[Sequence[int]], slot_ids: Sequence[int] | None,
                pad_id: int) -> torch.Tensor:
        """Append each row's ``chunks[i]`` (prompt tokens) to its cache; the logits after each chunk's last token.

        The chunk is padded to a power of two rows and tokens (at least 16), so that on CUDA a few
        captured shapes serve every prefill; padding rows and tokens write only the spare column.
        """
        n_real = len(rows)
        starts = [self.lengths[row] for row in rows]
        needed = max(start + len(chunk) for start, chunk in zip(starts, chunks, strict=True))
        n, width, span = self._prefill_shape(n_real, max(len(chunk) for chunk in chunks), needed)
        self.reserve_columns(span)
        tokens = torch.zeros((n, width, 4), dtype=torch.long)  # id, column, last column attended, position
        tokens[..., 0] = pad_id
        tokens[..., 1] = self.columns  # padding writes the spare column ...
        per_row = torch.zeros((n, 3), dtype=torch.long)  # row, slot, index of the chunk's last token
        per_row[:, 1] = -1
        for i, (row, start, chunk) in enumerate(zip(rows, starts, chunks, strict=True)):
            k = len(chunk)
            tokens[i, :k, 0] = torch.tensor(list(chunk), dtype=torch.long)
            tokens[i, :k, 1] = torch.arange(start, start + k)
            tokens[i, :, 2] = torch.arange(start, start + width).clamp(max=start + k - 1)  # ... and reads the row
            tokens[i, :, 3] = torch.arange(start, start + width)
            per_row[i] = torch.tensor([row, slot_ids[i] if slot_ids is not None else -1, k - 1])
        buffers = self._prefill_buffers(n, width)
        buffers[0].copy_(tokens, non_blocking=True)
        buffers[1].copy_(per_row, non_blocking=True)
        self.graphs.run(("prefill", n, width, span, slot_ids is not None))
        for row, start, chunk in zip(rows, starts, chunks, strict=True):
            self.lengths[row] = start + len(chunk)
        return buffers[2][:n_real].clone()

    @torch.no_grad()
    def decode(self, rows: Sequence[int], tokens: Sequence[int], slot_ids: Sequence[int] | None,
               carried: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Feed ``tokens[i]`` to row ``rows[i]``; the next-token logits of each (``[len(rows), vocab]``).

        ``carried`` = (rows, token ids), both on the device: those rows' tokens come from there instead
        (a token chosen on the device by the previous step and not yet read back to the host).
        """
        span = _round_up(max(self.lengths[row] for row in rows) + 1, self.column_block)
        self.reserve_columns(span)
        batch = min(1 << max(rows).bit_length(), self.rows)  # rows 0..batch-1 run; the others among them idle
        # token, position, column written, LoRA slot; idle rows write the spare column and attend to
        # every (finite) column. Built as one list: per-element tensor writes cost more than the step.
        step = [[0, 0, self.columns, -1] for _ in range(batch)]
        for i, row in enumerate(rows):
            step[row] = [tokens[i], self.lengths[row], self.lengths[row], slot_ids[i] if slot_ids is not None else -1]
        self._step_inputs[:batch].copy_(torch.tensor(step, dtype=torch.long), non_blocking=True)
        if carried is not None:
            self._step_inputs[carried[0], 0] = carried[1]
        self.graphs.run(("decode", batch, 1, span, slot_ids is not None))
        for row in rows:
            self.lengths[row] += 1
        return self._logits[torch.tensor(list(rows), device=self.device)]

    # -- internals --------------------------------------------------------------------------------

    @torch.no_grad()  # warm-up runs it outside prefill/decode: a graph kept by an output buffer kept every activation
    def _forward(self, shape: tuple) -> None:
        kind, batch, width, span, with_slots = shape
        if kind == "decode":
            inputs = self._step_inputs[:batch]
            ids, positions, cols, slots = inputs[:, 0:1], inputs[:, 1:2], inputs[:, 2], inputs[:, 3]
            mask = (self._column_index[:span][None, :] <= cols[:, None])[:, None, None, :]
            self._view.target = ("decode", batch, cols, span)
        else:
            tokens, per_row, _ = self._prefill_buffers(batch, width)
            ids, cols, reach, positions = tokens[..., 0], tokens[..., 1], tokens[..., 2], tokens[..., 3]
            slots = per_row[:, 1]
            mask = (self._column_index[:span][None, None, :] <= reach[:, :, None])[:, None]
            self._view.target = ("prefill", per_row[:, 0], cols, span)
        self._set_slots(slots if with_slots else None)
        try:
            if self._head is None:  # a model whose logits are more than the head of its last hidden states
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                    past_key_values=self._view, use_cache=True).logits
                last = logits[:, -1] if kind == "decode" else logits[self._row_index[:batch], per_row[:, 2]]
            else:  # the head only over each row's last token, not the whole padded chunk's
                hidden = self._decoder(input_ids=ids, attention_mask=mask, position_ids=positions,
                                       past_key_values=self._view, use_cache=True).last_hidden_state
                hidden = hidden[:, -1] if kind == "decode" else hidden[self._row_index[:batch], per_row[:, 2]]
                last = self._head(hidden)
        finally:
            self._set_slots(None)
            self._view.target = None
        if kind == "decode":
            self._logits[:batch].copy_(last)
        else:
            self._prefill_buffers(batch, width)[2].copy_(last)

    def _prefill_shape(self, n_rows: int, longest_chunk: int, needed_columns: int) -> tuple[int, int, int]:
        """The bucketed (rows, tokens a row, columns read) of a prefill: few shapes, so few graphs.

        Rows and tokens are powers of two. With CUDA graphs a pass has at least ``prefill_min_tokens``
        tokens in all (on a GPU a pass over fewer costs about as much: it is bound by reading the
        weights, so padding up to it is free and saves shapes) and reads at least ``prefill_min_span``
        columns (attention over a few more columns costs little beside the weights). Columns read
        are a power of two, or all the buffers have.
        """
        n = min(1 << (n_rows - 1).bit_length(), self.rows)
        width = max(16, 1 << (longest_chunk - 1).bit_length(), self.prefill_min_tokens // n)
        span = max(self.column_block, self.prefill_min_span, 1 << (needed_columns - 1).bit_length())
        if span > self.columns >= needed_columns:  # never grow the buffers only to round a span up
            span = self.columns
        return n, width, span

    def _prefill_buffers(self, rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The device inputs (tokens, per-row values) and output logits of a ``rows`` x ``width`` prefill."""
        key = (rows, width)
        if key not in self._prefill_io:
            self._prefill_io[key] = (torch.zeros((rows, width, 4), dtype=torch.long, device=self.device),
                                     torch.zeros((rows, 3), dtype=torch.long, device=self.device),
                                     torch.zeros((rows, self._logits.shape[1]), dtype=self.dtype, device=self.device))
        return self._prefill_io[key]

    def _set_slots(self, slot_ids: torch.Tensor | None) -> None:
        if self.set_slots is not None:
            self.set_slots(slot_ids)

    def _allocate(self, rows: int, columns: int) -> None:
        """(Re)allocate every buffer for ``rows`` x ``columns`` (+1 spare column), keeping what is cached."""
        shape = (rows, self.kv_heads, columns + 1, self.head_dim)
        keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        if self.rows:
            old_rows, old_columns = self.rows, self.columns
            for new, old in zip(keys + values, self.keys + self.values, strict=True):
                new[:old_rows, :, :old_columns] = old[:, :, :old_columns]
            log.info("serving KV cache grown to %d rows x %d columns", rows, columns)
        self._free.extend(range(self.rows, rows))
        self.lengths.extend([0] * (rows - self.rows))
        self.keys, self.values, self.rows, self.columns = keys, values, rows, columns
        self.graphs.clear()  # they read the old buffers
        self._row_index = torch.arange(rows, device=self.device)
        self._column_index = torch.arange(columns + 1, device=self.device)
        self._step_inputs = torch.zeros((rows, 4), dtype=torch.long, device=self.device)
        self._prefill_io: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        vocab = self.model.get_output_embeddings().weight.shape[0]
        self._logits = torch.zeros((rows, vocab), dtype=self.dtype, device=self.device)


HEAD_ONLY_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3"})


WARM_UP_MEMORY_RESERVE = 0.1  # of the device's memory, left free by warm-up captures


def _low_memory(device: torch.device, reserve: float = WARM_UP_MEMORY_RESERVE) -> str | None:
    """Why ``device`` has too little free memory for another warm-up capture (None: it has enough)."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    if free >= reserve * total:
        return None
    return (f"{free / 2**30:.1f} GiB of {total / 2**30:.1f} GiB free, below the {100 * reserve:.0f}% kept for "
            f"serving ({torch.cuda.memory_allocated(device) / 2**30:.1f} GiB allocated)")


def _powers_of_two_up_to(limit: int) -> list[int]:
    """1, 2, 4, ... and ``limit`` itself."""
    values = [1 << k for k in range(limit.bit_length()) if 1 << k < limit]
    return [*values, limit]


def _round_up(value: int, block: int) -> int:
    return -(-value // block) * block


def _cache_view(owner: RowKVCache):
    """A transformers ``DynamicCache`` whose layers read and write ``owner``'s buffers.

    Its layers are ``DynamicLayer`` objects with ``update`` replaced (the way the library's own cache
    classes specialise a layer), which keeps to the interface every transformers 5 release calls.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class RowLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            keys, values = owner.keys[self.layer_idx], owner.values[self.layer_idx]
            kind, index, cols, span = owner._view.target
            if kind == "decode":  # one token a row, rows 0..index-1, each at its own column
                rows = owner._row_index[:index]
                keys[rows, :, cols] = key_states[:, :, 0]
                values[rows, :, cols] = value_states[:, :, 0]
                return keys[:index, :, :span], values[:index, :, :span]
            rows = index[:, None]  # prefill: the rows in ``index``, a chunk of tokens each
            keys[rows, :, cols] = key_states.transpose(1, 2)
            values[rows, :, cols] = value_states.transpose(1, 2)
            return keys[index, :, :span], values[index, :, :span]

        def get_seq_length(self) -> int:
            target = owner._view.target
            return target[3] if target is not None else 0

        def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:  # unused: the masks come 4-D
            return self.get_seq_length(), 0

    cache = DynamicCache()
    layers = []
    for index in range(owner.n_layers):
        layer = DynamicLayer()
        layer.__class__ = RowLayer
        layer.layer_idx = index
        layer.is_initialized = True
        layer.keys = layer.values = None
        layers.append(layer)
    cache.layers = layers
    cache.target = None
    return cache
