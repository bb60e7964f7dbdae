"""One personal adapter per test user, through a Ray Data actor pool (jobs/train_users.py).

Users stream from ``users.parquet`` into ``PersonalTrainer`` actors; each actor loads the base
once and trains many users, publishing each adapter to the store the moment it is done.

Grouping by history length: the users are sorted by ``n_history``, longest first, and cut
into blocks of ``users.users_per_batch`` consecutive users (``one_block_per_batch``); each
block is one task on one actor. So the users an actor
trains together have similar history lengths (what ``users.trainer: batched`` needs to keep
its slots busy: no long-tail user trains alone for long while its batch-mates idle), and the
longest users start first, so none of them stalls the end of the run.

The store is the job's memory: a user whose adapter for the same data and config exists is
skipped, so a re-run, or Ray re-executing the batch of an actor that died (actors restart, a
batch is retried ``users.max_retries`` times), never trains or publishes a user twice; a batch
that still fails leaves its unfinished users reported as failed, not the job. A user whose data
or training fails is reported as failed; the others go on.
"""

from __future__ import annotations

import tempfile
import time
import traceback
from dataclasses import asdict, dataclass

from oppu import fsutil
from oppu.run_config import RunConfig, parse_variant

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


def adapter_train_config(cfg: RunConfig, variant: str, epochs: int, trainer: str = "per-user",
                         prompt_format: str = "plain") -> dict:
    """What makes two adapters of one user the same training (the store hashes it for ``find``).

    ``trainer`` is recorded only when it is not ``per-user``, and ``prompt_format`` (which the
    manifest carries to serving, see ``oppu.models.prompting``) only when it is not ``plain``, so
    older manifests keep their hash: batched training gives the same adapter up to floating-point
    order and dropout masks, not bit for bit, so switching trainers trains afresh rather than
    mixing the two.
    """
    profile, k = parse_variant(variant)
    config = {"variant": variant, "peft": asdict(cfg.users.peft), "optim": asdict(cfg.users.optim),
              "epochs": epochs, "seed": cfg.seed, "retrieval_k": k}
    if profile:
        config["profile_writer"] = cfg.profiles.writer
    if trainer != "per-user":
        config["trainer"] = trainer
    if prompt_format != "plain":
        config["prompt_format"] = prompt_format
    return config


@dataclass
class _Pending:
    """A user to train: its place in the batch, store key, data hash and samples."""

    index: int
    user: object  # UserData
    key: object  # AdapterKey
    data_hash: str
    samples: list


