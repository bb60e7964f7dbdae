"""The model replica: one base model, the adapter caches, and continuous mixed-adapter batching.

Requests reach a replica through Ray Serve model multiplexing, with an opaque routing key
derived from the user id as the multiplexed model id (``oppu.serving.privacy``: Serve exports
multiplexed ids as metric labels): the router prefers a replica that already holds the adapters of
that key's users. A request the replica refuses (no adapter, a prompt too long, a full queue)
comes back as a ``Refused`` value, not an exception: Ray Serve logs every exception a replica
raises at ERROR with its message, and those messages name the user.
On the replica, a ``ContinuousBatcher`` thread owns the model: each request's sequences (``n``
of them) join the running decode batch at the next step boundary, whatever their users, and
leave it when they finish; each row samples with its own options. Prompts are tokenized on a
worker thread, never on the replica's event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from oppu import logs
from oppu.errors import AdapterError, AdapterNotFound, OppuError
from oppu.serving.adapters import AdapterCache, AdapterShape, LoadedAdapter
from oppu.serving.config import ServeConfig
from oppu.serving.engine import GenerationEngine, LoraSlotsConfig
from oppu.serving.event_buffer import EventBuffer
from oppu.serving.openai_api import TokenInfo
from oppu.serving.privacy import routing_key, user_ref
from oppu.serving.sampling import SamplingParams
from oppu.serving.scheduler import ContinuousBatcher
from oppu.serving.sequences import (
    ErrorEvent,
    FinishEvent,
    QueueFull,
    RequestTimeout,
    SequenceRequest,
    SequenceTooLong,
    TokenEvent,
)
from oppu.serving.textstream import ChoiceText

log = logging.getLogger(__name__)

__all__ = ["ChoiceEnd", "ChoiceResult", "Delta", "GenerateRequest", "GenerateResult", "ModelReplica", "QueueFull",
           "Refused", "RequestTimeout", "RequestTooLarge", "StreamStart"]


class RequestTooLarge(OppuError):
    """A prompt or ``max_tokens`` over the configured limit (HTTP 400); ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    user: str | None  # None: the base model without an adapter
    max_tokens: int
    params: SamplingParams = SamplingParams(temperature=0.0)
    n: int = 1
    stop: tuple[str, ...] = ()
    templated: bool = False  # rendered by a chat template: its special tokens are in the text, no BOS added
    as_trained: bool = False  # a task prompt (/v1/predict): rendered in the prompt format of the user's
    # adapter's training (its manifest), or the app's for the base model
    prompt_field: str = "prompt"  # the body field a too-long prompt is blamed on
    received_s: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Refused:
    """The replica's answer to a request it will not (or can no longer) serve; the ingress raises
    ``error`` and answers with its status. Returned rather than raised: see the module docstring."""

    error: OppuError


@dataclass(frozen=True)
class StreamStart:
    """First item of a stream: the request was accepted (adapter found, prompt within limits)."""

    prompt_tokens: int
    adapter_version: str | None


@dataclass(frozen=True)
class Delta:
    """New text of choice ``index`` (and the logprobs of the tokens it completes)."""

    index: int
    text: str
    logprobs: tuple[TokenInfo, ...] = ()


@dataclass(frozen=True)
class ChoiceEnd:
    index: int
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length" (max_tokens reached)


@dataclass(frozen=True)
class ChoiceResult:
    index: int
    text: str
    finish_reason: str
    completion_tokens: int
    logprobs: tuple[TokenInfo, ...] | None


@dataclass(frozen=True)
class GenerateResult:
    choices: tuple[ChoiceResult, ...]
    prompt_tokens: int
    adapter_version: str | None
    base_fingerprint: str = ""  # the base that answered (its adapters are keyed by it)

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def finish_reason(self) -> str:
        return self.choices[0].finish_reason

    @property
    def completion_tokens(self) -> int:
        return sum(choice.completion_tokens for choice in self.choices)


