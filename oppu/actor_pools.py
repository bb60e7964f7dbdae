"""Ray Data actor pools for per-user work: training personal adapters, answering test queries."""

from __future__ import annotations


def one_batch_per_actor(size: int):
    """A pool of ``size`` actors, each handed one Ray Data task at a time.

    Ray Data's default queues up to four tasks on an actor. The first actor to finish loading
    the base model then takes every task of a small run while the others are still starting,
    and the run takes as long as one actor doing all the work (measured: the k-sweep analysis
    trained its 4 users one after another on one of 2 actors). A task is minutes of training,
    so the actor's short wait for its next one costs nothing. A task is one input block of
    users: one batch of ``users_per_batch`` only where the blocks are that small (a 10,000-user
    run whose sorted users sat in a few large blocks put thousands on one actor; see
    docs/performance-training.md).
    """
    import ray.data

    return ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1)
