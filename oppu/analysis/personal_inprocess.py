"""Personal adapters from custom samples, trained in this process and published to a store.

The ablations that change what a history item *teaches* (history format, synthetic cost
sweeps) cannot be expressed as a data set the Ray Data job reads, so they train here, one user
at a time with the same ``train_user_adapter`` and publish with the same store contract
(variant, data hash, config hash), so the evaluation job picks them up unchanged.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable

from oppu.data.records import UserData
from oppu.run_config import RunConfig
from oppu.tasks.base import TrainingSample
from oppu.training.personal import TrainStats


def train_and_publish(cfg: RunConfig, users: list[UserData],
                      samples_of: Callable[[UserData], list[TrainingSample]], variant: str,
                      extra_config: dict, log=print) -> dict[str, TrainStats]:
    """Train ``variant`` for each user on ``samples_of(user)`` over the plain base; publish each."""
    from oppu.data.dataset import dataset_fingerprint, history_span
    from oppu.models import base_fingerprint, load_model
    from oppu.models.prompting import resolve_prompt_format
    from oppu.store import AdapterKey, AdapterStore
    from oppu.tasks import get_task
    from oppu.training.personal import train_user_adapter
    from oppu.training.users import adapter_train_config

    task = get_task(cfg.task)
    base_uri = cfg.base_uri("plain")
    model, tokenizer = load_model(base_uri)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    fingerprint = base_fingerprint(base_uri)
    prompt_format = resolve_prompt_format(cfg.prompt_format, tokenizer)
    store = AdapterStore(cfg.store_uri)
    epochs = cfg.users.optim.epochs or task.default_epochs
    train_config = {**adapter_train_config(cfg, variant, epochs, prompt_format=prompt_format),
                    **extra_config}
    stats = {}
    for user in users:
        with tempfile.TemporaryDirectory(prefix="oppu-analysis-") as out_dir:
            stats[user.user_id] = result = train_user_adapter(
                model, tokenizer, samples_of(user), cfg.users.peft, cfg.users.optim, epochs, cfg.seed,
                user.user_id, out_dir, prompt_format)
            store.publish(AdapterKey(task.name, fingerprint, variant, user.user_id), out_dir,
                          data_hash=dataset_fingerprint(user), config=train_config,
                          peft_method=cfg.users.peft.method, data_span=history_span(user),
                          metrics={"final_loss": result.final_loss, "samples": result.samples,
                                   "seconds": result.seconds})
        log(f"[analysis] {variant} {extra_config}: {user.user_id} trained in {result.seconds:.1f}s "
            f"(loss {result.final_loss:.3f})")
    return stats