class PersonalTrainer:
    """Ray Data actor: holds one base model and trains the personal adapters of many users."""

    def __init__(self, config: dict, variant: str):
        import torch

        from oppu.config import from_dict
        from oppu.models import base_fingerprint, load_model
        from oppu.models.prompting import resolve_prompt_format
        from oppu.store import AdapterStore, config_hash
        from oppu.tasks import get_task

        self.cfg = from_dict(RunConfig, config)
        self.variant = variant
        uses_profile, self.k = parse_variant(variant)
        self.task = get_task(self.cfg.task)
        base_uri = self.cfg.base_uri(self.cfg.variant_base(variant))
        device = "cuda" if self.cfg.users.num_gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
        self.model, self.tokenizer = load_model(base_uri, device=device)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.fingerprint = base_fingerprint(base_uri)
        self.prompt_format = resolve_prompt_format(self.cfg.prompt_format, self.tokenizer)
        self.store = AdapterStore(self.cfg.store_uri)
        self.epochs = self.cfg.users.optim.epochs or self.task.default_epochs
        self.trainer = self.cfg.users.trainer
        self.train_config = adapter_train_config(self.cfg, variant, self.epochs, self.trainer,
                                                 self.prompt_format)
        self.config_hash = config_hash(self.train_config)
        self.metrics = _job_metrics()
        self.profiles: dict[str, str] = {}
        if uses_profile:
            from oppu.profiles import read_profiles

            self.profiles = read_profiles(self.cfg.data_uri, self.cfg.profiles.writer)

    def __call__(self, batch: dict) -> dict:
        rows = [dict(zip(batch.keys(), values, strict=True)) for values in zip(*batch.values(), strict=True)]
        results: list[UserResult | None] = [None] * len(rows)
        pending: list[_Pending] = []
        for index, row in enumerate(rows):
            try:
                prepared = self._prepare(index, row)
            except Exception as exc:  # one bad user fails that user, never the batch
                self._finish(results, index, _failed(row.get("user_id"), exc))
                continue
            if isinstance(prepared, UserResult):
                self._finish(results, index, prepared)
            else:
                pending.append(prepared)
        if self.trainer == "batched":
            self._train_batched(pending, results)
        else:
            for job in pending:
                try:
                    result = self._train_alone(job)
                except Exception as exc:
                    result = _failed(job.user.user_id, exc)
                self._finish(results, job.index, result)
        return {name: [getattr(r, name) for r in results] for name in RESULT_FIELDS}

    def _prepare(self, index: int, row: dict) -> UserResult | _Pending:
        """A skip result when the store holds this user's adapter already, else the user's samples."""
        from oppu.data.dataset import dataset_fingerprint
        from oppu.data.records import UserData
        from oppu.store import AdapterKey
        from oppu.training.samples import personal_samples

        user = UserData.from_row(row)
        key = AdapterKey(self.task.name, self.fingerprint, self.variant, user.user_id)
        data_hash = dataset_fingerprint(user)
        if self.cfg.users.skip_existing:
            existing = self.store.find(key, data_hash, self.config_hash)
            if existing is not None:
                return UserResult(user.user_id, "skipped", version=existing.version)
        profile = None
        if self.profiles or parse_variant(self.variant)[0]:
            from oppu.errors import DataError

            if user.user_id not in self.profiles:
                raise DataError(f"no {self.cfg.profiles.writer} profile for this user: run "
                                f"`oppu profiles --run {self.cfg.run_dir}` first", user=user.user_id)
            profile = self.profiles[user.user_id]
        samples = personal_samples(self.task, user, self.k, profile)
        if not samples:
            raise ValueError(f"user {user.user_id!r} has no training samples")
        return _Pending(index, user, key, data_hash, samples)

    def _train_alone(self, job: _Pending) -> UserResult:
        from oppu.training.personal import train_user_adapter

        with tempfile.TemporaryDirectory(prefix="oppu-adapter-") as out_dir:
            stats = train_user_adapter(self.model, self.tokenizer, job.samples, self.cfg.users.peft,
                                       self.cfg.users.optim, self.epochs, self.cfg.seed, job.user.user_id,
                                       out_dir, self.prompt_format)
            manifest = self._publish(job, out_dir, {
                "final_loss": stats.final_loss, "samples": stats.samples, "steps": stats.steps,
                "tokens": stats.target_tokens, "seconds": stats.seconds})
        return UserResult(job.user.user_id, "trained", version=manifest.version, samples=stats.samples,
                          tokens=stats.input_tokens, seconds=stats.seconds, loss=stats.final_loss)

    def _publish(self, job: _Pending, adapter_dir: str, metrics: dict):
        from oppu.data.dataset import history_span

        return self.store.publish(job.key, adapter_dir, data_hash=job.data_hash, config=self.train_config,
                                  peft_method=self.cfg.users.peft.method,
                                  data_span=history_span(job.user), metrics=metrics)

    def _train_batched(self, pending: list[_Pending], results: list[UserResult | None]) -> None:
        """Train ``pending`` together (``train_users_batched``), publishing each user as it finishes.

        A user whose samples cannot be encoded fails alone. Should the batched pass itself raise,
        the users it had not finished are retried one by one, so a bad user fails only itself.
        """
        from oppu.models import encode_sample
        from oppu.training.batched import train_users_batched

        optim = self.cfg.users.optim
        jobs: dict[str, _Pending] = {}
        encoded: list[tuple[str, list[dict]]] = []
        for job in pending:
            try:
                encoded.append((job.user.user_id, [
                    encode_sample(self.tokenizer, s, optim.max_length, self.prompt_format)
                    for s in job.samples]))
                jobs[job.user.user_id] = job
            except Exception as exc:
                self._finish(results, job.index, _failed(job.user.user_id, exc))
        if not encoded:
            return
        peft_config = self._lora_config()
        started = time.perf_counter()
        trained: list[UserResult] = []

        def publish(user_id: str, state: dict, stats) -> None:
            from safetensors.torch import save_file

            job = jobs[user_id]
            try:
                # Seconds: the wall time from the start of this batched pass to this user's last
                # step (the pass trains several users at once; the report shares it out below).
                seconds = time.perf_counter() - started
                with tempfile.TemporaryDirectory(prefix="oppu-adapter-") as out_dir:
                    save_file(state, f"{out_dir}/adapter_model.safetensors", metadata={"format": "pt"})
                    peft_config.save_pretrained(out_dir)
                    manifest = self._publish(job, out_dir, {
                        "final_loss": stats.final_loss, "samples": stats.samples, "steps": stats.steps,
                        "tokens": stats.target_tokens, "seconds": seconds})
                result = UserResult(user_id, "trained", version=manifest.version, samples=stats.samples,
                                    tokens=stats.input_tokens, seconds=seconds, loss=stats.final_loss)
                trained.append(result)
            except Exception as exc:
                result = _failed(user_id, exc)
            self._finish(results, job.index, result)

        try:
            train_users_batched(
                self.model, self.tokenizer, encoded, peft_config, optim, self.cfg.seed, epochs=self.epochs,
                max_active_users=self.cfg.users.batched.max_active_users,
                tokens_per_forward=self.cfg.users.batched.tokens_per_forward,
                gradient_checkpointing=self.cfg.users.batched.gradient_checkpointing,
                on_user_done=publish)
        except Exception as exc:
            unfinished = [job for job in jobs.values() if results[job.index] is None]
            traceback.print_exc()
            if len(jobs) == 1:
                for job in unfinished:
                    self._finish(results, job.index, _failed(job.user.user_id, exc))
            else:
                for job in unfinished:  # one at a time: the user that breaks the pass fails alone
                    self._train_batched([job], results)
        for job in jobs.values():
            if results[job.index] is None:  # the pass returned without finishing this user
                self._finish(results, job.index, _failed(job.user.user_id, RuntimeError(
                    "batched training returned without this user's adapter")))
        # Report each user's share of the pass's wall time, by tokens, so that summed seconds
        # are the actor's busy time (as on the per-user path).
        wall = time.perf_counter() - started
        tokens = sum(r.tokens for r in trained)
        for result in trained:
            result.seconds = wall * result.tokens / tokens if tokens else wall / len(trained)
        if trained and wall > 0:
            self.metrics["tokens_per_s"].set(tokens / wall, tags=self._tags())

    def _lora_config(self):
        """The LoraConfig saved beside each adapter, as ``PeftModel.save_pretrained`` writes it."""
        peft_config = self.cfg.users.peft.to_peft_config(inference_mode=True)
        peft_config.base_model_name_or_path = getattr(self.model, "name_or_path", None)
        return peft_config

    def _finish(self, results: list[UserResult | None], index: int, result: UserResult) -> None:
        results[index] = result
        tags = self._tags()
        if result.status == "failed":
            self.metrics["failed"].inc(1, tags=tags)
        else:
            self.metrics["done"].inc(1, tags=tags)
        if result.status == "trained" and result.seconds > 0 and self.trainer != "batched":
            self.metrics["tokens_per_s"].set(result.tokens / result.seconds, tags=tags)

    def _tags(self) -> dict:
        return {"task": self.task.name, "variant": self.variant}


