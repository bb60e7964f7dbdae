"""Greedy decoding of many users' requests in one batch, each row through its own LoRA slot.

The base model is loaded once and gets ``n_slots`` LoRA slots (``oppu.models.multi_lora``);
``AdapterSlots`` keeps the most recently used adapters resident in them, so a batch mixing
users costs one forward pass per token over the shared base plus one small batched matrix
product per adapted layer. Rows are left-padded and given their own position ids, so a row's
tokens equal what the user's PEFT model alone would produce.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from oppu.serving.adapter_slots import AdapterSlots
from oppu.serving.adapters import LoadedAdapter


@dataclass(frozen=True)
class LoraSlotsConfig:
    """Shape of the multi-LoRA slots injected into the base model."""

    n_slots: int
    max_rank: int
    target_modules: tuple[str, ...]


@dataclass
class GenerationRow:
    """One request as the engine sees it: token ids, its adapter (None: the base) and a budget."""

    prompt_ids: list[int]
    adapter: LoadedAdapter | None
    max_new_tokens: int


class GenerationEngine:
    """A frozen base model with LoRA slots, decoding batches of rows greedily."""

    def __init__(self, model: Any, tokenizer: Any, lora: LoraSlotsConfig | None, *, static_cache: bool = False,
                 cuda_graphs: bool = False, compile_step: bool = False, max_static_decoders: int = 4,
                 cache_block: int = 32, host_adapters: int = 0, compile_lora: bool = False):
        import torch

        self.model = model.eval()
        self.static_cache = static_cache or cuda_graphs or compile_step
        self.cuda_graphs = cuda_graphs
        self.compile_step = compile_step
        self.max_static_decoders = max_static_decoders
        self.cache_block = cache_block
        self._decoders: OrderedDict[tuple[int, int], StaticDecoder] = OrderedDict()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.slots: AdapterSlots | None = None
        if lora is not None:
            from oppu.models import multi_lora

            # Each slot's scaling comes from its adapter's own config when it is loaded.
            from oppu.serving.lora import use_serving_layers

            multi_lora.inject_multi_lora(model, list(lora.target_modules), n_slots=lora.n_slots,
                                         rank=lora.max_rank, alpha=lora.max_rank)
            use_serving_layers(model, compile_one_token=compile_lora)  # the fused one-token decode path; eval mode
            self.slots = AdapterSlots(model, lora.n_slots, host_adapters)
        model.requires_grad_(False)  # serving never trains: no forward records autograd, slots included
        self._torch = torch

    @classmethod
    def from_pretrained(cls, model_uri: str, lora: LoraSlotsConfig | None, *, device: str = "auto",
                        dtype: str = "auto", compile_decode: bool = False,
                        host_adapters: int = 0, compile_lora: bool = False) -> GenerationEngine:
        import torch

        from oppu.models import load_model

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        model, tokenizer = load_model(model_uri, device=device, dtype=getattr(torch, dtype))
        on_cuda = compile_decode and device.startswith("cuda")
        return cls(model, tokenizer, lora, static_cache=on_cuda, cuda_graphs=on_cuda, compile_step=on_cuda,
                   host_adapters=host_adapters, compile_lora=compile_lora)

    def prepare_adapter(self, adapter: LoadedAdapter) -> None:
        """``AdapterCache``'s ``prepare`` hook: pack a new host-cached adapter for the GPU slots."""
        if self.slots is not None:
            self.slots.prepare(adapter)

    def encode(self, prompt: str, prompt_format: str = "plain") -> list[int]:
        """The prompt's ids exactly as training and offline evaluation encode them (BOS + text, or
        the chat template's user turn around it; ``oppu.models.prompting``)."""
        from oppu.models.samples import encode_prompt

        return encode_prompt(self.tokenizer, prompt, prompt_format=prompt_format)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def stream(self, rows: Sequence[GenerationRow]) -> Iterator[list[int | None | Exception]]:
        """Decode all rows together; per step, each row's new token id (None once it finished).

        A row finishes at an end-of-sequence token (not reported) or after ``max_new_tokens``.
        A row whose adapter does not fit gets its exception in the first step, then None.
        """
        assigned = self.slots.assign([row.adapter for row in rows]) if self.slots else [-1] * len(rows)
        failed = [isinstance(slot, Exception) for slot in assigned]
        if any(failed):
            yield [slot if isinstance(slot, Exception) else None for slot in assigned]
            rows = [row for row, bad in zip(rows, failed, strict=True) if not bad]
            assigned = [slot for slot in assigned if not isinstance(slot, Exception)]
            if not rows:
                return
            for step in self.stream_slots(rows, assigned):
                it = iter(step)
                yield [None if bad else next(it) for bad in failed]
            return
        yield from self.stream_slots(rows, assigned)

    def stream_slots(self, rows: Sequence[GenerationRow], slot_ids: list[int]) -> Iterator[list[int | None]]:
        """``stream`` for rows whose adapters already sit in ``slot_ids``."""
        if self.static_cache:
            yield from self._stream_static(rows, slot_ids)
            return
        torch = self._torch
        width = max(len(row.prompt_ids) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row.prompt_ids):] = torch.tensor(row.prompt_ids)
            attention_mask[i, width - len(row.prompt_ids):] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        eos = torch.tensor(self.eos_ids, device=self.device)
        budget = torch.tensor([row.max_new_tokens for row in rows], device=self.device)
        finished = torch.zeros(len(rows), dtype=torch.bool, device=self.device)
        past = None
        for step in range(max(row.max_new_tokens for row in rows)):
            # Grad mode and the rows' slots are set per forward, never held across a yield: the
            # caller may run each step on another thread, and between steps the model is idle.
            with torch.no_grad(), self._adapters(slot_ids):
                out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            next_ids = out.logits[:, -1, :].argmax(dim=-1)
            emitted = (~finished & ~torch.isin(next_ids, eos)).tolist()
            tokens = next_ids.tolist()
            yield [tokens[i] if emitted[i] else None for i in range(len(rows))]
            finished |= torch.isin(next_ids, eos) | (budget <= step + 1)
            if bool(finished.all()):
                return
            input_ids = next_ids[:, None]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(rows), 1))], 1)
            position_ids = position_ids[:, -1:] + 1

    def _stream_static(self, rows: Sequence[GenerationRow], slot_ids: list[int]) -> Iterator[list[int | None]]:
        """The same decoding over a static KV cache (and a CUDA graph per decode step on CUDA).

        The batch is padded to a power of two and the cache length to a multiple of ``cache_block``
        (32: a decode step reads the whole static cache, so coarser buckets cost attention reads), so a few
        (batch, length) shapes, each captured once, serve every request.
        """
        torch = self._torch
        n_rows = len(rows)
        batch = 1 << (n_rows - 1).bit_length()
        width = max(len(row.prompt_ids) for row in rows)
        max_new = max(row.max_new_tokens for row in rows)
        cache_len = -(-(width + max_new - 1) // self.cache_block) * self.cache_block  # the last token is not fed
        decoder = self._decoder(batch, cache_len)
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        keep = torch.zeros((batch, width), dtype=torch.bool)
        keep[n_rows:] = True  # filler rows attend to their padding: no empty softmax
        for i, row in enumerate(rows):
            input_ids[i, width - len(row.prompt_ids):] = torch.tensor(row.prompt_ids)
            keep[i, width - len(row.prompt_ids):] = True
        next_ids = decoder.prefill(input_ids.to(self.device), keep.to(self.device),
                                   list(slot_ids) + [-1] * (batch - n_rows))
        # The device runs one step ahead of the host: step n+1 is queued before step n's tokens
        # are read back (one small copy per step), so the GPU never waits for the Python below.
        # A batch that ends at an end-of-sequence token has computed one step for nothing.
        eos = set(self.eos_ids)
        finished = [False] * n_rows
        decoder.read_back(next_ids)
        for step in range(max_new):
            upcoming = decoder.decode(next_ids) if step + 1 < max_new else None
            tokens = decoder.tokens()[:n_rows]
            out: list[int | None] = []
            for i, token in enumerate(tokens):
                done_before = finished[i]
                finished[i] = done_before or token in eos or rows[i].max_new_tokens <= step + 1
                out.append(None if done_before or token in eos else token)
            yield out
            if all(finished):
                return
            next_ids = upcoming
            decoder.read_back(next_ids)

    def _decoder(self, batch: int, cache_len: int) -> StaticDecoder:
        key = (batch, cache_len)
        if key in self._decoders:
            self._decoders.move_to_end(key)
            return self._decoders[key]
        while len(self._decoders) >= self.max_static_decoders:
            self._decoders.popitem(last=False)
        decoder = StaticDecoder(self.model, batch, cache_len, with_slots=self.slots is not None,
                                cuda_graph=self.cuda_graphs, compile_step=self.compile_step)
        self._decoders[key] = decoder
        return decoder

    def generate(self, rows: Sequence[GenerationRow]) -> list[list[int]]:
        """Every row's generated token ids (without the end-of-sequence token)."""
        outputs: list[list[int]] = [[] for _ in rows]
        for step in self.stream(rows):
            for i, token in enumerate(step):
                if isinstance(token, Exception):
                    raise token
                if token is not None:
                    outputs[i].append(token)
        return outputs

    def _adapters(self, slot_ids: list[int]):
        import contextlib

        if self.slots is None:
            return contextlib.nullcontext()
        from oppu.models import multi_lora

        return multi_lora.model_adapters(self.model, self._torch.tensor(slot_ids, device=self.device))


class StaticDecoder:
    """A static KV cache for ``batch`` rows of up to ``cache_len`` tokens, and on CUDA a graph of
    one decode step over it, replayed with no Python or kernel-launch overhead per layer.

    Inputs live in fixed buffers the graph reads (token, position, attention mask as a 4-D
    boolean ``[batch, 1, 1, cache_len]``, adapter slot per row); the cache advances itself.
    """

    def __init__(self, model: Any, batch: int, cache_len: int, *, with_slots: bool, cuda_graph: bool,
                 compile_step: bool = False):
        import torch
        from transformers import StaticCache

        # torch.compile fuses each layer's small element-wise kernels (norms, rotary, the LoRA
        # gather and scaling), which dominate a decode step once launches are graphed away.
        self._step_fn = torch.compile(self._step, dynamic=False) if compile_step else self._step

        self.model, self.batch, self.cache_len = model, batch, cache_len
        self.with_slots, self.use_cuda_graph = with_slots, cuda_graph
        device = next(model.parameters()).device
        self.cache = StaticCache(config=model.config, max_cache_len=cache_len)
        self.input_ids = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.position_ids = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.mask = torch.zeros((batch, 1, 1, cache_len), dtype=torch.bool, device=device)
        self.slot_ids = torch.full((batch,), -1, dtype=torch.long, device=device)
        self.length = 0
        self.graph = None
        self.graph_next_ids = None
        self._torch = torch
        # Where each step's tokens land on the host: pinned, copied without blocking, then waited for.
        on_cuda = device.type == "cuda"
        self._host_ids = torch.zeros(batch, dtype=torch.long, pin_memory=on_cuda)
        self._copied = torch.cuda.Event() if on_cuda else None

    def prefill(self, input_ids, keep, slot_ids: list[int]):
        """Run the prompts (``keep`` marks real tokens) into a fresh cache; the first next tokens."""
        torch = self._torch
        if self.cache.is_initialized:
            self.cache.reset()
        width = input_ids.shape[1]
        self.slot_ids.copy_(torch.tensor(slot_ids, dtype=torch.long))
        self.mask.zero_()
        self.mask[:, 0, 0, :width] = keep
        causal = torch.ones((width, self.cache_len), dtype=torch.bool, device=keep.device).tril()
        positions = (keep.long().cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad(), self._adapters():
            logits = self.model(input_ids=input_ids, attention_mask=causal[None, None] & self.mask,
                                position_ids=positions, past_key_values=self.cache, use_cache=True,
                                logits_to_keep=1).logits
        self.position_ids.copy_(positions[:, -1:])
        self.length = width
        return logits[:, -1].argmax(-1)

    def read_back(self, token_ids) -> None:
        """Start copying ``token_ids`` to the host; :meth:`tokens` waits for that copy alone."""
        self._host_ids.copy_(token_ids, non_blocking=self._copied is not None)
        if self._copied is not None:
            self._copied.record()

    def tokens(self) -> list[int]:
        """The ids of the last :meth:`read_back` (work queued after it keeps running)."""
        if self._copied is not None:
            self._copied.synchronize()
        return self._host_ids.tolist()

    def decode(self, token_ids):
        """Feed one token per row; the next token per row (queued on the device, not waited for)."""
        self.input_ids.copy_(token_ids[:, None])
        self.position_ids.add_(1)
        self.mask[:, 0, 0, self.length] = True
        self.length += 1
        if not self.use_cuda_graph:
            with self._torch.no_grad(), self._adapters():
                return self._step_fn()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.graph_next_ids.clone()

    def _step(self):
        logits = self.model(input_ids=self.input_ids, attention_mask=self.mask, position_ids=self.position_ids,
                            past_key_values=self.cache, use_cache=True).logits
        return logits[:, -1].argmax(-1)

    def _capture(self) -> None:
        torch = self._torch
        # Warm-up runs execute (capture only records), so they must not advance the cache.
        saved = [layer.cumulative_length.clone() for layer in self.cache.layers]
        with torch.no_grad(), self._adapters():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._step_fn()
                    for layer, length in zip(self.cache.layers, saved, strict=True):
                        layer.cumulative_length.copy_(length)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.graph_next_ids = self._step_fn()

    def _adapters(self):
        import contextlib

        if not self.with_slots:
            return contextlib.nullcontext()
        from oppu.models import multi_lora

        return multi_lora.model_adapters(self.model, self.slot_ids)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Stop ids as offline decoding uses them: the tokenizer's EOS and the model's configured ones."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    configured = configured if isinstance(configured, list | tuple) else [configured]
    return sorted({int(i) for i in [tokenizer.eos_token_id, *configured] if i is not None})
