"""Continuous batching: requests join and leave the running decode batch at step boundaries.

One thread owns the model. Each iteration it (1) takes new requests and cancellations, (2) loads
the adapters of the next waiting requests into free LoRA slots ahead of their turn, (3) runs one
chunk of the newcomers' prefill, at most ``prefill_chunk_tokens`` tokens, in their own KV cache,
and (4) runs one decode step of every running row. Newcomers whose prefill is complete get their
first token and join the running batch; rows that finished (end of sequence, ``max_tokens``, a
stop string seen by the caller, a cancelled or timed-out request) leave it. So a request never
waits for a whole batch to finish, and running streams keep emitting while a long prompt is
prefilled chunk by chunk.

Every sequence in flight owns a row of the KV cache (``oppu.serving.row_cache``): its prompt is
prefilled into that row, chunk by chunk, and each decode step appends one token a row, at the row's
own position, so joining and leaving never copy the cache and a user's greedy tokens equal the
request alone. On CUDA each prefill and decode shape is captured once as a CUDA graph and replayed.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from oppu.errors import AdapterError
from oppu.serving.adapters import LoadedAdapter
from oppu.serving.row_cache import RowKVCache
from oppu.serving.sampling import RowSampler, choose_tokens
from oppu.serving.sequences import (
    ErrorEvent,
    FinishEvent,
    QueueFull,
    RequestTimeout,
    SchedulerStats,
    SequenceRequest,
    SequenceState,
    SequenceTooLong,
    Sink,
    StepAhead,
    TokenEvent,
)


class ContinuousBatcher:
    """Decodes every submitted sequence on ``engine``'s model, joining and leaving at step boundaries.

    ``submit`` and ``cancel`` may be called from any thread; events reach each sequence's ``sink``
    from the scheduler thread (``start``), or from the caller of ``step`` when driven by hand (tests).
    """

    def __init__(self, engine: Any, *, max_batch_size: int, max_waiting: int, prefill_chunk_tokens: int = 512,
                 cuda_graphs: bool | None = None, run_ahead: bool | None = None):
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.stats = SchedulerStats()
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._inbox: deque[tuple[str, Any]] = deque()
        self._in_flight = 0  # submitted and not finished: running rows plus waiting ones
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._waiting: deque[SequenceState] = deque()
        self._prefilling: list[SequenceState] = []  # admitted, prompt not yet all in the cache
        self._running: list[SequenceState] = []  # decoding
        self._deferred_release: list[LoadedAdapter] = []
        self._eos = set(engine.eos_ids)
        self._lora_layers = []
        if engine.slots is not None:
            from oppu.models.multi_lora import multi_lora_layers

            self._lora_layers = list(multi_lora_layers(engine.model).values())
        self.cache = RowKVCache(engine.model, max_rows=max_batch_size, cuda_graphs=cuda_graphs,
                                set_slots=self._set_slots if self._lora_layers else None)
        # Greedy steps run one ahead of the host (default: on CUDA): a step's tokens are chosen on the
        # device and fed to the next step there, which is launched before they are read back, so the
        # GPU does not wait while the host delivers tokens, builds inputs or waits for the interpreter
        # lock. A sequence that ended (end of sequence) is known one step late; that step's token is dropped.
        self.run_ahead = self.cache.device.type == "cuda" if run_ahead is None else run_ahead
        self._ahead: StepAhead | None = None

    # -- any thread -------------------------------------------------------------------------------

    def submit(self, request: SequenceRequest, sink: Sink) -> int:
        """Queue a sequence; ``QueueFull`` when every batch row is taken and ``max_waiting`` sequences wait."""
        with self._lock:
            if self._in_flight >= self.max_batch_size + self.max_waiting:
                raise QueueFull(f"{self._in_flight - self.max_batch_size} sequences already wait for one of "
                                f"{self.max_batch_size} batch rows on this replica "
                                f"(max_queued_requests={self.max_waiting})")
            self._in_flight += 1
            seq_id = next(self._ids)
        deadline = time.monotonic() + request.timeout_s if request.timeout_s is not None else None
        sampler = RowSampler.create(request.params, self.engine.device)
        self._post("submit", SequenceState(seq_id, request, sink, sampler, deadline))
        return seq_id

    def cancel(self, seq_id: int) -> None:
        """Stop a sequence at the next step boundary (a stop string matched, the client left)."""
        self._post("cancel", seq_id)

    def call_soon(self, func: Callable[[], Any]) -> None:
        """Run ``func`` on the scheduler thread between steps (slot bookkeeping)."""
        self._post("call", func)

    def release_adapter(self, adapter: LoadedAdapter) -> None:
        """Free an adapter's slot once no sequence uses it (host-cache eviction, deletion)."""
        self.call_soon(lambda: self._release(adapter))

    def waiting(self) -> int:
        """Sequences submitted and not yet given a batch row."""
        with self._lock:
            return max(0, self._in_flight - self.stats.running)

    def warm_up(self, max_sequence_tokens: int) -> None:
        """Before serving: give every batch row room for ``max_sequence_tokens`` and, on CUDA, capture
        every decode and prefill shape this scheduler can run (``RowKVCache.warm_up``), so that no
        request waits for a capture or for the cache to grow."""
        started = time.perf_counter()
        self.cache.warm_up(max_sequence_tokens, with_slots=bool(self._lora_layers),
                           prefill_chunk_tokens=self.prefill_chunk_tokens)
        self.stats.warm_up_s = time.perf_counter() - started

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="oppu-scheduler", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _post(self, kind: str, item: Any) -> None:
        with self._lock:
            self._inbox.append((kind, item))
        self._wake.set()

    # -- the scheduler thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop:
            if not self.step():
                self._wake.wait(timeout=0.05)
                self._wake.clear()

    def step(self) -> bool:
        """One iteration: inbox, deadlines, slot prefetch, admission, one prefill chunk, one decode step.

        Returns whether there was model work to do.
        """
        self._drain_inbox()
        self._expire()
        try:
            self._prefetch_slots()
            self._admit()
            worked = False
            if self._prefilling:
                started = time.perf_counter()
                self._prefill_chunk()
                self.stats.prefill_s += time.perf_counter() - started
                worked = True
            if self._running or self._ahead is not None:
                started = time.perf_counter()
                self._decode_step()
                self.stats.decode_s += time.perf_counter() - started
                worked = True
        except Exception as exc:  # a failed forward fails the sequences in it, never the thread
            self._ahead = None
            for seq in self._active():
                self._finish(seq, error=exc)
            self._prefilling, self._running = [], []
            worked = True
        self._release_deferred()
        self.stats.waiting = len(self._waiting)
        return worked

    def _drain_inbox(self) -> None:
        with self._lock:
            items, self._inbox = list(self._inbox), deque()
        cancelled = set()
        for kind, item in items:
            if kind == "submit":
                self._waiting.append(item)
            elif kind == "cancel":
                cancelled.add(item)
            else:
                item()
        if cancelled:
            for seq in [*self._waiting, *self._active()]:
                if seq.id in cancelled:
                    self._finish(seq, reason="cancelled")

    def _expire(self) -> None:
        now = time.monotonic()
        for seq in [*self._waiting, *self._active()]:
            if seq.deadline is not None and now > seq.deadline and not seq.done:
                self._finish(seq, error=RequestTimeout(
                    f"the request ran past its timeout of {seq.request.timeout_s} s "
                    f"({seq.generated} tokens generated)"))

    def _active(self) -> list[SequenceState]:
        return [*self._prefilling, *self._running]

    def _pinned(self) -> set[str]:
        return {seq.cache_id for seq in [*self._active(), *self._waiting]
                if seq.cache_id is not None and seq.slot is not None and not seq.done}

    def _assign_slot(self, seq: SequenceState) -> bool:
        """Give ``seq`` its adapter's slot, loading it if needed; False if every slot is in use."""
        if seq.slot is not None:
            return True
        if seq.request.adapter is None or self.engine.slots is None:
            seq.slot = -1
            return True
        try:
            slot = self.engine.slots.acquire(seq.request.adapter, pinned=self._pinned())
        except AdapterError as exc:
            self._finish(seq, error=exc)
            return True
        if slot is None:
            return False
        seq.slot = slot
        return True

    def _prefetch_slots(self) -> None:
        """Load the adapters of the next waiting sequences now, so their turn starts with the slot ready.

        On CUDA a slot load is an asynchronous copy queued on the stream, ahead of the prefill that reads it.
        """
        for seq in itertools.islice(list(self._waiting), self.max_batch_size):
            if seq.done:
                continue
            if not self._assign_slot(seq):
                break
        self._waiting = deque(seq for seq in self._waiting if not seq.done)

    def _admit(self) -> None:
        """Give waiting sequences a cache row each, as far as the batch has room."""
        room = self.max_batch_size - sum(not seq.done for seq in self._active())
        while self._waiting and room > 0:
            seq = self._waiting[0]
            if seq.done:
                self._waiting.popleft()
                continue
            if not self._assign_slot(seq):
                break
            self._waiting.popleft()
            if seq.done:  # an adapter that does not fit finishes its sequence in _assign_slot
                continue
            if not seq.request.prompt_ids:
                self._finish(seq, error=ValueError("the prompt has no tokens"))
                continue
            limit, needed = self.cache.token_limit, len(seq.request.prompt_ids) + seq.request.max_new_tokens
            if limit is not None and needed > limit:  # fail it alone, not the forward it would join
                self._finish(seq, error=SequenceTooLong(
                    f"the prompt and max_tokens need {needed} tokens; a sequence holds at most {limit} here"))
                continue
            seq.row = self.cache.acquire_row()
            self._prefilling.append(seq)
            room -= 1

    def _prefill_chunk(self) -> None:
        """The next ``prefill_chunk_tokens`` of the newcomers' prompts, shared out among them.

        A sequence whose prompt is then complete gets its first token and joins the running batch.
        """
        seqs = self._prefilling = [seq for seq in self._prefilling if not seq.done]
        if not seqs:
            return
        share = max(1, self.prefill_chunk_tokens // len(seqs))
        chunks = [seq.request.prompt_ids[seq.prefilled:seq.prefilled + share] for seq in seqs]
        logits = self.cache.prefill([seq.row for seq in seqs], chunks, self._slot_ids(seqs), self.engine.pad_id)
        self.stats.prefill_chunks += 1
        complete = []
        for i, (seq, chunk) in enumerate(zip(seqs, chunks, strict=True)):
            seq.prefilled += len(chunk)
            if seq.prefilled == len(seq.request.prompt_ids):
                complete.append(i)
        if not complete:
            return
        self._prefilling = [seq for seq in seqs if seq.prefilled < len(seq.request.prompt_ids)]
        ready = [seqs[i] for i in complete]
        self._emit(ready, logits[complete])
        joining = [seq for seq in ready if not seq.done]
        if any(not seq.done for seq in self._running):
            self.stats.joined_running_batch += len(joining)
        self._running.extend(joining)

    def _decode_step(self) -> None:
        seqs = self._running = [seq for seq in self._running if not seq.done]
        if self.run_ahead and all(seq.sampler.params.plain_greedy for seq in seqs):
            self._decode_ahead(seqs)
        else:
            self._settle_ahead()  # tokens still on the device first: they are these rows' inputs
            seqs = self._running = [seq for seq in self._running if not seq.done]
            if seqs:
                logits = self._launch_decode(seqs)
                self._emit(seqs, logits)
        self._running = [seq for seq in self._running if not seq.done]
        self.stats.running = len(self._running)

    def _launch_decode(self, seqs: list[SequenceState], carried: tuple | None = None) -> Any:
        logits = self.cache.decode([seq.row for seq in seqs], [seq.last_token for seq in seqs],
                                   self._slot_ids(seqs), carried=carried)
        self.stats.steps += 1
        self.stats.max_running = max(self.stats.max_running, len(seqs))
        self.stats.history = [*self.stats.history[-999:], len(seqs)]
        return logits

    def _decode_ahead(self, seqs: list[SequenceState]) -> None:
        """Launch the next greedy step, its inputs taken on the device from the step before, then read
        back and deliver that earlier step's tokens while this one runs."""
        import torch

        previous = self._ahead
        # A sequence whose token in flight is its last allowed one takes no further step.
        stepping = [seq for seq in seqs if seq.generated + seq.ahead < seq.request.max_new_tokens]
        self._ahead = None
        if stepping:
            carried = None
            if previous is not None:
                index = {id(seq): i for i, seq in enumerate(previous.seqs)}
                going_on = [seq for seq in stepping if seq.ahead]
                if going_on:
                    device = previous.tokens.device
                    carried = (torch.tensor([seq.row for seq in going_on], device=device),
                               previous.tokens[torch.tensor([index[id(seq)] for seq in going_on], device=device)])
            tokens = self._launch_decode(stepping, carried).argmax(-1)
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=tokens.is_cuda)
            host.copy_(tokens, non_blocking=tokens.is_cuda)
            ready = None
            if tokens.is_cuda:
                ready = torch.cuda.Event()
                ready.record()
            for seq in stepping:
                seq.ahead += 1
            self._ahead = StepAhead(stepping, tokens, host, ready)
        if previous is not None:
            self._deliver_ahead(previous)

    def _settle_ahead(self) -> None:
        if self._ahead is not None:
            ahead, self._ahead = self._ahead, None
            self._deliver_ahead(ahead)

    def _deliver_ahead(self, ahead: StepAhead) -> None:
        if ahead.ready is not None:
            ahead.ready.synchronize()
        for seq, token in zip(ahead.seqs, ahead.host.tolist(), strict=True):
            seq.ahead -= 1
            if not seq.done:  # not ended meanwhile (its row may already serve another sequence)
                self._accept(seq, token, None)

    def _slot_ids(self, seqs: list[SequenceState]) -> list[int] | None:
        return [seq.slot for seq in seqs] if self._lora_layers else None

    def _set_slots(self, slot_ids: Any) -> None:
        """Every LoRA layer uses ``slot_ids[b]`` for batch row ``b`` (None: no adapters)."""
        for layer in self._lora_layers:
            layer.slot_ids, layer.slot_spans = slot_ids, None

    def _emit(self, seqs: list[SequenceState], logits: Any) -> None:
        tokens, logprobs = choose_tokens(logits, [seq.sampler for seq in seqs])
        for seq, token, logprob in zip(seqs, tokens, logprobs, strict=True):
            self._accept(seq, token, logprob, counted=True)

    def _accept(self, seq: SequenceState, token: int, logprob: Any, counted: bool = False) -> None:
        """``token`` is ``seq``'s next: deliver it, or end the sequence."""
        if not counted:  # choose_tokens counts what it chooses (the penalties read the counts)
            seq.sampler.counts[token] += 1
        if token in self._eos:
            self._finish(seq, reason="stop")
            return
        seq.generated += 1
        self.stats.generated += 1
        seq.last_token = token
        self._deliver(seq, TokenEvent(token, logprob))
        if seq.generated >= seq.request.max_new_tokens:
            self._finish(seq, reason="length")

    def _finish(self, seq: SequenceState, reason: str | None = None, error: Exception | None = None) -> None:
        if seq.done:
            return
        self._mark_done(seq)
        self._deliver(seq, ErrorEvent(error) if error is not None else FinishEvent(reason))

    def _mark_done(self, seq: SequenceState) -> None:
        seq.done = True
        if seq.row is not None:
            self.cache.release_row(seq.row)
            seq.row = None
        with self._lock:
            self._in_flight -= 1

    def _deliver(self, seq: SequenceState, event: TokenEvent | FinishEvent | ErrorEvent) -> None:
        try:
            seq.sink(event)
        except Exception:  # the receiver is gone (its event loop closed): stop generating for it
            if not seq.done:
                self._mark_done(seq)

    def _release(self, adapter: LoadedAdapter) -> None:
        if self.engine.slots is None:
            return
        if adapter.cache_id in self._pinned():
            self._deferred_release.append(adapter)
        else:
            self.engine.slots.release(adapter)

    def _release_deferred(self) -> None:
        if self._deferred_release:
            pending, self._deferred_release = self._deferred_release, []
            for adapter in pending:
                self._release(adapter)
