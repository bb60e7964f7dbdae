"""Ray Data actor pools for per-user work: training personal adapters, answering test queries.

``map_users`` is the one way a stage sets up its pool: the users cut into one block per batch,
an actor class behind ``guard_start``, one batch per actor at a time, the stage's CPUs and GPUs
per actor. The other functions are its parts; ``read_test_users`` picks and orders a stage's users.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def read_test_users(data_uri: str, keep=None, longest_first: bool = False):
    """The test users of the data set at ``data_uri`` as an Arrow table: those ``keep(user_id)``
    accepts (all, without it), longest history first (ties by user id) where ``longest_first``.

    Read and ordered here, in the driver, not by Ray Data: its sort cuts the table into as many
    partitions as the read's estimated blocks (200 for one small file) and the per-batch cut that
    follows runs within each, so batches came out of a few users each (measured: 100 users in
    batches of 50 went out as 47, 50 and 3; 8 users took 97 s to sort on 2 CPUs). The users table
    is one row per user, small beside the models.
    """
    import pyarrow as pa

    from oppu.data.dataset import read_users_table, users_parquet_path

    table = read_users_table(users_parquet_path(data_uri))
    mask = [role == "test" and (keep is None or keep(user)) for user, role in
            zip(table["user_id"].to_pylist(), table["role"].to_pylist(), strict=True)]
    table = table.filter(pa.array(mask, pa.bool_()))
    if longest_first:
        table = table.sort_by([("n_history", "descending"), ("user_id", "ascending")])
    return table


def map_users(users, actor_cls, failed_batch, stage, constructor_kwargs: dict, *, max_retries: int | None = None,
              balance_by: str | None = None):
    """``users`` (an Arrow table, in the order its batches should start) through a pool of ``actor_cls``.

    ``stage`` holds the pool's settings (``cfg.users`` or ``cfg.eval``): ``actors``,
    ``users_per_batch``, ``num_cpus_per_actor``, ``num_gpus_per_actor``. Each batch is
    ``users_per_batch`` consecutive users (``one_block_per_batch``) or, with ``balance_by`` (a
    numeric column; ``users`` sorted on it, heaviest first), the users of each round of
    ``actors`` batches dealt so that the round's batches weigh the same (``balanced_batches``);
    each batch is handed to one actor at a
    time (``one_batch_per_actor``); an actor that cannot
    start answers its batches with ``failed_batch`` (``guard_start``). ``max_retries``: re-runs of
    a batch whose actor died (the actor restarts and loads again); then the batch is given up
    without failing the job. Returns (the input blocks, the results dataset).
    """
    if balance_by is None:
        blocks = one_block_per_batch(users, stage.users_per_batch)
    else:
        blocks = one_block_per_batch(users, stage.users_per_batch,
                                     balanced_batches(users[balance_by].to_pylist(), stage.users_per_batch,
                                                      stage.actors))
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


def result_batches(results):
    """The rows of a pool's output (``map_users``' results dataset) as plain dicts, one list per
    output block as it arrives.

    An actor returns a whole batch of users at once, so its rows arrive together: a progress
    display fed row by row timed the batch's first user as if it alone had taken the batch's wall
    time, and printed "1/100 users, 107s, ETA 10606s" the moment all of them were done. Counted a
    block at a time, it moves by a batch.
    """
    for block in results.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield block.to_pylist()


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


def one_block_per_batch(table, rows_per_batch: int, batches: list[list[int]] | None = None):
    """A Ray dataset of ``table`` (Arrow) cut, in its order, into blocks of exactly
    ``rows_per_batch`` rows (the last may be shorter); or one block for each list of row
    indices in ``batches`` (``balanced_batches``).

    Ray Data makes one task per input block (and ``map_batches`` only cuts a block into
    ``batch_size`` pieces inside that task), so the block size, not ``batch_size``, decides how
    many users one actor takes at a time: a 10,000-user run whose sorted users sat in a few
    large blocks handed thousands to one actor while the other sat idle and was released
    (docs/performance-training.md). Blocks of one batch each spread the batches over the pool.
    """
    import ray.data

    if rows_per_batch < 1:
        raise ValueError(f"rows_per_batch must be >= 1, got {rows_per_batch}")
    if table.num_rows == 0:
        return ray.data.from_arrow(table)
    if batches is not None:
        return ray.data.from_arrow([table.take(rows) for rows in batches])
    return ray.data.from_arrow([table.slice(start, rows_per_batch)
                                for start in range(0, table.num_rows, rows_per_batch)])


def balanced_batches(weights: list[float], rows_per_batch: int, actors: int) -> list[list[int]]:
    """Row indices of each batch: the rows, in order, dealt by rounds of ``actors`` batches.

    A round is the next ``actors * rows_per_batch`` rows; each row, heaviest first, joins the
    round's lightest batch that has room (ties: the first). The actors start a round together,
    so its batches end together: cut into consecutive runs instead, a 100-user run in two
    batches of 50 gave the longest 50 histories to one actor, which trained 91 s while the other
    finished in 69 s and waited (LaMP-2M, H100, 2026-12-07). Within a round the rows are still
    neighbours in the order (similar history lengths, what the batched trainer's slots want),
    and each batch keeps the order, longest first.
    """
    if rows_per_batch < 1 or actors < 1:
        raise ValueError(f"rows_per_batch and actors must be >= 1, got {rows_per_batch} and {actors}")
    batches: list[list[int]] = []
    round_rows = rows_per_batch * actors
    for start in range(0, len(weights), round_rows):
        rows = range(start, min(start + round_rows, len(weights)))
        n_batches = -(-len(rows) // rows_per_batch)
        dealt: list[list[int]] = [[] for _ in range(n_batches)]
        load = [0.0] * n_batches
        for row in sorted(rows, key=lambda r: -weights[r]):  # stable: ties keep their order
            open_batches = [b for b in range(n_batches) if len(dealt[b]) < rows_per_batch]
            lightest = min(open_batches, key=lambda b: load[b])
            dealt[lightest].append(row)
            load[lightest] += weights[row]
        batches.extend(dealt)
    return batches


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
