"""Plugging PEFT adapters in and out of a shared frozen base model."""

from __future__ import annotations


def remove_adapter(peft_model) -> None:
    """Take the adapter's layers out of the shared base (prompt tuning never put any in)."""
    from peft.tuners.tuners_utils import BaseTuner

    tuner = peft_model.base_model
    if isinstance(tuner, BaseTuner):
        tuner.unload()
