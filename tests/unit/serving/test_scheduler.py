"""Continuous batching: sequences join and leave the running batch, each sampled with its own options."""

from __future__ import annotations

import pytest
import torch

from oppu.serving.http_errors import as_api_error
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
from tests.unit.serving.test_engine import CASES, PROMPTS, make_engine, offline_answers, setup  # noqa: F401

GREEDY = SamplingParams(temperature=0.0)


class Collector:
    """A sink that records one sequence's events."""

    def __init__(self):
        self.tokens: list[int] = []
        self.logprobs: list = []
        self.finish: str | None = None
        self.error: Exception | None = None

    def __call__(self, event) -> None:
        if isinstance(event, TokenEvent):
            self.tokens.append(event.token_id)
            self.logprobs.append(event.logprob)
        elif isinstance(event, FinishEvent):
            self.finish = event.reason
        else:
            assert isinstance(event, ErrorEvent)
            self.error = event.error

    @property
    def done(self) -> bool:
        return self.finish is not None or self.error is not None


def drain(batcher: ContinuousBatcher, sinks: list[Collector], max_steps: int = 500) -> None:
    for _ in range(max_steps):
        if all(sink.done for sink in sinks):
            return
        batcher.step()
    raise AssertionError("sequences did not finish")


def request(engine, loaded, user, prompt, max_new=8, params=GREEDY, **kwargs) -> SequenceRequest:
    return SequenceRequest(engine.encode(prompt), loaded[user] if user else None, max_new, params, **kwargs)


def engine_on(base, device: str):
    """The tiny base in float32 on ``device`` (token-for-token equality holds in float32 only on a GPU)."""
    from oppu.models import load_model
    from oppu.serving.engine import GenerationEngine, LoraSlotsConfig

    model, tokenizer = load_model(base, device=device, dtype=torch.float32)
    return GenerationEngine(model, tokenizer, LoraSlotsConfig(3, 8, ("q_proj", "v_proj")))


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("run_ahead", [False, True], ids=["step-by-step", "run-ahead"])
@pytest.mark.parametrize("chunk,warm", [(512, False), (3, False), (3, True)],
                         ids=["whole-prefill", "chunked-prefill", "warmed-up"])
def test_sequences_joining_mid_decode_equal_each_users_peft_model_alone(setup, offline_answers, chunk,  # noqa: F811
                                                                        warm, run_ahead, device):
    base, _, loaded = setup
    engine = engine_on(base, device)
    batcher = ContinuousBatcher(engine, max_batch_size=4, max_waiting=8, prefill_chunk_tokens=chunk,
                                run_ahead=run_ahead)
    if warm:  # as a replica starts: every row allocated and, on CUDA, every decode shape captured
        batcher.warm_up(200)
        allocated = (4, 256) if device == "cuda" else (batcher.cache.rows, batcher.cache.columns)  # CPU: grows
        assert (batcher.cache.rows, batcher.cache.columns) == allocated
        decode_shapes = {shape for shape in batcher.cache.graphs.shapes() if shape[0] == "decode"}
        assert len(decode_shapes) == (3 * 2 if device == "cuda" else 0)  # batches 1, 2, 4 x spans 128, 256
        captured_at_warm_up = batcher.cache.graphs.captures
    sinks = [Collector() for _ in CASES]
    # The first two start together; the others arrive while those decode, one per step.
    for i in (0, 1):
        batcher.submit(request(engine, loaded, *CASES[i]), sinks[i])
    for i in (2, 3, 4):
        for _ in range(2):
            batcher.step()
        batcher.submit(request(engine, loaded, *CASES[i]), sinks[i])
    drain(batcher, sinks)
    assert [engine.decode(sink.tokens) for sink in sinks] == offline_answers
    assert batcher.stats.joined_running_batch >= 3  # they joined a running batch, not a fresh one
    assert batcher.stats.max_running >= 3
    if chunk == 3:  # running rows kept decoding while a newcomer's prompt was prefilled in chunks
        assert batcher.stats.prefill_chunks > len(CASES)
    if device == "cuda":  # every forward a replayed CUDA graph (a failed capture would run eagerly)
        assert batcher.cache.graphs.enabled and batcher.cache.graphs.captures >= 2, batcher.cache.graphs.error
    if warm:  # nothing grew and no decode shape was captured while serving
        if device == "cuda":
            assert (batcher.cache.rows, batcher.cache.columns) == allocated
        assert {shape for shape in batcher.cache.graphs.shapes() if shape[0] == "decode"} == decode_shapes
        assert batcher.cache.graphs.captures == captured_at_warm_up  # prefill shapes too
    assert all(sink.finish in ("stop", "length") for sink in sinks)
    assert batcher._ahead is None and all(not seq.ahead for seq in batcher._running)  # nothing left on the device


