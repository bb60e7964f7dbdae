"""One personal adapter per test user, through a Ray Data actor pool (jobs/train_users.py).

Users stream from ``users.parquet`` (longest history first, so a long-tail user starts early and
does not stall the end of the run) into ``PersonalTrainer`` actors; each actor loads the base once
and trains many users, publishing each adapter to the store the moment it is done. The store is
the job's memory: a user whose adapter for the same data and config exists is skipped, so a
re-run (or Ray re-executing the batch of an actor that died) never trains or publishes twice.
A user whose data or training fails is reported as failed; the others go on.
"""

from __future__ import annotations

import tempfile
import time
import traceback
from dataclasses import asdict, dataclass

from oppu import fsutil
from oppu.training.config import RunConfig, parse_variant

RESULT_FIELDS = ("user_id", "status", "version", "samples", "tokens", "seconds", "loss", "error")


@dataclass
class UserResult:
    user_id: str
    status: str  # "trained", "skipped" (adapter for the same data and config exists) or "failed"
    version: str = ""
    samples: int = 0
    tokens: int = 0
    seconds: float = 0.0
    loss: float = float("nan")
    error: str = ""


def adapter_train_config(cfg: RunConfig, variant: str, epochs: int) -> dict:
    """What makes two adapters of one user the same training (the store hashes it for ``find``)."""
    flavour, k = parse_variant(variant)
    config = {"variant": variant, "peft": asdict(cfg.users.peft), "optim": asdict(cfg.users.optim),
              "epochs": epochs, "seed": cfg.seed, "retrieval_k": k}
    if flavour == "profile":
        config["profile_writer"] = cfg.profiles.writer
    return config


class PersonalTrainer:
    """Ray Data actor: holds one base model and trains the personal adapters of many users."""

    def __init__(self, config: dict, variant: str):
        import torch

        from oppu.config import from_dict
        from oppu.models import base_fingerprint, load_model
        from oppu.store import AdapterStore, config_hash
        from oppu.tasks import get_task

        self.cfg = from_dict(RunConfig, config)
        self.variant = variant
        flavour, self.k = parse_variant(variant)
        self.task = get_task(self.cfg.task)
        base_uri = self.cfg.base_uri(flavour)
        device = "cuda" if self.cfg.users.num_gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
        self.model, self.tokenizer = load_model(base_uri, device=device)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.fingerprint = base_fingerprint(base_uri)
        self.store = AdapterStore(self.cfg.store_uri)
        self.epochs = self.cfg.users.optim.epochs or self.task.default_epochs
        self.train_config = adapter_train_config(self.cfg, variant, self.epochs)
        self.config_hash = config_hash(self.train_config)
        self.metrics = _job_metrics()
        self.profiles: dict[str, str] = {}
        if flavour == "profile":
            from oppu.profiles import read_profiles

            self.profiles = read_profiles(self.cfg.data_uri, self.cfg.profiles.writer)

    def __call__(self, batch: dict) -> dict:
        from oppu.data.records import UserData

        rows = [dict(zip(batch.keys(), values, strict=True)) for values in zip(*batch.values(), strict=True)]
        results = []
        for row in rows:
            try:
                user = UserData.from_row(row)
                results.append(self._train_one(user))
            except Exception as exc:  # one bad user fails that user, never the batch
                results.append(UserResult(str(row.get("user_id")), "failed",
                                          error=f"{type(exc).__name__}: {exc}"[:2000]))
                traceback.print_exc()
            self._record(results[-1])
        return {name: [getattr(r, name) for r in results] for name in RESULT_FIELDS}

    def _train_one(self, user) -> UserResult:
        from oppu.data.dataset import dataset_fingerprint, history_span
        from oppu.store import AdapterKey
        from oppu.training.personal import train_user_adapter
        from oppu.training.samples import personal_samples

        key = AdapterKey(self.task.name, self.fingerprint, self.variant, user.user_id)
        data_hash = dataset_fingerprint(user)
        if self.cfg.users.skip_existing:
            existing = self.store.find(key, data_hash, self.config_hash)
            if existing is not None:
                return UserResult(user.user_id, "skipped", version=existing.version)
        profile = None
        if self.profiles or self.variant == "pag+oppu":
            from oppu.errors import DataError

            if user.user_id not in self.profiles:
                raise DataError(f"no {self.cfg.profiles.writer} profile for this user: run "
                                f"`oppu profiles --run {self.cfg.run_dir}` first", user=user.user_id)
            profile = self.profiles[user.user_id]
        samples = personal_samples(self.task, user, self.k, profile)
        with tempfile.TemporaryDirectory(prefix="oppu-adapter-") as out_dir:
            stats = train_user_adapter(self.model, self.tokenizer, samples, self.cfg.users.peft,
                                       self.cfg.users.optim, self.epochs, self.cfg.seed, user.user_id,
                                       out_dir)
            manifest = self.store.publish(
                key, out_dir, data_hash=data_hash, config=self.train_config,
                peft_method=self.cfg.users.peft.method, data_span=history_span(user),
                metrics={"final_loss": stats.final_loss, "samples": stats.samples,
                         "steps": stats.steps, "tokens": stats.tokens, "seconds": stats.seconds})
        return UserResult(user.user_id, "trained", version=manifest.version, samples=stats.samples,
                          tokens=stats.input_tokens, seconds=stats.seconds, loss=stats.final_loss)

    def _record(self, result: UserResult) -> None:
        tags = {"task": self.task.name, "variant": self.variant}
        if result.status == "failed":
            self.metrics["failed"].inc(1, tags=tags)
        else:
            self.metrics["done"].inc(1, tags=tags)
        if result.status == "trained" and result.seconds > 0:
            self.metrics["tokens_per_s"].set(result.tokens / result.seconds, tags=tags)


