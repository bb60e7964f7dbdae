"""The model replica: one base model, the adapter caches, and mixed-adapter batched decoding.

Requests reach a replica through Ray Serve model multiplexing, with the user id as the
multiplexed model id: the router prefers a replica that already holds that user's adapter.
On the replica, ``@serve.batch`` gathers concurrent requests, whatever their users, into one
batch that the engine decodes in one forward pass per token, every row through its own slot.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from oppu.errors import AdapterError, AdapterNotFound, OppuError
from oppu.serving.adapters import AdapterCache, AdapterShape, LoadedAdapter
from oppu.serving.config import ServeConfig
from oppu.serving.engine import GenerationEngine, GenerationRow, LoraSlotsConfig


class RequestTooLarge(OppuError):
    """A prompt or ``max_tokens`` over the configured limit (HTTP 400)."""


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    user: str | None  # None: the base model without an adapter
    max_tokens: int


@dataclass(frozen=True)
class StreamStart:
    """First item of a stream: the request was accepted (adapter found, prompt within limits)."""

    prompt_tokens: int
    adapter_version: str | None


@dataclass(frozen=True)
class GenerateResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of sequence) or "length" (max_tokens reached)
    adapter_version: str | None


class ModelReplica:
    """Ray Serve deployment class (wrapped with ``serve.deployment`` by the app builder)."""

    def __init__(self, config: dict):
        from ray import serve

        from oppu.models import base_fingerprint
        from oppu.serving.events import events_actor
        from oppu.serving.metrics import ServingMetrics
        from oppu.store import AdapterStore

        self.config = ServeConfig(**config)
        lora = LoraSlotsConfig(self.config.gpu_slots, self.config.max_lora_rank,
                               tuple(self.config.target_modules))
        self.engine = GenerationEngine.from_pretrained(self.config.model, lora, device=self.config.device,
                                                       dtype=self.config.dtype,
                                                       compile_decode=self.config.compile_decode,
                                                       host_adapters=self.config.host_cache_adapters)
        self.fingerprint = base_fingerprint(self.config.model)
        self.metrics = ServingMetrics()
        self.adapters = AdapterCache(
            AdapterStore(self.config.store), task=self.config.task, variant=self.config.variant,
            shape=AdapterShape(self.fingerprint, self.config.max_lora_rank, tuple(self.config.target_modules)),
            capacity=self.config.host_cache_adapters, check_ttl_s=self.config.adapter_check_ttl_s,
            recorder=self.metrics, on_evict=self._release_slot, prepare=self.engine.prepare_adapter)
        # One compute thread: slot bookkeeping and decoding never run concurrently.
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="oppu-decode")
        self.events = events_actor(serve.get_replica_context().app_name)
        self._deletions_seen = 0
        self._gpu_counts_reported = {True: 0, False: 0}

        # Decorated here, not on the class, because their limits come from the config.
        @serve.multiplexed(max_num_models_per_replica=self.config.host_cache_adapters)
        async def adapter_for_routing(user: str) -> str:
            await self.adapters.get(user)
            return user

        @serve.batch(max_batch_size=self.config.max_batch_size,
                     batch_wait_timeout_s=self.config.batch_wait_timeout_s)
        async def decode_batch(rows: list[GenerationRow]) -> AsyncIterator[list]:
            async for step in self._decode(rows):
                yield step

        self._adapter_for_routing = adapter_for_routing
        self._decode_batch = decode_batch

    def _release_slot(self, adapter: LoadedAdapter) -> None:
        self._compute.submit(self.engine.slots.release, adapter)

    async def info(self) -> dict:
        return {"base_fingerprint": self.fingerprint, "task": self.config.task,
                "variant": self.config.variant, "model_id": self.config.base_model_id}

    async def stats(self) -> dict:
        slots = self.engine.slots
        return {"host_cached": self.adapters.cached_users(), "gpu_resident": slots.resident(),
                "gpu_hits": slots.stats.hits, "gpu_misses": slots.stats.misses,
                "gpu_load_seconds": slots.stats.load_seconds}

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        text, start = "", None
        async for item in self.generate_stream(request):
            if isinstance(item, GenerateResult):
                return item
            if isinstance(item, StreamStart):
                start = item
            else:
                text += item
        raise AssertionError(f"stream ended without a result (started: {start})")

    async def generate_stream(self, request: GenerateRequest) -> AsyncIterator[StreamStart | str | GenerateResult]:
        """``StreamStart``, then text deltas, then the ``GenerateResult``."""
        try:
            row = await self._prepare(request)
        except AdapterNotFound:
            self.metrics.error("adapter_not_found")
            raise
        except AdapterError:
            self.metrics.error("adapter_unusable")
            raise
        version = row.adapter.version if row.adapter else None
        yield StreamStart(prompt_tokens=len(row.prompt_ids), adapter_version=version)
        token_ids: list[int] = []
        text = ""
        async for token in self._decode_batch(row):
            if isinstance(token, Exception):
                self.metrics.error("adapter_unusable")
                raise token
            token_ids.append(token)
            # Decode the whole continuation each step: a token may complete a multi-byte character.
            full = self.engine.decode(token_ids)
            if len(full) > len(text) and full.startswith(text):
                yield full[len(text):]
                text = full
        final = self.engine.decode(token_ids)
        if final != text and final.startswith(text):
            yield final[len(text):]
        finish = "length" if len(token_ids) >= row.max_new_tokens else "stop"
        yield GenerateResult(text=final, prompt_tokens=len(row.prompt_ids), completion_tokens=len(token_ids),
                             finish_reason=finish, adapter_version=version)

    async def _prepare(self, request: GenerateRequest) -> GenerationRow:
        if request.max_tokens > self.config.max_tokens_limit:
            raise RequestTooLarge(f"max_tokens {request.max_tokens} exceeds the limit "
                                  f"{self.config.max_tokens_limit}")
        await self._apply_deletions()
        adapter: LoadedAdapter | None = None
        if request.user is not None:
            await self._adapter_for_routing(request.user)
            adapter = await self.adapters.get(request.user)
        prompt_ids = self.engine.encode(request.prompt)
        if len(prompt_ids) > self.config.max_prompt_tokens:
            raise RequestTooLarge(f"the prompt has {len(prompt_ids)} tokens; the limit is "
                                  f"{self.config.max_prompt_tokens}")
        return GenerationRow(prompt_ids=prompt_ids, adapter=adapter, max_new_tokens=request.max_tokens)

    async def _apply_deletions(self) -> None:
        seen, deleted = await self.events.deletions_since.remote(self._deletions_seen)
        for user in deleted:
            self.adapters.evict(user)
        self._deletions_seen = seen

    async def _decode(self, rows: list[GenerationRow]) -> AsyncIterator[list]:
        """Per step, per row: a token id, an Exception (that row failed), or StopIteration (done)."""
        loop = asyncio.get_running_loop()
        started, generated = time.perf_counter(), 0
        steps = self.engine.stream(rows)
        while True:
            step = await loop.run_in_executor(self._compute, next, steps, None)
            if step is None:
                break
            generated += sum(1 for token in step if isinstance(token, int))
            yield [StopIteration if token is None else token for token in step]
        self.metrics.batch(len(rows), generated, time.perf_counter() - started)
        slot_stats = self.engine.slots.stats
        for hit, total in ((True, slot_stats.hits), (False, slot_stats.misses)):
            for _ in range(total - self._gpu_counts_reported[hit]):
                self.metrics.cache_lookup("gpu", hit)
            self._gpu_counts_reported[hit] = total
        self.metrics.resident("gpu", len(self.engine.slots.resident()))
        self.metrics.resident("host", len(self.adapters.cached_users()))
