"""The serving KV cache: a row per sequence in static buffers, prefill in chunks, decode steps, growth."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from oppu.serving.row_cache import RowKVCache


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97, max_position_embeddings=1024)
    return LlamaForCausalLM(config).eval()


def reference(model, ids: list[int]) -> torch.Tensor:
    """Every position's logits of ``ids`` run alone, without a cache."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("head_only", [True, False], ids=["head-on-last-tokens", "whole-logits"])
def test_rows_of_different_lengths_prefilled_in_chunks_then_decoded_equal_each_sequence_alone(model, head_only):
    cache = RowKVCache(model, max_rows=4, column_block=16, initial_columns=16)
    assert cache._head is not None  # a Llama: the output head runs on each row's last token only ...
    if not head_only:  # ... as other architectures' whole forward (logits of every token) would
        cache._head = None
    generator = torch.Generator().manual_seed(1)
    sequences = [torch.randint(1, 97, (n,), generator=generator).tolist() for n in (5, 23, 40)]
    expected = [reference(model, ids) for ids in sequences]
    rows = [cache.acquire_row() for _ in sequences]
    assert rows == [0, 1, 2] and cache.rows == 4  # grown 1 -> 2 -> 4 rows
    prompts = [ids[:-3] for ids in sequences]
    done = [0, 0, 0]
    while any(d < len(p) for d, p in zip(done, prompts, strict=True)):  # chunks of at most 7 tokens a row
        live = [i for i, p in enumerate(prompts) if done[i] < len(p)]
        chunks = [prompts[i][done[i]:done[i] + 7] for i in live]
        logits = cache.prefill([rows[i] for i in live], chunks, None, pad_id=0)
        for j, i in enumerate(live):
            done[i] += len(chunks[j])
            torch.testing.assert_close(logits[j], expected[i][done[i] - 1], rtol=1e-4, atol=1e-5)
    assert cache.columns >= 40  # grown from 16 columns as the longest row needed
    for step in range(3):  # the last three tokens of each, fed one decode step at a time
        position = [len(p) + step for p in prompts]
        logits = cache.decode(rows, [ids[k] for ids, k in zip(sequences, position, strict=True)], None)
        for i in range(3):
            torch.testing.assert_close(logits[i], expected[i][position[i]], rtol=1e-4, atol=1e-5)
    assert cache.lengths[:3] == [len(ids) for ids in sequences]


def test_a_released_row_serves_the_next_sequence_without_its_predecessors_tokens(model):
    cache = RowKVCache(model, max_rows=2, column_block=16, initial_columns=64)
    first, second = cache.acquire_row(), cache.acquire_row()
    cache.prefill([first, second], [list(range(1, 50)), list(range(3, 9))], None, pad_id=0)
    cache.release_row(first)
    assert cache.acquire_row() == first and cache.lengths[first] == 0
    ids = [7, 8, 9, 10]
    logits = cache.prefill([first], [ids[:3]], None, pad_id=0)  # stale columns 3..48 stay masked
    torch.testing.assert_close(logits[0], reference(model, ids[:3])[-1], rtol=1e-4, atol=1e-5)
    logits = cache.decode([first], [ids[3]], None)
    torch.testing.assert_close(logits[0], reference(model, ids)[-1], rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="all 2 rows are taken"):
        cache.acquire_row()


def test_a_sliding_window_model_is_refused_by_name():
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, vocab_size=50, sliding_window=8)
    with pytest.raises(ValueError, match="MistralForCausalLM uses sliding-window attention"):
        RowKVCache(MistralForCausalLM(config), max_rows=1)


def test_warm_up_allocates_every_row_and_the_columns_asked_and_answers_stay_exact(model):
    cache = RowKVCache(model, max_rows=6, column_block=16, initial_columns=16)
    assert cache.warm_up(40, with_slots=False, allocate=True) == 48  # rounded up to the column block
    assert (cache.rows, cache.columns) == (6, 48) and cache.graphs.captures == 0  # no graphs on the CPU
    ids = torch.randint(1, 97, (30,), generator=torch.Generator().manual_seed(3)).tolist()
    expected = reference(model, ids)
    rows = [cache.acquire_row() for _ in range(6)]
    assert rows == list(range(6))
    logits = cache.prefill([rows[5]], [ids[:-1]], None, pad_id=0)
    torch.testing.assert_close(logits[0], expected[-2], rtol=1e-4, atol=1e-5)
    logits = cache.decode([rows[5]], [ids[-1]], None)
    torch.testing.assert_close(logits[0], expected[-1], rtol=1e-4, atol=1e-5)
    assert (cache.rows, cache.columns) == (6, 48)  # nothing grew while serving


