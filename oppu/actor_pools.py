"""Ray Data actor pools for per-user work: training personal adapters, answering test queries."""

from __future__ import annotations


def one_batch_per_actor(size: int):
    """A pool of ``size`` actors, each handed one Ray Data task at a time.

    Ray Data's default queues up to four tasks on an actor. The first actor to finish loading
    the base model then takes every task of a small run while the others are still starting,
    and the run takes as long as one actor doing all the work (measured: the k-sweep analysis
    trained its 4 users one after another on one of 2 actors). A task is minutes of training,
    so the actor's short wait for its next one costs nothing. A task is one input block of
    users, so the input goes through ``one_block_per_batch`` first.
    """
    import ray.data

    return ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1)


def one_block_per_batch(dataset, rows_per_batch: int):
    """``dataset`` cut, in its order, into materialised blocks of ``rows_per_batch`` rows (Ray may
    leave a shorter block where two sort partitions meet; nothing here needs exact sizes).

    Ray Data makes one task per input block (and ``map_batches`` only cuts a block into
    ``batch_size`` pieces inside that task), so the block size, not ``batch_size``, decides how
    many users one actor takes at a time: a 10,000-user run whose sorted users sat in a few
    large blocks handed thousands to one actor while the other sat idle and was released
    (docs/performance-training.md). Blocks of one batch each spread the batches over the pool.
    """
    return dataset.repartition(target_num_rows_per_block=rows_per_batch, strict=True).materialize()
