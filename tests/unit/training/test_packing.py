"""Length-grouped micro-batches: one user per row, every token kept once, budget respected."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from oppu.training.packing import IGNORE_INDEX, Row, collate, group_by_length


def long_tailed_rows(n_users: int = 7, seed: int = 0) -> list[Row]:
    rng = random.Random(seed)
    rows = []
    for owner in range(n_users):
        for sample in range(rng.randint(1, 20)):
            length = min(512, int(rng.paretovariate(1.5) * 20))
            ids = [rng.randrange(3, 1000) for _ in range(length)]
            prompt = rng.randrange(0, length)
            rows.append(Row(owner, sample, ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return rows


def test_every_token_lands_once_in_its_owners_row_within_budget():
    rows = long_tailed_rows()
    batches = group_by_length(rows, max_tokens=1024)
    placed = Counter((row.owner, row.sample) for batch in batches for row in batch.rows)
    assert placed == Counter((row.owner, row.sample) for row in rows)
    for batch in batches:
        assert len(batch.rows) * batch.width <= 1024
        tensors = collate(batch, pad_token_id=0)
        assert tensors["input_ids"].shape == (len(batch.rows), batch.width)
        for i, row in enumerate(batch.rows):
            assert int(tensors["owners"][i]) == row.owner
            assert tensors["input_ids"][i, :len(row)].tolist() == list(row.input_ids)
            assert tensors["labels"][i, :len(row)].tolist() == list(row.labels)
            assert (tensors["labels"][i, len(row):] == IGNORE_INDEX).all()
            assert (tensors["input_ids"][i, len(row):] == 0).all()


def test_length_grouping_keeps_padding_small():
    rows = long_tailed_rows(n_users=30, seed=1)
    batches = group_by_length(rows, max_tokens=2048)
    padding = sum(batch.padding_tokens for batch in batches)
    real = sum(batch.real_tokens for batch in batches)
    assert real == sum(len(row) for row in rows)
    assert padding / real < 0.15
    # Padding every step's rows to the longest (the reference loop) wastes far more.
    assert padding < 0.5 * (len(rows) * max(len(row) for row in rows) - real)


def test_grouping_is_a_function_of_the_rows_alone():
    rows = long_tailed_rows(seed=2)
    shuffled = rows[:]
    random.Random(3).shuffle(shuffled)
    assert group_by_length(rows, 900) == group_by_length(shuffled, 900)


def test_over_long_and_malformed_samples_are_refused():
    with pytest.raises(ValueError, match="owner 4 has 9 tokens"):
        group_by_length([Row(4, 0, list(range(9)), list(range(9)))], max_tokens=8)
    with pytest.raises(ValueError, match="equally long"):
        Row(1, 2, [1, 2, 3], [1, 2])


def test_target_tokens_count_the_shifted_labels():
    row = Row(0, 0, [5, 6, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, 7, 8])
    assert row.target_tokens == 2
    assert Row(0, 1, [5, 6], [5, IGNORE_INDEX]).target_tokens == 0


def test_widths_round_up_within_budget():
    rows = long_tailed_rows(seed=4)
    for batch in group_by_length(rows, max_tokens=1024, width_multiple=64):
        assert batch.width % 64 == 0 or batch.width == 1024
        assert batch.width >= max(len(row) for row in batch.rows)
        assert len(batch.rows) * batch.width <= 1024


def test_collate_indexes_exactly_the_trained_predictions():
    rows = [Row(3, 0, [5, 6, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, 7, 8]), Row(1, 0, [9, 10], [9, 10])]
    tensors = collate(group_by_length(rows, max_tokens=64)[0], pad_token_id=0)
    # Predictions are the [rows, width - 1] grid: position p predicts token p + 1.
    assert tensors["trained_positions"].tolist() == [1, 2, 3]
    assert tensors["trained_labels"].tolist() == [7, 8, 10]
    assert tensors["trained_owners"].tolist() == [3, 3, 1]


def test_packing_places_every_sample_once_within_budget_and_nearly_full():
    from oppu.training.packing import pack_rows

    rows = long_tailed_rows(n_users=30, seed=5)
    passes = pack_rows(rows, max_tokens=1024, width_multiple=64)
    placed = Counter((row.owner, row.sample) for batch in passes for row in batch.rows)
    assert placed == Counter((row.owner, row.sample) for row in rows)
    for batch in passes:
        assert batch.real_tokens <= batch.width <= 1024
        assert batch.width % 64 == 0 or batch.width == 1024
    real = sum(len(row) for row in rows)
    # First-fit decreasing: no more passes than one over the ideal count, little padding.
    assert len(passes) <= -(-real // 1024) + 1
    assert sum(batch.padding_tokens for batch in passes) < 1024 + 64 * len(passes)
    # Spread evenly: no pass ends a step nearly empty.
    loads = [batch.real_tokens for batch in passes]
    assert max(loads) - min(loads) <= max(len(row) for row in rows)
    assert pack_rows(rows, 1024, 64) == pack_rows(list(reversed(rows)), 1024, 64)
    with pytest.raises(ValueError, match="owner 4 has 9 tokens"):
        pack_rows([Row(4, 0, list(range(9)), list(range(9)))], max_tokens=8)


def test_packing_with_owner_alignment_counts_each_owners_padded_block_within_budget():
    from oppu.training.packing import collate_packed, pack_rows

    rows = long_tailed_rows(n_users=30, seed=5)
    passes = pack_rows(rows, max_tokens=1024, width_multiple=64, owner_align=16)
    placed = Counter((row.owner, row.sample) for batch in passes for row in batch.rows)
    assert placed == Counter((row.owner, row.sample) for row in rows)
    for batch in passes:
        blocks = Counter()
        for row in batch.rows:
            blocks[row.owner] += len(row)
        assert sum(-(-n // 16) * 16 for n in blocks.values()) <= batch.width <= 1024
        spans = collate_packed(batch, pad_token_id=0, owner_align=16)["owner_spans"]
        assert [owner for owner, _, _ in spans] == sorted(blocks)  # one run per owner, in owner order
        assert spans[0][1] == 0 and all(prev[2] == nxt[1] for prev, nxt in zip(spans, spans[1:], strict=False))
        assert all((end - start) % 16 == 0 for _, start, end in spans)
    with pytest.raises(ValueError, match="owner 4 has 9 tokens"):
        pack_rows([Row(4, 0, list(range(9)), list(range(9)))], max_tokens=12, owner_align=16)


def test_owner_alignment_pads_each_owner_with_a_segment_that_predicts_nothing():
    from oppu.training.packing import PackedBatch, collate_packed

    rows = (Row(1, 0, [5, 6, 7], [IGNORE_INDEX, 6, 7]), Row(1, 1, [8, 9], [8, 9]), Row(3, 0, [10, 11, 12], [10, 11, 12]))
    plain = collate_packed(PackedBatch(rows, 16), pad_token_id=0)
    tensors = collate_packed(PackedBatch(rows, 16), pad_token_id=0, owner_align=4)
    assert tensors["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0, 10, 11, 12, 0, 0, 0, 0, 0]]
    assert tensors["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 0, 1, 2, 0, 0, 1, 2, 3]]
    # owner 1's block (5 tokens) padded to 8, owner 3's to 4; the tail (4, a multiple of 4) is owner 3's too
    assert tensors["owners"].tolist() == [[1] * 8 + [3] * 8]
    assert tensors["owner_spans"] == [(1, 0, 8), (3, 8, 16)]
    assert tensors["cu_seqlens"].tolist() == [0, 3, 5, 8, 11, 12, 16]
    # The same predictions as without the padding, at their new positions.
    assert tensors["trained_labels"].tolist() == plain["trained_labels"].tolist() == [6, 7, 9, 11, 12]
    assert tensors["trained_positions"].tolist() == [0, 1, 3, 8, 9]
    assert tensors["trained_owners"].tolist() == [1, 1, 1, 3, 3]
    with pytest.raises(ValueError, match="padded to 4"):
        collate_packed(PackedBatch(rows, 10), pad_token_id=0, owner_align=4)


def test_collate_packed_lays_samples_end_to_end_with_their_own_positions_and_targets():
    from oppu.training.packing import PackedBatch, collate_packed

    rows = (Row(3, 0, [5, 6, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, 7, 8]), Row(1, 0, [9, 10, 11], [9, 10, 11]))
    tensors = collate_packed(PackedBatch(rows, 9), pad_token_id=0)
    assert tensors["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 0, 0]]
    assert tensors["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1]]
    assert tensors["owners"].tolist() == [[3, 3, 3, 3, 1, 1, 1, -1, -1]]
    # The padding tail is a segment of its own, so every position has a defined attention.
    assert tensors["cu_seqlens"].tolist() == [0, 4, 7, 9]
    assert tensors["max_seqlen"] == 4
    # Position t predicts token t + 1 of its own sample; no prediction crosses a boundary.
    assert tensors["trained_positions"].tolist() == [1, 2, 4, 5]
    assert tensors["trained_labels"].tolist() == [7, 8, 10, 11]
    assert tensors["trained_owners"].tolist() == [3, 3, 1, 1]
    full = collate_packed(PackedBatch(rows, 7), pad_token_id=0)
    assert full["cu_seqlens"].tolist() == [0, 4, 7]