def test_a_long_prompt_prefills_in_chunks_while_running_rows_keep_emitting(setup):  # noqa: F811
    base, _, loaded = setup
    engine = make_engine(base)
    batcher = ContinuousBatcher(engine, max_batch_size=4, max_waiting=8, prefill_chunk_tokens=2)
    running, newcomer = Collector(), Collector()
    batcher.submit(request(engine, loaded, "u1", PROMPTS[2], max_new=30), running)
    while len(running.tokens) < 2:
        batcher.step()
    long_prompt = " ".join([PROMPTS[1]] * 3)  # ~25 tokens: a dozen chunks of 2
    batcher.submit(request(engine, loaded, "u2", long_prompt, max_new=4), newcomer)
    before = len(running.tokens)
    while not newcomer.tokens and not newcomer.done:
        batcher.step()
    assert len(running.tokens) - before >= 10 or running.done  # one decode step per prefill chunk


@pytest.mark.parametrize("run_ahead", [False, True], ids=["step-by-step", "run-ahead"])
def test_seeded_sampling_repeats_alone_and_in_a_mix_and_rows_keep_their_own_options(setup, run_ahead):  # noqa: F811
    base, _, loaded = setup
    engine = make_engine(base)
    sampled = SamplingParams(temperature=1.5, top_p=0.95, seed=1234)

    def run(requests):
        batcher = ContinuousBatcher(engine, max_batch_size=8, max_waiting=8, run_ahead=run_ahead)
        sinks = [Collector() for _ in requests]
        for req, sink in zip(requests, sinks, strict=True):
            batcher.submit(req, sink)
        drain(batcher, sinks)
        return [sink.tokens for sink in sinks]

    alone = run([request(engine, loaded, "u1", PROMPTS[0], 12, sampled)])[0]
    again = run([request(engine, loaded, "u1", PROMPTS[0], 12, sampled)])[0]
    mixed = run([request(engine, loaded, "u2", PROMPTS[1], 12, SamplingParams(temperature=1.0, seed=7)),
                 request(engine, loaded, "u1", PROMPTS[0], 12, sampled),
                 request(engine, loaded, "u3", PROMPTS[0], 12, GREEDY)])
    assert alone == again == mixed[1]
    greedy_alone = run([request(engine, loaded, "u3", PROMPTS[0], 12, GREEDY)])[0]
    assert mixed[2] == greedy_alone
    other_seeds = {tuple(run([request(engine, loaded, "u1", PROMPTS[0], 12,
                                      SamplingParams(temperature=1.5, seed=s))])[0]) for s in range(5)}
    assert len(other_seeds) > 1  # sampling samples
    # top_k=1 leaves one candidate: sampling at any temperature is the greedy answer.
    top1 = run([request(engine, loaded, "u3", PROMPTS[0], 12, SamplingParams(temperature=2.0, top_k=1, seed=3))])[0]
    assert top1 == greedy_alone


def test_penalties_and_logprobs(setup):  # noqa: F811
    base, _, loaded = setup
    engine = make_engine(base)
    batcher = ContinuousBatcher(engine, max_batch_size=4, max_waiting=8)
    plain, penalised, with_logprobs = Collector(), Collector(), Collector()
    batcher.submit(request(engine, loaded, "u1", PROMPTS[0], 16), plain)
    batcher.submit(request(engine, loaded, "u1", PROMPTS[0], 16,
                           SamplingParams(temperature=0.0, presence_penalty=100.0)), penalised)
    batcher.submit(request(engine, loaded, "u1", PROMPTS[0], 16, SamplingParams(temperature=0.0, logprobs=3)),
                   with_logprobs)
    drain(batcher, [plain, penalised, with_logprobs])
    assert len(set(penalised.tokens)) == len(penalised.tokens)  # a used token is never chosen again
    assert len(set(plain.tokens)) < len(plain.tokens)  # ... while plain greedy repeats itself here
    assert with_logprobs.tokens == plain.tokens  # asking for logprobs changes nothing
    for token, logprob in zip(with_logprobs.tokens, with_logprobs.logprobs, strict=True):
        assert logprob.token_id == token and logprob.logprob <= 0
        assert len(logprob.top) == 3 and logprob.top[0] == (token, pytest.approx(logprob.logprob))
    assert all(lp is None for lp in plain.logprobs)


