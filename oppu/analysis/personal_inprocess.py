"""Personal adapters from custom samples, trained in this process and published to a store.

The ablations that change what a history item *teaches* (history format, synthetic cost
sweeps) cannot be expressed as a data set the Ray Data job reads, so they train here, one user
at a time, through the train_users job's own publish path (``oppu.training.publish``: the same
``train_user_adapter``, variant, data hash, config hash and metrics), so the evaluation job picks
them up unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from oppu.data.records import UserData
from oppu.run_config import RunConfig
from oppu.tasks.base import TrainingSample
from oppu.training.personal import TrainStats

logger = logging.getLogger(__name__)


def train_and_publish(cfg: RunConfig, users: list[UserData],
                      samples_of: Callable[[UserData], list[TrainingSample]], variant: str,
                      extra_config: dict, log=None) -> dict[str, TrainStats]:
    """Train ``variant`` for each user on ``samples_of(user)`` over the plain base; publish each."""
    from oppu.models import base_fingerprint, load_model
    from oppu.models.prompting import resolve_prompt_format
    from oppu.training.publish import AdapterPublisher

    log = log or logger.info

    base_uri = cfg.base_uri("plain")
    model, tokenizer = load_model(base_uri, quantize=cfg.users.quantize)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    publisher = AdapterPublisher.for_run(cfg, variant, base_fingerprint(base_uri),
                                         resolve_prompt_format(cfg.prompt_format, tokenizer),
                                         extra_config=extra_config)
    stats = {}
    for user in users:
        _, trained = publisher.train_and_publish(model, tokenizer, user, samples_of(user))
        stats[user.user_id] = trained
        log(f"[analysis] {variant} {extra_config}: {user.user_id} trained in {trained.seconds:.1f}s "
            f"(loss {trained.final_loss:.3f})")
    return stats
