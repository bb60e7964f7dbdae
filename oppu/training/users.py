"""One personal adapter per test user, through a Ray Data actor pool (jobs/train_users.py): the driver.

Users stream from ``users.parquet`` into ``PersonalTrainer`` actors (``oppu.training.users_actor``);
each actor loads the base once and trains many users, publishing each adapter to the store the
moment it is done (``oppu.training.publish``). The driver collects one ``UserResult`` a user and
writes the report (``oppu.training.users_report``).

Grouping by history length: the users are sorted by ``n_history``, longest first, and taken
in rounds of ``users.actors`` batches of ``users.users_per_batch`` users, each round's users
dealt so that its batches hold the same number of history items (``balanced_batches``); each
batch is one task on one actor. So the users an actor
trains together have similar history lengths (what ``users.trainer: batched`` needs to keep
its slots busy: no long-tail user trains alone for long while its batch-mates idle), and the
longest users start first, so none of them stalls the end of the run.

The store is the job's memory: a user whose adapter for the same data and config exists is
skipped, so a re-run, or Ray re-executing the batch of an actor that died (actors restart, a
batch is retried ``users.max_retries`` times), never trains or publishes a user twice; a batch
that still fails leaves its unfinished users reported as failed, not the job. A user whose data
or training fails is reported as failed; the others go on. Once every user is done and the report
written, more failed users than ``users.max_failed_users`` (default 0) fail the stage
(``StageFailed``: one line naming how many and which), so the command exits non-zero.
"""

from __future__ import annotations

import logging
import time

import pyarrow as pa

from oppu import fsutil, logs
from oppu.errors import StageFailed, name_list
from oppu.run_config import RunConfig
from oppu.training.users_report import UserResult, report_path, result_of_row, write_report

logger = logging.getLogger(__name__)


def train_personal_adapters(cfg: RunConfig, variant: str, log=logger.info,
                            stage: str = "train_users") -> list[UserResult]:
    """Train (or skip) every selected test user's adapter for ``variant``; returns one result each.

    Progress (users done of all, ETA, failures by name) goes to ``oppu.logs.progress``; each
    user's line and the summary to ``log``. ``stage`` names the job in those lines and its report
    (``reports/<stage>-<variant>.json``): ``migrate_users`` for a base upgrade (``oppu.migration``)."""
    from oppu.actor_pools import map_users, read_test_users, result_batches
    from oppu.erasure import tombstone_check
    from oppu.ids import validate_user_id
    from oppu.training.users_actor import PersonalTrainer, start_failed

    wanted = {validate_user_id(u) for u in cfg.users.users} if cfg.users.users else None
    erased = tombstone_check(cfg.store_uri)  # erased users (oppu users delete) are never trained again
    users = read_test_users(cfg.data_uri, lambda user: (wanted is None or user in wanted) and not erased(user),
                            longest_first=True)
    expected = users["user_id"].to_pylist()
    stored = already_published(cfg, variant, users)
    if stored:
        log(f"[{stage} {variant}] {len(stored)} of {len(expected)} users already have this adapter in the "
            "store: skipped without starting the actor pool")
        users = users.filter(pa.array([u not in stored for u in expected], pa.bool_()))
    # Sorted, each round of batches is a run of consecutive users in that order, dealt evenly:
    # similar history lengths on one actor, the longest first, the actors done together. An actor that dies is restarted (it loads the base again) and
    # its batch re-run up to max_retries times; users it had published by then are skipped as
    # already present. A batch that failed every retry costs its users, not the job.
    results: list[UserResult] = list(stored.values())
    started = time.perf_counter()
    first_done_s = None  # the pool's start (actors, base loads) shows as the wait for the first user
    batches = iter(())
    if users.num_rows:
        _, results_ds = map_users(users, PersonalTrainer, start_failed, cfg.users, {"cfg": cfg, "variant": variant},
                                  max_retries=cfg.users.max_retries, balance_by="n_history")
        batches = result_batches(results_ds)
    with logs.progress(users.num_rows, f"{stage} {variant}", unit="users") as bar:
        for rows in batches:
            if first_done_s is None:
                first_done_s = time.perf_counter() - started
            batch_results = [result_of_row(row) for row in rows]
            for result in batch_results:
                results.append(result)
                detail = (f"loss {result.loss:.3f}, {result.samples} samples, {result.seconds:.1f}s"
                          if result.status == "trained" else result.error or result.version)
                log(f"[{stage} {variant}] {len(results)} users ({time.perf_counter() - started:.0f}s): "
                    f"{result.user_id} {result.status} — {detail}")
            bar.update(len(batch_results), failed=[r.user_id for r in batch_results if r.status == "failed"])
    seen = {r.user_id for r in results}
    for user_id in expected:
        if user_id not in seen:
            results.append(UserResult(user_id, "failed", error=(
                f"its batch failed {cfg.users.max_retries + 1} times (the actor died; see the Ray "
                "logs); adapters it published survive, a re-run trains the rest")))
    write_report(cfg, variant, results, time.perf_counter() - started, stage)
    failed = [r for r in results if r.status == "failed"]
    elapsed = time.perf_counter() - started
    log(f"[{stage} {variant}] trained {sum(r.status == 'trained' for r in results)}, "
        f"skipped {sum(r.status == 'skipped' for r in results)}, failed {len(failed)} in {elapsed:.0f}s"
        + (f" (first user done after {first_done_s:.0f}s)" if first_done_s is not None else ""))
    for result in failed:
        log(f"[{stage} {variant}] FAILED user {result.user_id}: {result.error}")
    check_failed_users(cfg, variant, results, stage)
    return results