def test_queue_bound_timeout_and_cancel(setup):  # noqa: F811
    base, _, loaded = setup
    engine = make_engine(base)
    batcher = ContinuousBatcher(engine, max_batch_size=1, max_waiting=1)  # one row, one waiting
    first, second, late = Collector(), Collector(), Collector()
    first_id = batcher.submit(request(engine, loaded, "u1", PROMPTS[0], 8), first)
    batcher.submit(request(engine, loaded, "u2", PROMPTS[0], 8, timeout_s=0.0), second)
    with pytest.raises(QueueFull, match="max_queued_requests=1"):
        batcher.submit(request(engine, loaded, "u3", PROMPTS[0], 8), Collector())
    batcher.step()
    assert batcher.waiting() == 0  # first admitted, second timed out
    assert isinstance(second.error, RequestTimeout)
    batcher.submit(request(engine, loaded, "u3", PROMPTS[0], 8), late)  # room again
    batcher.cancel(first_id)
    drain(batcher, [first, late])
    assert first.finish == "cancelled" and len(first.tokens) < 8
    assert late.finish in ("stop", "length") and late.tokens


def test_a_waiting_sequences_adapter_is_loaded_into_a_slot_before_its_turn(setup):  # noqa: F811
    base, _, loaded = setup
    engine = make_engine(base)
    batcher = ContinuousBatcher(engine, max_batch_size=1, max_waiting=4)
    running, waiting = Collector(), Collector()
    batcher.submit(request(engine, loaded, "u1", PROMPTS[0], 6), running)
    batcher.step()
    batcher.submit(request(engine, loaded, "u2", PROMPTS[1], 6), waiting)
    batcher.step()
    assert not waiting.tokens and not running.done  # u2 waits for the only row ...
    assert loaded["u2"].cache_id in engine.slots.resident()  # ... with its adapter already in a slot
    drain(batcher, [running, waiting])
    assert waiting.finish in ("stop", "length")


def test_running_ahead_changes_no_token_and_no_ending(setup):  # noqa: F811
    # Endings known one step late on the host (end of sequence, max_tokens, a cancel) must not show:
    # every sequence gets the same tokens and the same finish as stepping one step at a time.
    base, _, loaded = setup
    engine = make_engine(base)
    eos = engine.eos_ids[0]
    cases = [("u1", PROMPTS[0], 1), ("u2", PROMPTS[1], 2), ("u3", PROMPTS[2], 9), (None, PROMPTS[0], 30),
             ("u1", PROMPTS[1], 17), ("u2", PROMPTS[2], 5)]

    def run(run_ahead: bool, stop_token: int | None = None, cancel: bool = False):
        batcher = ContinuousBatcher(engine, max_batch_size=3, max_waiting=8, run_ahead=run_ahead)
        if stop_token is not None:  # a token the model does emit, taken as end of sequence
            batcher._eos = {eos, stop_token}
        sinks = [Collector() for _ in cases]
        ids = [batcher.submit(request(engine, loaded, user, prompt, max_new), sink)
               for (user, prompt, max_new), sink in zip(cases, sinks, strict=True)]
        if cancel:
            while len(sinks[4].tokens) < 2:
                batcher.step()
            batcher.cancel(ids[4])
        drain(batcher, sinks)
        assert batcher._ahead is None
        return [(sink.tokens, sink.finish) for sink in sinks]

    plain = run(False)
    assert run(True) == plain
    assert {"length", "stop"} <= {finish for _, finish in plain}  # max_tokens and the model's own end both seen
    stop_token = plain[3][0][5]  # the 6th token of the long one: it now ends there, found a step late
    stopped = run(False, stop_token)
    assert stopped[3][1] == "stop" and stop_token not in stopped[3][0]
    assert run(True, stop_token) == stopped
    for run_ahead in (False, True):  # a cancel ends its sequence at a step boundary; the others go on unchanged
        cancelled = run(run_ahead, cancel=True)
        tokens, finish = cancelled[4]
        assert finish == "cancelled" and 2 <= len(tokens) < len(plain[4][0]) and plain[4][0][:len(tokens)] == tokens
        assert cancelled[:4] + cancelled[5:] == plain[:4] + plain[5:]


def test_a_sequence_longer_than_a_row_holds_fails_alone(setup):  # noqa: F811
    # Where GPU memory cut the KV cache at warm-up, a row holds token_limit tokens: a request that could
    # outgrow it is refused at admission, by name, and the sequences beside it go on.
    base, _, loaded = setup
    engine = make_engine(base)
    batcher = ContinuousBatcher(engine, max_batch_size=4, max_waiting=8)
    batcher.cache.token_limit = 128  # as warm-up sets it: a whole number of column blocks
    short, long = Collector(), Collector()
    batcher.submit(request(engine, loaded, "u1", PROMPTS[0], 8), short)
    batcher.submit(request(engine, loaded, "u2", PROMPTS[0], 125), long)
    drain(batcher, [short, long])
    assert isinstance(long.error, SequenceTooLong) and "at most 128" in str(long.error) and not long.tokens
    assert short.error is None and short.finish in ("stop", "length")
    assert as_api_error(long.error).status == 400 and as_api_error(long.error).param == "max_tokens"
