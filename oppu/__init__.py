"""OPPU: One PEFT Per User — personal parameter-efficient adapters trained and served on Ray.

Heavy dependencies (torch, transformers, ray) are imported inside the functions that need them,
so ``import oppu`` and the pure-Python parts (tasks, metrics, data validation) stay fast.
"""

__version__ = "0.1.0"
