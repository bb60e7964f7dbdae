"""Ray Data actor pools for per-user work: training personal adapters, answering test queries.

``map_users`` is the one way a stage sets up its pool: the users cut into one block per batch,
an actor class behind ``guard_start``, one batch per actor at a time, the stage's CPUs and GPUs
per actor. The other functions are its parts.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def map_users(users, actor_cls, failed_batch, stage, constructor_kwargs: dict, *, max_retries: int | None = None):
    """``users`` (a Ray Data dataset, in the order its batches should start) through a pool of ``actor_cls``.

    ``stage`` holds the pool's settings (``cfg.users`` or ``cfg.eval``): ``actors``,
    ``users_per_batch``, ``num_cpus_per_actor``, ``num_gpus_per_actor``. Each batch is
    ``users_per_batch`` consecutive users (``one_block_per_batch``, materialised before the pool
    starts: on a small cluster the pool's actors would otherwise hold every CPU while the read
    waits for one), handed to one actor at a time (``one_batch_per_actor``); an actor that cannot
    start answers its batches with ``failed_batch`` (``guard_start``). ``max_retries``: re-runs of
    a batch whose actor died (the actor restarts and loads again); then the batch is given up
    without failing the job. Returns (the input blocks, the results dataset).
    """
    blocks = one_block_per_batch(users, stage.users_per_batch)
    retries = {} if max_retries is None else {"max_task_retries": max_retries}
    results = blocks.map_batches(
        guard_start(actor_cls, failed_batch),
        fn_constructor_kwargs=constructor_kwargs,
        batch_size=stage.users_per_batch,
        compute=one_batch_per_actor(stage.actors),
        num_cpus=stage.num_cpus_per_actor,
        num_gpus=stage.num_gpus_per_actor or None,
        batch_format="numpy",
        **retries,
    )
    if max_retries is not None:
        # A batch that failed every retry costs its users, not the job; the caller reports them.
        results.context.max_errored_blocks = blocks.num_blocks()
    return blocks, results


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
                logger.error("%s", self._start_error)

        def __call__(self, batch):
            if self._start_error is not None:
                return failed_batch(batch, self._start_error, **self._start_kwargs)
            return super().__call__(batch)

    Guarded.__name__ = actor_cls.__name__  # Ray Data names the operator after it
    Guarded.__doc__ = actor_cls.__doc__
    return Guarded
