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

With ``users.update: incremental`` it also decides, per user, whether training continues the
user's current adapter (``update_plan``: the version served was trained on a prefix of the
user's history, with the same PEFT shape and prompt format, and items came after it) on the new
items plus a seeded replay sample of older ones, or starts from scratch. An incremental version
records the train config plus ``update``, ``update_epochs`` and ``replay_ratio`` (so a re-run
skips it as it skips any other), and in its ``data_span`` the whole history it now covers plus
``update``: the version it continued and the items it was trained on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
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

logger = logging.getLogger(__name__)


def adapter_train_config(cfg: RunConfig, variant: str, epochs: int, trainer: str = "per-user",
                         prompt_format: str = "plain") -> dict:
    """What makes two adapters of one user the same training (the store hashes it for ``find``).

    ``trainer`` is recorded only when it is not ``per-user``, ``users.quantize`` only when it is
    not ``none``, ``users.base_precision`` only when it is not ``bf16``, ``users.kernels`` only
    when it is not ``torch``, and ``prompt_format``
    (which the manifest carries to serving, see
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
    if cfg.users.base_precision != "bf16":
        config["base_precision"] = cfg.users.base_precision
    if cfg.users.kernels != "torch":
        config["kernels"] = cfg.users.kernels
    if prompt_format != "plain":
        config["prompt_format"] = prompt_format
    return config


def replay_positions(n_old: int, n_new: int, ratio: float, seed: int, user_id: str, parent_version: str) -> list[int]:
    """Positions (ascending) of the old items replayed in an incremental update: ``round(ratio *
    n_new)`` of the first ``n_old`` items (at most all), drawn without replacement by a generator
    seeded from (``seed``, ``user_id``, ``parent_version``) alone."""
    digest = hashlib.sha256(f"{seed}:{user_id}:{parent_version}".encode()).digest()
    count = min(n_old, round(ratio * n_new))
    return sorted(random.Random(int.from_bytes(digest[:8], "little")).sample(range(n_old), count))


@dataclass(frozen=True)
class UpdatePlan:
    """An incremental update: the current version it continues and the history positions it trains on."""

    parent: Manifest
    n_old: int  # the first n_old history items are what ``parent`` was trained on
    new: list[int]  # positions of the items after them
    replay: list[int]  # positions of the replayed sample of old items
    epochs: int

    @property
    def positions(self) -> list[int]:
        return [*self.replay, *self.new]

    def record(self, user: UserData) -> dict:
        """What the new version's ``data_span["update"]`` says it was trained on."""
        return {"parent": self.parent.version, "parent_items": self.n_old, "new_items": len(self.new),
                "first_new_item_id": user.history[self.new[0]].id, "last_new_item_id": user.history[self.new[-1]].id,
                "replay_items": len(self.replay), "replay_item_ids": [user.history[i].id for i in self.replay],
                "epochs": self.epochs}


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
    # the train config an incremental version records (users.update=incremental), else None
    update_config: dict | None = None
    config_hash: str = field(init=False)
    update_config_hash: str | None = field(init=False)

    def __post_init__(self) -> None:
        from oppu.store import config_hash

        self.config_hash = config_hash(self.train_config)
        self.update_config_hash = config_hash(self.update_config) if self.update_config is not None else None

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
        update_config = None
        if cfg.users.update == "incremental":
            update_config = {**train_config, "update": "incremental",
                             "update_epochs": cfg.users.incremental.epochs or epochs,
                             "replay_ratio": cfg.users.incremental.replay_ratio}
        return cls(cfg, store, task.name, base_fingerprint, variant, epochs, prompt_format, train_config,
                   cfg.users.peft.to_peft_config(), update_config)

    def key(self, user_id: str) -> AdapterKey:
        from oppu.store import AdapterKey

        return AdapterKey(self.task, self.base_fingerprint, self.variant, user_id)

    def existing(self, user: UserData) -> Manifest | None:
        """The user's adapter for the same data and train config, if the store holds one."""
        from oppu.data.dataset import dataset_fingerprint

        key, data_hash = self.key(user.user_id), dataset_fingerprint(user)
        found = self.store.find(key, data_hash, self.config_hash)
        if found is None and self.update_config_hash is not None:  # an incremental update of this data
            found = self.store.find(key, data_hash, self.update_config_hash)
        return found

    def update_plan(self, user: UserData) -> UpdatePlan | None:
        """The incremental update of the user's current adapter, or None: train from scratch.

        None unless ``users.update`` is ``incremental`` and the current version (the one served)
        was trained with this run's PEFT settings and prompt format on exactly the first items of
        the user's history (its ``data_span["n_items"]`` leading items hash to its ``data_hash``),
        and items came after them.
        """
        from oppu.data.dataset import dataset_fingerprint

        if self.update_config is None:
            return None
        parent = self.store.latest(self.key(user.user_id))
        if parent is None:
            return None
        n_old = parent.data_span.get("n_items")
        why_not = None
        if parent.train_config.get("peft") != asdict(self.cfg.users.peft) or parent.prompt_format != self.prompt_format:
            why_not = "its PEFT settings or prompt format differ from this run's"
        elif not isinstance(n_old, int) or not 0 < n_old <= len(user.history) or dataset_fingerprint(
                dataclasses.replace(user, history=user.history[:n_old])) != parent.data_hash:
            why_not = "the history it was trained on is no longer the start of the user's history"
        elif n_old == len(user.history):
            why_not = "no history items came after it"
        if why_not is not None:
            logger.info("user %s: trained from scratch, not continuing version %s: %s", user.user_id,
                        parent.version, why_not)
            return None
        n_new = len(user.history) - n_old
        replay = replay_positions(n_old, n_new, self.cfg.users.incremental.replay_ratio, self.cfg.seed,
                                  user.user_id, parent.version)
        return UpdatePlan(parent, n_old, list(range(n_old, len(user.history))), replay,
                          self.update_config["update_epochs"])

    def publish(self, user: UserData, adapter_dir: str | Path, stats: TrainStats,
                plan: UpdatePlan | None = None) -> Manifest:
        """Publish the PEFT adapter directory ``adapter_dir`` as a new version of the user's adapter
        (an incremental update of ``plan.parent`` where ``plan`` is given)."""
        from oppu.data.dataset import dataset_fingerprint, history_span
        from oppu.erasure import is_tombstoned

        if is_tombstoned(self.store.root_uri, user.user_id):
            raise UserErasedError(f"user {user.user_id!r} was erased (oppu users delete): not published; "
                                  "`oppu users restore` lifts that")
        span = history_span(user)
        if plan is not None:
            span["update"] = plan.record(user)
        manifest = self.store.publish(self.key(user.user_id), adapter_dir, data_hash=dataset_fingerprint(user),
                                      config=self.train_config if plan is None else self.update_config,
                                      peft_method=self.cfg.users.peft.method, data_span=span,
                                      metrics=stats.metrics())
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
        """Train the user's adapter alone (``oppu.training.personal``) on ``samples`` and publish it.

        Where ``update_plan`` gives an incremental update, ``samples`` (one per history item, in
        history order) are cut to the plan's items and training continues the current version.
        """
        from oppu.training.personal import train_user_adapter

        plan = self.update_plan(user)
        if plan is not None and len(samples) != len(user.history):
            raise ValueError(f"user {user.user_id!r}: an incremental update needs one sample per history item "
                             f"({len(user.history)}), got {len(samples)}")
        with tempfile.TemporaryDirectory(prefix="oppu-adapter-") as tmp:
            out_dir, init_adapter, epochs = Path(tmp) / "adapter", None, self.epochs
            if plan is not None:
                init_adapter = self.store.fetch(self.key(user.user_id), Path(tmp) / "parent", version=plan.parent.version)
                samples, epochs = [samples[i] for i in plan.positions], plan.epochs
                logger.info("user %s: continuing version %s on %d new and %d replayed items", user.user_id,
                            plan.parent.version, len(plan.new), len(plan.replay))
            stats = train_user_adapter(model, tokenizer, samples, self.peft_config, self.cfg.users.optim, epochs,
                                       self.cfg.seed, user.user_id, out_dir, self.prompt_format,
                                       init_adapter=init_adapter)
            return self.publish(user, out_dir, stats, plan), stats
