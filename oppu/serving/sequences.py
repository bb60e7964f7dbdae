"""What the continuous batcher takes and gives: a sequence request, the events of its stream, the
errors that end one sequence alone (each maps to an HTTP status in ``oppu.serving.http_errors``),
and the state it keeps of each sequence and of itself."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from oppu.errors import OppuError
from oppu.serving.adapters import LoadedAdapter
from oppu.serving.sampling import RowSampler, SamplingParams, TokenLogprob


class QueueFull(OppuError):
    """The replica's waiting queue is full (HTTP 429 with Retry-After)."""


class RequestTimeout(OppuError):
    """The request ran past ``request_timeout_s`` (HTTP 504)."""


class SequenceTooLong(OppuError):
    """A prompt and ``max_tokens`` longer than a row of the KV cache holds (HTTP 400)."""

    param = "max_tokens"


@dataclass(frozen=True)
class SequenceRequest:
    """One sequence to generate: prompt ids, adapter (None: the base), budget and sampling."""

    prompt_ids: list[int]
    adapter: LoadedAdapter | None
    max_new_tokens: int
    params: SamplingParams = SamplingParams(temperature=0.0)
    timeout_s: float | None = None


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    logprob: TokenLogprob | None


@dataclass(frozen=True)
class FinishEvent:
    reason: str  # "stop" (end of sequence), "length" (max_new_tokens) or "cancelled"


@dataclass(frozen=True)
class ErrorEvent:
    error: Exception


Sink = Callable[[TokenEvent | FinishEvent | ErrorEvent], None]


@dataclass(eq=False)
class SequenceState:
    """A submitted sequence as the scheduler tracks it, from the queue to its last token."""

    id: int
    request: SequenceRequest
    sink: Sink
    sampler: RowSampler
    deadline: float | None
    slot: int | None = None  # -1: the base; None: not assigned yet
    row: int | None = None  # its row of the KV cache, from admission until it finishes
    prefilled: int = 0  # prompt tokens in the cache
    generated: int = 0
    last_token: int = 0
    ahead: int = 0  # tokens chosen on the device and not yet read back (a step run ahead)
    done: bool = False

    @property
    def cache_id(self) -> str | None:
        return self.request.adapter.cache_id if self.request.adapter is not None else None


@dataclass
class StepAhead:
    """A decode step whose greedy tokens were chosen on the device and are still being copied back."""

    seqs: list[SequenceState]
    tokens: Any  # [len(seqs)] on the device: the next step's inputs for those that go on
    host: Any  # their copy on the host (pinned on CUDA), complete once ``ready`` is
    ready: Any  # torch.cuda.Event, or None on a CPU (the copy was synchronous)


@dataclass
class SchedulerStats:
    steps: int = 0
    prefill_chunks: int = 0
    joined_running_batch: int = 0  # sequences that joined while other rows were decoding
    max_running: int = 0
    generated: int = 0  # tokens emitted, all sequences
    running: int = 0
    waiting: int = 0
    history: list[int] = field(default_factory=list)  # running rows per decode step (tests, last 1,000)
    prefill_s: float = 0.0  # wall time in prefill chunks, sampling and delivery included
    decode_s: float = 0.0  # wall time in decode steps, likewise
    warm_up_s: float = 0.0