def _job_metrics() -> dict:
    """Custom Ray metrics (shown on the dashboard's Metrics page and its Prometheus endpoint)."""
    from ray.util.metrics import Counter, Gauge

    keys = ("task", "variant")
    return {
        "done": Counter("oppu_users_done", "Personal adapters finished (trained or already present).",
                        tag_keys=keys),
        "failed": Counter("oppu_users_failed", "Users whose adapter could not be trained.", tag_keys=keys),
        "tokens_per_s": Gauge("oppu_train_tokens_per_s", "Training tokens per second of the last user.",
                              tag_keys=keys),
    }


def train_personal_adapters(cfg: RunConfig, variant: str, log=print) -> list[UserResult]:
    """Train (or skip) every selected test user's adapter for ``variant``; returns one result each."""
    import ray.data

    from oppu.data.dataset import users_parquet_path
    from oppu.ids import validate_user_id

    wanted = {validate_user_id(u) for u in cfg.users.users} if cfg.users.users else None
    users = ray.data.read_parquet(users_parquet_path(cfg.data_uri))
    users = users.filter(lambda row: row["role"] == "test" and (wanted is None or row["user_id"] in wanted))
    # Materialised before the actor pool starts: on a small cluster the pool's actors would
    # otherwise hold every CPU while the read and sort wait for one.
    users = users.sort("n_history", descending=True).materialize()
    results_ds = users.map_batches(
        PersonalTrainer,
        fn_constructor_kwargs={"config": asdict(cfg), "variant": variant},
        batch_size=cfg.users.users_per_batch,
        concurrency=cfg.users.actors,
        num_cpus=cfg.users.num_cpus_per_actor,
        num_gpus=cfg.users.num_gpus_per_actor or None,
        max_task_retries=cfg.users.max_retries,
        batch_format="numpy",
    )
    results: list[UserResult] = []
    started = time.perf_counter()
    for row in results_ds.iter_rows():
        result = UserResult(**{name: _plain(row[name]) for name in RESULT_FIELDS})
        results.append(result)
        elapsed = time.perf_counter() - started
        detail = (f"loss {result.loss:.3f}, {result.samples} samples, {result.seconds:.1f}s"
                  if result.status == "trained" else result.error or result.version)
        log(f"[train_users {variant}] {len(results)} users ({elapsed:.0f}s): "
            f"{result.user_id} {result.status} — {detail}")
    _write_report(cfg, variant, results, time.perf_counter() - started)
    failed = [r for r in results if r.status == "failed"]
    log(f"[train_users {variant}] trained {sum(r.status == 'trained' for r in results)}, "
        f"skipped {sum(r.status == 'skipped' for r in results)}, failed {len(failed)}")
    for result in failed:
        log(f"[train_users {variant}] FAILED user {result.user_id}: {result.error}")
    return results


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def _write_report(cfg: RunConfig, variant: str, results: list[UserResult], seconds: float) -> None:
    trained = [r for r in results if r.status == "trained"]
    tokens = sum(r.tokens for r in trained)
    busy = sum(r.seconds for r in trained)
    report = {"variant": variant, "task": cfg.task, "seconds": seconds,
              "trained": len(trained), "skipped": sum(r.status == "skipped" for r in results),
              "failed": sum(r.status == "failed" for r in results),
              "tokens_per_s_per_actor": tokens / busy if busy else None,
              "users": [asdict(r) for r in results]}
    name = f"train_users-{variant.replace('+', '_')}.json"
    fsutil.write_json(fsutil.join(cfg.run_dir, "reports", name), report)


def load_report(run_dir: str, variant: str) -> dict:
    return fsutil.read_json(fsutil.join(run_dir, "reports", f"train_users-{variant.replace('+', '_')}.json"))

