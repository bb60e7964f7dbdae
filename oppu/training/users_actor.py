"""The Ray Data actor of the train_users job: one base model, many users' personal adapters.

An actor is handed a batch of users (``oppu.training.users`` says how they are grouped). It
skips a user whose adapter for the same data and config the store holds, trains the rest with
``users.trainer`` (``per-user``: one after another, ``oppu.training.personal``; ``batched``:
together, ``oppu.training.batched``) and publishes each adapter the moment it is done, through
the one publish path (``oppu.training.publish``). A user whose data or training fails is
reported as failed; the others go on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from oppu.run_config import RunConfig, parse_variant
from oppu.training.users_report import UserResult, result_columns

logger = logging.getLogger(__name__)


@dataclass
class _Pending:
    """A user to train: its place in the batch and its samples."""

    index: int
    user: object  # UserData
    samples: list


class PersonalTrainer:
    """Ray Data actor: holds one base model and trains the personal adapters of many users."""

    def __init__(self, cfg: RunConfig, variant: str):
        import torch

        from oppu.models import base_fingerprint, load_model
        from oppu.models.fp8 import set_base_precision
        from oppu.models.kernels import use_kernels
        from oppu.models.prompting import resolve_prompt_format
        from oppu.tasks import get_task
        from oppu.training.publish import AdapterPublisher

        self.cfg = cfg
        self.variant = variant
        uses_profile, self.k = parse_variant(variant)
        self.task = get_task(self.cfg.task)
        base_uri = self.cfg.base_uri(self.cfg.variant_base(variant))
        device = "cuda" if self.cfg.users.num_gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
        self.model, self.tokenizer = load_model(base_uri, device=device, quantize=self.cfg.users.quantize)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        # Once per base load: the FP8 weights serve every user this actor trains, either trainer.
        set_base_precision(self.model, self.cfg.users.base_precision)
        use_kernels(self.model, self.cfg.users.kernels)
        self.fingerprint = base_fingerprint(base_uri)
        self.trainer = self.cfg.users.trainer
        self.publisher = AdapterPublisher.for_run(
            self.cfg, variant, self.fingerprint, resolve_prompt_format(self.cfg.prompt_format, self.tokenizer),
            trainer=self.trainer)
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
        return result_columns(results)

    def _prepare(self, index: int, row: dict) -> UserResult | _Pending:
        """A skip result when the store holds this user's adapter already, else the user's samples."""
        from oppu.data.records import UserData
        from oppu.training.samples import personal_samples

        user = UserData.from_row(row)
        if self.cfg.users.skip_existing:
            existing = self.publisher.existing(user)
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
        return _Pending(index, user, samples)

    def _train_alone(self, job: _Pending) -> UserResult:
        manifest, stats = self.publisher.train_and_publish(self.model, self.tokenizer, job.user, job.samples)
        return UserResult(job.user.user_id, "trained", version=manifest.version, samples=stats.samples,
                          tokens=stats.input_tokens, seconds=stats.seconds, loss=stats.final_loss)

    def _train_batched(self, pending: list[_Pending], results: list[UserResult | None]) -> None:
        """Train ``pending`` together (``train_users_batched``), publishing each user as it finishes.

        A user whose samples cannot be encoded fails alone, as does one whose loss, gradients or
        weights stop being finite (``on_user_failed``: never published, the others' adapters
        unaffected, see ``oppu.training.batched``). Should the batched pass itself raise,
        the users it had not finished are retried one by one, so a bad user fails only itself.
        """
        from oppu.models.samples import encode_samples
        from oppu.training.batched import train_users_batched

        optim = self.cfg.users.optim
        jobs: dict[str, _Pending] = {}
        encoded: list[tuple[str, list[dict]]] = []
        for job in pending:
            try:
                encoded.append((job.user.user_id, encode_samples(
                    self.tokenizer, job.samples, optim.max_length, self.publisher.prompt_format)))
                jobs[job.user.user_id] = job
            except Exception as exc:
                self._finish(results, job.index, _failed(job.user.user_id, exc))
        if not encoded:
            return
        started = time.perf_counter()
        trained: list[UserResult] = []

        def publish(user_id: str, state: dict, stats) -> None:
            job = jobs[user_id]
            try:
                manifest = self.publisher.publish_state(job.user, state, stats, self.model.name_or_path)
                result = UserResult(user_id, "trained", version=manifest.version, samples=stats.samples,
                                    tokens=stats.input_tokens, seconds=stats.seconds, loss=stats.final_loss)
                trained.append(result)
            except Exception as exc:
                result = _failed(user_id, exc)
            self._finish(results, job.index, result)

        def diverged(user_id: str, error: Exception) -> None:
            self._finish(results, jobs[user_id].index, _failed(user_id, error))

        try:
            train_users_batched(
                self.model, self.tokenizer, encoded, self.publisher.peft_config, optim, self.cfg.seed,
                epochs=self.publisher.epochs, max_active_users=self.cfg.users.batched.max_active_users,
                tokens_per_forward=self.cfg.users.batched.tokens_per_forward,
                gradient_checkpointing=self.cfg.users.batched.gradient_checkpointing,
                on_user_done=publish, on_user_failed=diverged)
        except Exception as exc:
            unfinished = [job for job in jobs.values() if results[job.index] is None]
            logger.exception("the batched pass over %d users failed", len(jobs))
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


def start_failed(batch: dict, error: str, **_) -> dict:
    """The results of a batch handed to an actor that could not start (``guard_start``)."""
    return result_columns([UserResult(str(u), "failed", error=error[:2000]) for u in batch["user_id"]])


def _failed(user_id, exc: BaseException) -> UserResult:
    logger.error("user %s failed", user_id, exc_info=exc)
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
