"""OPPU: One PEFT Per User — personal parameter-efficient adapters trained and served on Ray.

Heavy dependencies (torch, transformers, ray) are imported inside the functions that need them,
so ``import oppu`` and the pure-Python parts (tasks, metrics, data validation) stay fast.
"""

import os as _os

__version__ = "0.1.0"

if _os.environ.get("OPPU_LOG_LEVEL"):  # a Ray worker (or child) of a configured driver: see oppu.logs
    from oppu import logs as _logs

    if _logs.configured_level() is None:
        _logs.configure()