def test_after_warm_up_the_buffers_grow_no_further_than_the_longest_sequence_allowed(model):
    cache = RowKVCache(model, max_rows=2, column_block=16, initial_columns=16)
    cache.warm_up(40, with_slots=False, allocate=True)
    row = cache.acquire_row()
    ids = list(range(1, 46))  # 45 tokens: a prefill span of 64 (a power of two) would not fit 48 columns
    logits = cache.prefill([row], [ids], None, pad_id=0)
    torch.testing.assert_close(logits[0], reference(model, ids)[-1], rtol=1e-4, atol=1e-5)
    assert cache.columns == 48  # read 48 columns, not grown to 64
    other = cache.acquire_row()
    cache.prefill([other], [list(range(1, 60))], None, pad_id=0)  # longer than allowed: grows, to what it needs
    assert cache.columns == 64


def test_warm_up_knows_every_shape_a_scheduler_runs_and_the_gpu_floors_keep_answers_exact(model):
    # The GPU's shape floors (at least 256 tokens and 512 columns a prefill pass) on the CPU: padding
    # must not change an answer, and every shape the forwards take must be among those warm-up captures.
    cache = RowKVCache(model, max_rows=4, column_block=16, initial_columns=16)
    cache.prefill_min_tokens, cache.prefill_min_span = 256, 512
    cache.warm_up(100, with_slots=False, allocate=True)
    chunk_tokens = 24
    expected_shapes = set(cache._decode_shapes(False)) | set(cache._prefill_shapes(chunk_tokens, False))
    ran = []
    forward = cache.graphs.forward
    cache.graphs.forward = lambda shape: (ran.append(shape), forward(shape))
    generator = torch.Generator().manual_seed(5)
    sequences = [torch.randint(1, 97, (n,), generator=generator).tolist() for n in (9, 31, 50, 70)]
    rows = [cache.acquire_row() for _ in sequences]
    prompts, done = [ids[:-4] for ids in sequences], [0] * 4
    while any(d < len(p) for d, p in zip(done, prompts, strict=True)):  # the scheduler's sharing of a chunk
        live = [i for i in range(4) if done[i] < len(prompts[i])]
        share = max(1, chunk_tokens // len(live))
        chunks = [prompts[i][done[i]:done[i] + share] for i in live]
        logits = cache.prefill([rows[i] for i in live], chunks, None, pad_id=0)
        for j, i in enumerate(live):
            done[i] += len(chunks[j])
            torch.testing.assert_close(logits[j], reference(model, sequences[i])[done[i] - 1], rtol=1e-4, atol=1e-5)
    for step in range(4):
        logits = cache.decode(rows, [ids[len(prompt) + step] for ids, prompt in zip(sequences, prompts, strict=True)],
                              None)
        for i in range(4):
            torch.testing.assert_close(logits[i], reference(model, sequences[i])[len(prompts[i]) + step],
                                       rtol=1e-4, atol=1e-5)
    assert ran and set(ran) <= expected_shapes, set(ran) - expected_shapes
    assert any(shape[0] == "prefill" and shape[1] * shape[2] >= 256 and shape[3] >= 100 for shape in ran)


def test_warm_up_stops_capturing_below_the_memory_reserve(monkeypatch):
    import torch

    from oppu.serving import row_cache

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (5 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 70 * gib)
    why = row_cache._low_memory(torch.device("cuda", 0))
    assert why == "5.0 GiB of 80.0 GiB free, below the 10% kept for serving (70.0 GiB allocated)"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (9 * gib, 80 * gib))
    assert row_cache._low_memory(torch.device("cuda", 0)) is None
    assert row_cache._low_memory(torch.device("cpu")) is None


def test_a_warm_up_forward_outside_serving_keeps_no_autograd_graph(model):
    # Warm-up runs forwards outside prefill/decode (which are no_grad). On an H100 a 7B warm-up ran out
    # of memory with ~45 GiB unexplained: each prefill shape's output buffer, written from a forward
    # that recorded autograd, kept that forward's every activation alive.
    assert any(p.requires_grad for p in model.parameters())
    cache = RowKVCache(model, max_rows=4, column_block=16, initial_columns=16)
    cache.warm_up(64, with_slots=False, allocate=True)
    shapes = cache._decode_shapes(False)[:1] + cache._prefill_shapes(32, False)[-1:]
    for shape in shapes:
        cache._idle_inputs(shape)
        cache.graphs.run(shape)
    outputs = [cache._logits] + [buffers[2] for buffers in cache._prefill_io.values()]
    assert len(outputs) >= 2 and not any(output.requires_grad for output in outputs)