class ModelReplica:
    """Ray Serve deployment class (wrapped with ``serve.deployment`` by the app builder)."""

    def __init__(self, config: dict):
        from ray import serve

        from oppu.models import base_fingerprint
        from oppu.models.prompting import resolve_prompt_format
        from oppu.serving.events import DeletionEvents
        from oppu.serving.metrics import ServingMetrics
        from oppu.store import AdapterStore

        self.config = ServeConfig(**config)
        logs.follow_serve_logging(self.config.log_level)
        sys.setswitchinterval(self.config.gil_switch_interval_ms / 1000)  # this process is the replica's alone
        lora = LoraSlotsConfig(self.config.gpu_slots, self.config.max_lora_rank,
                               tuple(self.config.target_modules))
        self.engine = GenerationEngine.from_pretrained(self.config.model, lora, device=self.config.device,
                                                       dtype=self.config.dtype,
                                                       host_adapters=self.config.host_cache_adapters,
                                                       compile_lora=self.config.compile_lora_decode)
        self.fingerprint = base_fingerprint(self.config.model)
        self.prompt_format = resolve_prompt_format(self.config.prompt_format, self.engine.tokenizer)
        self.metrics = ServingMetrics()
        self.host_lookups = _CountingRecorder(self.metrics)
        self.batcher = ContinuousBatcher(self.engine, max_batch_size=self.config.max_batch_size,
                                         max_waiting=self.config.max_queued_requests,
                                         prefill_chunk_tokens=self.config.prefill_chunk_tokens,
                                         cuda_graphs=None if self.config.cuda_graphs else False)
        self.adapters = AdapterCache(
            AdapterStore(self.config.store), task=self.config.task, variant=self.config.variant,
            shape=AdapterShape(self.fingerprint, self.config.max_lora_rank, tuple(self.config.target_modules)),
            capacity=self.config.host_cache_adapters, check_ttl_s=self.config.adapter_check_ttl_s,
            recorder=self.host_lookups, on_evict=self.batcher.release_adapter, prepare=self.engine.prepare_adapter)
        self._tokenize = ThreadPoolExecutor(max_workers=1, thread_name_prefix="oppu-tokenize")
        self.events = DeletionEvents(serve.get_replica_context().app_name)
        self._gpu_counts_reported = {True: 0, False: 0}
        self._rate_mark = (time.monotonic(), 0)  # (when, tokens generated by then) for oppu_serve_tokens_per_s
        # The longest sequence a request may make: rows never grow while serving, and on CUDA every
        # decode and prefill shape is captured before the first request.
        self.batcher.warm_up(self.config.max_prompt_tokens + self.config.max_tokens_limit)
        log.info("scheduler warmed up in %.1f s: %d rows x %d columns, %d CUDA graphs captured%s",
                 self.batcher.stats.warm_up_s, self.batcher.cache.rows, self.batcher.cache.columns,
                 self.batcher.cache.graphs.captures,
                 f" (capture failed: {self.batcher.cache.graphs.error})" if self.batcher.cache.graphs.error else "")
        self.batcher.start()

        # Decorated here, not on the class, because its capacity comes from the config. It loads
        # nothing: it registers the routing key with Serve (the adapter is fetched per user in
        # _prepare), and every key fits, so Serve never unregisters one a replica still serves.
        @serve.multiplexed(max_num_models_per_replica=self.config.routing_buckets)
        async def adapter_for_routing(key: str) -> str:
            return key

        self._adapter_for_routing = adapter_for_routing
        log.info("model replica ready: %s (base %s, %s, %s), %d adapter slots, batches of %d",
                 self.config.model, self.fingerprint, self.engine.device, self.prompt_format,
                 self.config.gpu_slots, self.config.max_batch_size)

    async def info(self) -> dict:
        return {"base_fingerprint": self.fingerprint, "task": self.config.task,
                "variant": self.config.variant, "model_id": self.config.base_model_id}

    def check_health(self) -> None:
        """Ray Serve's periodic check: a replica whose scheduler thread died is restarted."""
        if not self.batcher.alive():
            raise RuntimeError("the continuous batcher's thread is not running")

    async def ready(self) -> bool:
        """The model is loaded (the constructor did it) and the scheduler thread is alive."""
        return self.batcher.alive()

    async def stats(self) -> dict:
        slots = self.engine.slots
        scheduler = self.batcher.stats
        return {"host_cached": self.adapters.cached_users(), "gpu_resident": slots.resident(),
                "gpu_hits": slots.stats.hits, "gpu_misses": slots.stats.misses,
                "gpu_load_seconds": slots.stats.load_seconds, "host_hits": self.host_lookups.hits,
                "host_misses": self.host_lookups.misses, "decode_steps": scheduler.steps,
                "prefill_chunks": scheduler.prefill_chunks, "joined_running_batch": scheduler.joined_running_batch,
                "max_running": scheduler.max_running, "waiting": self.batcher.waiting(),
                "graph_captures": self.batcher.cache.graphs.captures, "cuda_graphs": self.batcher.cache.graphs.enabled,
                "graph_capture_error": self.batcher.cache.graphs.error,
                "kv_rows": self.batcher.cache.rows, "kv_columns": self.batcher.cache.columns,
                "warm_up_s": scheduler.warm_up_s, "prefill_s": scheduler.prefill_s, "decode_s": scheduler.decode_s}

    async def generate(self, request: GenerateRequest) -> GenerateResult | Refused:
        stream = self.generate_stream(request)
        try:
            async for item in stream:
                if isinstance(item, GenerateResult | Refused):
                    return item
        finally:  # a Refused mid-stream: the stream's own cleanup frees the rows still decoding
            await stream.aclose()
        raise AssertionError("stream ended without a result")

    async def generate_stream(self, request: GenerateRequest
                              ) -> AsyncIterator[StreamStart | Delta | ChoiceEnd | GenerateResult | Refused]:
        """``StreamStart``, then ``Delta``s and one ``ChoiceEnd`` per choice, then the ``GenerateResult``;
        or a ``Refused`` (first, or in place of the rest), and nothing after it."""
        try:
            prompt_ids, adapter = await self._prepare(request)
        except AdapterNotFound as exc:
            self.metrics.error("adapter_not_found")
            yield self._refuse(request, exc)
            return
        except AdapterError as exc:
            self.metrics.error("adapter_unusable")
            yield self._refuse(request, exc)
            return
        except RequestTooLarge as exc:
            yield self._refuse(request, exc)
            return
        version = adapter.version if adapter else None
        events = EventBuffer(asyncio.get_running_loop(), self.config.stream_interval_ms / 1000)
        seq_ids: list[int] = []
        try:
            for index in range(request.n):
                params = request.params
                if params.seed is not None and index:
                    params = dataclasses.replace(params, seed=params.seed + index)
                seq = SequenceRequest(prompt_ids, adapter, request.max_tokens, params,
                                      timeout_s=self.config.request_timeout_s or None)

                def sink(event, index=index):
                    events.put((index, event))
                seq_ids.append(self.batcher.submit(seq, sink))
        except QueueFull as exc:
            for seq_id in seq_ids:
                self.batcher.cancel(seq_id)
            self.metrics.error("queue_full")
            yield self._refuse(request, exc)
            return
        self.metrics.prompt_tokens(len(prompt_ids))
        yield StreamStart(prompt_tokens=len(prompt_ids), adapter_version=version)

        texts = [ChoiceText(self.engine.decode, request.stop) for _ in range(request.n)]
        generated, finish = [0] * request.n, [None] * request.n
        last_token_s: list[float | None] = [None] * request.n
        want_logprobs = request.params.logprobs is not None
        try:
            while any(reason is None for reason in finish):
                # What arrived since the last take goes out as one item per choice (oppu.serving.event_buffer).
                arrived = await events.take()
                pending: dict[int, tuple[str, list]] = {}
                items: list[Delta | ChoiceEnd] = []

                for index, event in arrived:
                    if finish[index] is not None:
                        continue  # tokens or the "cancelled" notice after a stop string matched
                    if isinstance(event, ErrorEvent):
                        self.metrics.error("timeout" if isinstance(event.error, RequestTimeout)
                                           else "request_too_large" if isinstance(event.error, SequenceTooLong)
                                           else "adapter_unusable")
                        if not isinstance(event.error, OppuError):
                            raise event.error  # a fault, not a refusal: Serve logs it
                        yield self._refuse(request, event.error)
                        return
                    if isinstance(event, TokenEvent):
                        now = time.time()
                        if last_token_s[index] is None:
                            self.metrics.first_token(now - request.received_s)
                        else:
                            self.metrics.inter_token(now - last_token_s[index])
                        last_token_s[index] = now
                        generated[index] += 1
                        released = texts[index].add(event.token_id,
                                                    self._token_info(event) if want_logprobs else None)
                    else:
                        assert isinstance(event, FinishEvent)
                        released = texts[index].finish()
                    text, tokens = pending.get(index, ("", []))
                    pending[index] = (text + released.text, tokens + released.tokens)
                    if released.stopped or isinstance(event, FinishEvent):
                        if released.stopped:
                            self.batcher.cancel(seq_ids[index])
                        finish[index] = "stop" if released.stopped or event.reason != "length" else "length"
                        _flush(pending, items, index)
                        items.append(ChoiceEnd(index, finish[index]))
                for index in list(pending):
                    _flush(pending, items, index)
                for item in items:
                    yield item
        finally:  # a client that left, an error or a stop: free the rows still decoding
            for index, seq_id in enumerate(seq_ids):
                if finish[index] is None:
                    self.batcher.cancel(seq_id)
        self.metrics.completion_tokens(sum(generated))
        self._report_slots()
        choices = tuple(ChoiceResult(i, texts[i].final_text, finish[i], generated[i],
                                     tuple(e for e in texts[i].entries[:texts[i].released_tokens])
                                     if want_logprobs else None) for i in range(request.n))
        yield GenerateResult(choices=choices, prompt_tokens=len(prompt_ids), adapter_version=version,
                             base_fingerprint=self.fingerprint)

    @staticmethod
    def _refuse(request: GenerateRequest, error: OppuError) -> Refused:
        # DEBUG and a keyed hash: a per-user event must not put user ids in the logs operators ship.
        log.debug("refused a request of %s: %s", user_ref(request.user), type(error).__name__)
        return Refused(error)

    def _token_info(self, event: TokenEvent) -> TokenInfo:
        logprob = event.logprob
        decode = self.engine.decode
        return TokenInfo(decode([event.token_id]), logprob.logprob,
                         tuple((decode([token]), value) for token, value in logprob.top))

    async def _prepare(self, request: GenerateRequest) -> tuple[list[int], LoadedAdapter | None]:
        if request.max_tokens > self.config.max_tokens_limit:
            raise RequestTooLarge(f"max_tokens {request.max_tokens} exceeds the limit "
                                  f"{self.config.max_tokens_limit}", "max_tokens")
        await self._apply_deletions()
        adapter: LoadedAdapter | None = None
        if request.user is not None:
            await self._adapter_for_routing(routing_key(request.user, self.config.routing_buckets))
            adapter = await self.adapters.get(request.user)
        loop = asyncio.get_running_loop()
        prompt_ids = await loop.run_in_executor(self._tokenize, self._encode, request, adapter)
        if len(prompt_ids) > self.config.max_prompt_tokens:
            raise RequestTooLarge(f"the prompt has {len(prompt_ids)} tokens; the limit is "
                                  f"{self.config.max_prompt_tokens}", request.prompt_field)
        limit = self.batcher.cache.token_limit  # set where GPU memory cut the KV cache at warm-up
        if limit is not None and len(prompt_ids) + request.max_tokens > limit:
            raise RequestTooLarge(f"the prompt's {len(prompt_ids)} tokens and max_tokens {request.max_tokens} "
                                  f"need more than the {limit} tokens this replica's KV cache holds a sequence",
                                  "max_tokens")
        return prompt_ids, adapter

    def _encode(self, request: GenerateRequest, adapter: LoadedAdapter | None) -> list[int]:
        if request.templated:
            return self.engine.tokenizer(request.prompt, add_special_tokens=False)["input_ids"]
        if request.as_trained:
            prompt_format = adapter.manifest.prompt_format if adapter is not None else self.prompt_format
            return self.engine.encode(request.prompt, prompt_format)
        return self.engine.encode(request.prompt)

    async def _apply_deletions(self) -> None:
        for user in await self.events.new_deletions():
            self.adapters.evict(user)

    def _report_slots(self) -> None:
        slot_stats = self.engine.slots.stats
        for hit, total in ((True, slot_stats.hits), (False, slot_stats.misses)):
            for _ in range(total - self._gpu_counts_reported[hit]):
                self.metrics.cache_lookup("gpu", hit)
            self._gpu_counts_reported[hit] = total
        self.metrics.resident("gpu", len(self.engine.slots.resident()))
        self.metrics.resident("host", len(self.adapters.cached_users()))
        now, generated = time.monotonic(), self.batcher.stats.generated
        last_s, last_generated = self._rate_mark
        rate = (generated - last_generated) / (now - last_s) if now > last_s else None
        self._rate_mark = (now, generated)
        self.metrics.running(self.batcher.stats.running, self.batcher.waiting(), rate)


def _flush(pending: dict[int, tuple[str, list]], items: list, index: int) -> None:
    """Turn choice ``index``'s gathered text and logprob entries into one ``Delta``."""
    text, tokens = pending.pop(index, ("", []))
    if text or tokens:
        items.append(Delta(index, text, tuple(token for token in tokens if token is not None)))


class _CountingRecorder:
    """The adapter cache's recorder: forwards to the metrics and counts host-tier lookups for ``stats``."""

    def __init__(self, metrics):
        self.metrics = metrics
        self.hits = self.misses = 0

    def cache_lookup(self, tier: str, hit: bool) -> None:
        if tier == "host":
            self.hits += hit
            self.misses += not hit
        self.metrics.cache_lookup(tier, hit)

    def adapter_loaded(self, seconds: float) -> None:
        self.metrics.adapter_loaded(seconds)
