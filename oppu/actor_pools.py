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


def guard_start(actor_cls, failed_batch):
    """``actor_cls`` for ``map_batches``, where an actor that cannot start fails each batch once.

    Ray Data (2.60) fails the whole job the first time a pool actor's constructor raises
    (``max_consecutive_actor_init_deaths=0``), with the actor's traceback printed by every actor
    that tried, on every node. Behind this guard the constructor's error is caught and
    kept (one line on the actor's stderr); the actor stays up and answers each batch it is handed
    with ``failed_batch(batch, error, **constructor_kwargs)`` — the same columns as a normal
    result, every row marked failed with that error — without running the batch, retrying it or
    restarting the actor. So a node that cannot load the base costs the batches it takes, reported
    by name, and the job goes on with the others. (A job's inputs are checked before the pool
    starts, ``oppu.preflight``; this is for what only an actor can find out.)
    """

    class Guarded(actor_cls):
        def __init__(self, *args, **kwargs):
            self._start_error = None
            self._start_kwargs = kwargs
            try:
                super().__init__(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - reported on every batch, never raised
                detail = " ".join(str(exc).split())  # one line, whatever the exception printed
                self._start_error = f"{actor_cls.__name__} could not start: {type(exc).__name__}: {detail}"
                import sys

                print(f"[{actor_cls.__name__}] {self._start_error}", file=sys.stderr, flush=True)

        def __call__(self, batch):
            if self._start_error is not None:
                return failed_batch(batch, self._start_error, **self._start_kwargs)
            return super().__call__(batch)

    Guarded.__name__ = actor_cls.__name__  # Ray Data names the operator after it
    Guarded.__doc__ = actor_cls.__doc__
    return Guarded