def _start_failed(batch: dict, error: str, **_) -> dict:
    """The results of a batch handed to an actor that could not start (``guard_start``)."""
    results = [UserResult(str(u), "failed", error=error[:2000]) for u in batch["user_id"]]
    return {name: [getattr(r, name) for r in results] for name in RESULT_FIELDS}


def _failed(user_id, exc: BaseException) -> UserResult:
    traceback.print_exception(exc)
    return UserResult(str(user_id), "failed", error=f"{type(exc).__name__}: {exc}"[:2000])


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

    from oppu.actor_pools import guard_start, one_batch_per_actor, one_block_per_batch
    from oppu.data.dataset import users_parquet_path
    from oppu.ids import validate_user_id

    wanted = {validate_user_id(u) for u in cfg.users.users} if cfg.users.users else None
    users = ray.data.read_parquet(users_parquet_path(cfg.data_uri))
    users = users.filter(lambda row: row["role"] == "test" and (wanted is None or row["user_id"] in wanted))
    # Materialised before the actor pool starts: on a small cluster the pool's actors would
    # otherwise hold every CPU while the read and sort wait for one.
    # Sorted, each batch below is a run of consecutive users in that order: similar history
    # lengths on one actor, the longest first.
    users = one_block_per_batch(users.sort("n_history", descending=True), cfg.users.users_per_batch)
    expected = [str(row["user_id"]) for row in users.select_columns(["user_id"]).take_all()]
    batches = -(-len(expected) // cfg.users.users_per_batch)
    results_ds = users.map_batches(
        guard_start(PersonalTrainer, _start_failed),  # an actor that cannot start fails its batches
        fn_constructor_kwargs={"config": asdict(cfg), "variant": variant},
        batch_size=cfg.users.users_per_batch,
        compute=one_batch_per_actor(cfg.users.actors),
        num_cpus=cfg.users.num_cpus_per_actor,
        num_gpus=cfg.users.num_gpus_per_actor or None,
        # An actor that dies is restarted (Ray Data's default max_restarts=-1; it loads the base
        # again) and its batch re-run up to max_retries times; users it had published by then
        # are skipped as already present.
        max_task_retries=cfg.users.max_retries,
        batch_format="numpy",
    )
    # A batch that failed every retry costs its users, not the job: they are reported as failed.
    results_ds.context.max_errored_blocks = batches
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
    seen = {r.user_id for r in results}
    for user_id in expected:
        if user_id not in seen:
            results.append(UserResult(user_id, "failed", error=(
                f"its batch failed {cfg.users.max_retries + 1} times (the actor died; see the Ray "
                "logs); adapters it published survive, a re-run trains the rest")))
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

