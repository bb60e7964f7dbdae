"""Synthetic LaMP-format data with planted per-user preferences and known reference scores.

``generate(task, n_users, seed, out_dir, n_test)`` writes the official files (``questions.json``,
``outputs.json``) and ``reference.json``. Each task's generative process is a *world*
(``classification``, ``rating``, ...) over the closed vocabulary in ``vocabulary``.
"""

from oppu.data.synth.generator import SYNTHETIC_TASKS, ActivitySettings, SynthPaths, generate

__all__ = ["SYNTHETIC_TASKS", "ActivitySettings", "SynthPaths", "generate"]