def already_published(cfg: RunConfig, variant: str, users: pa.Table) -> dict[str, UserResult]:
    """Skip results of the ``users`` whose adapter for the same data and train config the store holds.

    Checked here, before any actor starts, so a re-run of a finished variant (a resumed table, a
    job resubmitted) costs seconds, not an actor pool that loads the base only to skip everyone.
    Only where the base is a local directory: its fingerprint and tokenizer (the prompt format is
    part of the train config) are read in place; a remote base would have to be downloaded here,
    so its actors check instead, as they always do.
    """
    from oppu.data.records import UserData
    from oppu.models import base_fingerprint
    from oppu.models.prompting import model_prompt_format
    from oppu.training.publish import AdapterPublisher

    base_uri = cfg.base_uri(cfg.variant_base(variant))
    if not cfg.users.skip_existing or not users.num_rows or fsutil.is_remote(base_uri):
        return {}
    try:
        publisher = AdapterPublisher.for_run(cfg, variant, base_fingerprint(base_uri),
                                             model_prompt_format(cfg.prompt_format, fsutil.local_path(base_uri)),
                                             trainer=cfg.users.trainer)
    except Exception as exc:  # no base yet, or unreadable: the actors report it as they start
        logger.debug("no store check before the pool (%s: %s)", type(exc).__name__, exc)
        return {}
    stored = {}
    for row in users.to_pylist():
        try:
            manifest = publisher.existing(UserData.from_row(row))
        except Exception:  # a bad user's data fails that user, in its actor, with its error
            continue
        if manifest is not None:
            stored[row["user_id"]] = UserResult(row["user_id"], "skipped", version=manifest.version)
    return stored


def check_failed_users(cfg: RunConfig, variant: str, results: list[UserResult], stage: str = "train_users") -> None:
    """Raise ``StageFailed`` when more users failed than ``users.max_failed_users`` allows (-1: any)."""
    failed = sorted(r.user_id for r in results if r.status == "failed")
    allowed = cfg.users.max_failed_users
    if not failed or allowed == -1 or len(failed) <= allowed:
        if failed:
            logger.warning("[%s %s] %d of %d users failed, within users.max_failed_users=%s",
                           stage, variant, len(failed), len(results), allowed)
        return
    raise StageFailed(
        f"{stage} {variant}: {len(failed)} of {len(results)} users failed ({name_list(failed)}), "
        f"more than users.max_failed_users={allowed} allows (--max-failed-users N); their errors are "
        f"in {report_path(cfg.run_dir, variant, stage)}")
