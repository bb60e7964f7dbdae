"""The run configuration every job reads: one YAML file, sections per stage, ``--set`` overrides.

``task``, ``run_dir`` and ``model`` say what to run and where; each stage has its own section.
A run directory (local path or ``s3://...``) holds ``data/`` (prepared Parquet), ``base/`` and
``base-<flavour>/`` (task-adapted merged base models; a base upgrade's new ones under
``bases/<name>/``, see ``RunConfig.bases``), ``adapters/`` (the adapter store root),
``predictions/``, ``metrics.json`` and ``metrics.md``.

By concern: ``run`` (``RunConfig``, and a run dir's own ``config.yaml``), ``stages`` (each stage's
settings) and ``names`` (the one grammar of the names a run config holds: base flavours, adapter
variants, evaluation methods; ``parse_name`` over the ``NameKind`` table). Import from here.
"""

from oppu.run_config.names import (
    ADAPTER_VARIANT,
    BASE_FLAVOUR,
    METHOD,
    NameKind,
    PromptShape,
    parse_flavour,
    parse_name,
    parse_variant,
)
from oppu.run_config.run import RUN_CONFIG_FILE, RunConfig, read_run_config_file
from oppu.run_config.stages import (
    BASE_PRECISIONS,
    BasePrecision,
    BaseStage,
    BatchedSettings,
    EvalStage,
    IncrementalSettings,
    OptimSettings,
    PeftMethod,
    PeftSettings,
    ProfileSettings,
    RaySettings,
    UserStage,
    check_base_precision,
)

__all__ = [
    "ADAPTER_VARIANT", "BASE_FLAVOUR", "BASE_PRECISIONS", "METHOD", "RUN_CONFIG_FILE", "BasePrecision", "BaseStage",
    "BatchedSettings", "EvalStage", "IncrementalSettings", "NameKind", "OptimSettings", "PeftMethod", "PeftSettings",
    "ProfileSettings", "PromptShape", "RaySettings", "RunConfig", "UserStage", "check_base_precision",
    "parse_flavour", "parse_name", "parse_variant", "read_run_config_file",
]
