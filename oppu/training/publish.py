"""A trained personal adapter into the store: the one way every trainer publishes a user.

The Ray Data actor (``oppu.training.users_actor``, either trainer) and the in-process analyses
(``oppu.analysis.personal_inprocess``) all build an :class:`AdapterPublisher` for a run's variant
with :meth:`AdapterPublisher.for_run` and publish through it, so every manifest carries the same
train config (what ``find`` hashes to skip a re-run), data hash and span, PEFT method, and the
same metrics (``TrainStats.metrics``).

It is also where ``users.peft`` becomes PEFT's config, once (``AdapterPublisher.peft_config``):
both trainers are handed that object and neither re-reads the settings, so the rank, alpha,
dropout and target modules a user's adapter is trained and saved with are the ones hashed into
its train config (docs/internals.md, "The LoRA rank's path").
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from oppu.errors import UserErasedError
from oppu.run_config import RunConfig, parse_variant

if TYPE_CHECKING:
    from peft import PeftConfig

    from oppu.data.records import UserData
    from oppu.store import AdapterKey, AdapterStore, Manifest
    from oppu.tasks.base import TrainingSample
    from oppu.training.personal import TrainStats


def adapter_train_config(cfg: RunConfig, variant: str, epochs: int, trainer: str = "per-user",
                         prompt_format: str = "plain") -> dict:
    """What makes two adapters of one user the same training (the store hashes it for ``find``).

    ``trainer`` is recorded only when it is not ``per-user``, ``users.quantize`` only when it is
    not ``none``, and ``prompt_format`` (which the manifest carries to serving, see
    ``oppu.models.prompting``) only when it is not ``plain``, so older manifests keep their hash: batched training gives the same adapter up to floating-point
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
    if cfg.users.quantize != "none":
        config["quantize"] = cfg.users.quantize
    if prompt_format != "plain":
        config["prompt_format"] = prompt_format
    return config


@dataclass
class AdapterPublisher:
    """How one variant's personal adapters of a run are trained, and where they are published."""

    cfg: RunConfig
    store: AdapterStore
    task: str
    base_fingerprint: str
    variant: str
    epochs: int
    prompt_format: str
    train_config: dict
    peft_config: PeftConfig  # users.peft as PEFT's config, the one both trainers are handed
    config_hash: str = field(init=False)

    def __post_init__(self) -> None:
        from oppu.store import config_hash

        self.config_hash = config_hash(self.train_config)

    @classmethod
    def for_run(cls, cfg: RunConfig, variant: str, base_fingerprint: str, prompt_format: str, *,
                trainer: str = "per-user", extra_config: dict | None = None) -> AdapterPublisher:
        """The publisher of ``variant`` for ``cfg``; ``extra_config`` (an ablation's setting) joins the train config."""
        from oppu.store import AdapterStore
        from oppu.tasks import get_task

        task = get_task(cfg.task)
        epochs = cfg.users.optim.epochs or task.default_epochs
        train_config = {**adapter_train_config(cfg, variant, epochs, trainer, prompt_format), **(extra_config or {})}
        store = AdapterStore(cfg.store_uri, keep_versions=cfg.users.keep_versions)
        return cls(cfg, store, task.name, base_fingerprint, variant, epochs, prompt_format, train_config,
                   cfg.users.peft.to_peft_config())

    def key(self, user_id: str) -> AdapterKey:
        from oppu.store import AdapterKey

        return AdapterKey(self.task, self.base_fingerprint, self.variant, user_id)

    def existing(self, user: UserData) -> Manifest | None:
        """The user's adapter for the same data and train config, if the store holds one."""
        from oppu.data.dataset import dataset_fingerprint

        return self.store.find(self.key(user.user_id), dataset_fingerprint(user), self.config_hash)

    def publish(self, user: UserData, adapter_dir: str | Path, stats: TrainStats) -> Manifest:
        """Publish the PEFT adapter directory ``adapter_dir`` as a new version of the user's adapter."""
        from oppu.data.dataset import dataset_fingerprint, history_span
        from oppu.erasure import is_tombstoned

        if is_tombstoned(self.store.root_uri, user.user_id):
            raise UserErasedError(f"user {user.user_id!r} was erased (oppu users delete): not published; "
                                  "`oppu users restore` lifts that")
        manifest = self.store.publish(self.key(user.user_id), adapter_dir, data_hash=dataset_fingerprint(user),
                                      config=self.train_config, peft_method=self.cfg.users.peft.method,
                                      data_span=history_span(user), metrics=stats.metrics())
        if is_tombstoned(self.store.root_uri, user.user_id):  # erased while this version was written
            self.store.delete_user(user.user_id)
            raise UserErasedError(f"user {user.user_id!r} was erased while their adapter was published: "
                                  "the version was removed again")
        return manifest

    def publish_state(self, user: UserData, state_dict: dict, stats: TrainStats,
                      base_model_name_or_path: str | None) -> Manifest:
        """Publish an adapter given as its PEFT state dict (what the batched trainer hands over), saved
        beside ``peft_config`` as ``PeftModel.save_pretrained`` would save it over the named base."""
        from oppu.models.peft_adapters import write_peft_adapter

        with tempfile.TemporaryDirectory(prefix="oppu-adapter-") as out_dir:
            adapter_dir = write_peft_adapter(out_dir, state_dict, self.peft_config, base_model_name_or_path)
            return self.publish(user, adapter_dir, stats)

    def train_and_publish(self, model, tokenizer, user: UserData,
                          samples: list[TrainingSample]) -> tuple[Manifest, TrainStats]:
        """Train the user's adapter alone (``oppu.training.personal``) on ``samples`` and publish it."""
        from oppu.training.personal import train_user_adapter

        with tempfile.TemporaryDirectory(prefix="oppu-adapter-") as out_dir:
            stats = train_user_adapter(model, tokenizer, samples, self.peft_config, self.cfg.users.optim, self.epochs,
                                       self.cfg.seed, user.user_id, out_dir, self.prompt_format)
            return self.publish(user, out_dir, stats), stats
