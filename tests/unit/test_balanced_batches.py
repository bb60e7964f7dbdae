"""Users dealt into a pool's batches by rounds, so that the actors of a round finish together."""

import pytest

from oppu.actor_pools import balanced_batches


def test_one_round_of_two_batches_weighs_the_same_where_consecutive_runs_do_not():
    weights = list(range(100, 0, -1))  # sorted heaviest first, as the users driver reads them
    batches = balanced_batches(weights, rows_per_batch=50, actors=2)
    loads = [sum(weights[r] for r in b) for b in batches]
    assert sorted(r for b in batches for r in b) == list(range(100))
    assert [len(b) for b in batches] == [50, 50]
    assert abs(loads[0] - loads[1]) <= 50  # 2,525 and 2,525 here; consecutive halves: 3,775 and 1,275
    consecutive = [sum(weights[:50]), sum(weights[50:])]
    assert abs(loads[0] - loads[1]) < (consecutive[0] - consecutive[1]) / 10
    assert all(b == sorted(b) for b in batches)  # each batch keeps the order: longest first


def test_rounds_keep_neighbours_together_and_the_last_round_may_be_short():
    weights = [float(w) for w in range(23, 0, -1)]
    batches = balanced_batches(weights, rows_per_batch=4, actors=2)
    assert [sorted(b) for b in batches[:2]] == [[0, 3, 4, 7], [1, 2, 5, 6]]
    assert {r for b in batches[2:4] for r in b} == set(range(8, 16))  # round 2: the next 8 rows
    assert [len(b) for b in batches[:4]] == [4, 4, 4, 4]
    assert sorted(len(b) for b in batches[4:]) == [3, 4]  # 7 rows left: two batches, one short
    assert sorted(r for b in batches for r in b) == list(range(23))


def test_capacity_is_respected_when_one_row_outweighs_the_rest():
    batches = balanced_batches([1000, 1, 1, 1, 1, 1], rows_per_batch=3, actors=2)
    assert batches == [[0, 4, 5], [1, 2, 3]]  # the light rows fill the other batch first


def test_bad_sizes_are_refused_by_name():
    with pytest.raises(ValueError, match="rows_per_batch and actors"):
        balanced_batches([1.0], rows_per_batch=0, actors=1)
