"""The run config itself: what to run and where (``task``, ``run_dir``, ``model``, ...), every
stage's settings (``oppu.run_config.stages``), where the bases and the adapters are; and a run
dir's own run config file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from oppu import fsutil
from oppu.errors import ConfigError
from oppu.models.prompting import PromptFormatSetting
from oppu.models.tiny import TinyModelConfig
from oppu.run_config.names import parse_variant
from oppu.run_config.stages import BaseStage, EvalStage, ProfileSettings, RaySettings, UserStage

RUN_CONFIG_FILE = "config.yaml"  # a run dir's own run config (oppu quickstart writes it)


def read_run_config_file(run_dir: str) -> tuple[str, dict | None]:
    """The URI of ``run_dir``'s own run config and its mapping (None where the run has none);
    ``ConfigError`` where the file holds no mapping."""
    import yaml

    uri = fsutil.join(run_dir, RUN_CONFIG_FILE)
    if not fsutil.exists(uri):
        return uri, None
    data = yaml.safe_load(fsutil.read_text(uri)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{uri} must hold a mapping at the top level")
    return uri, data


@dataclass
class RunConfig:
    """Everything a run needs; ``oppu quickstart`` writes the one it used to ``run_dir/config.yaml``."""

    task: str = "LaMP-2M"
    run_dir: str = "oppu-run"  # local path or fsspec URI (s3://bucket/prefix)
    # "tiny" (built locally), a named model ("smollm2-135m-instruct"), a .gguf file, or a HF id /
    # local / s3:// path of a causal LM
    model: str = "tiny"
    # auto: the chat template's user turn where the tokenizer has one, else the plain prompt
    prompt_format: PromptFormatSetting = "auto"
    data: str | None = None  # prepared data set; default run_dir/data
    store: str | None = None  # adapter store root; default run_dir/adapters
    # where the task-adapted bases (base/, base-<flavour>/) and, for model: tiny, the pretrained
    # model are; default run_dir. A base upgrade adapts new bases into another folder
    # (run_dir/bases/<name>), moves the adapters onto them (oppu users migrate) and then points here
    bases: str | None = None
    seed: int = 0
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    base: BaseStage = field(default_factory=BaseStage)
    users: UserStage = field(default_factory=UserStage)
    eval: EvalStage = field(default_factory=EvalStage)
    profiles: ProfileSettings = field(default_factory=ProfileSettings)
    ray: RaySettings = field(default_factory=RaySettings)

    def __post_init__(self) -> None:
        from oppu.tasks import get_task

        self.task = get_task(self.task).name  # canonical spelling; unknown names fail here
        for variant in self.users.variants:
            parse_variant(variant)
        if self.bases and not fsutil.is_remote(self.bases):
            # Relative to where the command runs: Ray's workers run elsewhere, so make it absolute
            # (`--set bases=oppu-run/bases/v2` built the tiny model there, then the workers could not find it).
            self.bases = os.path.abspath(os.path.expanduser(self.bases))

    @property
    def data_uri(self) -> str:
        return self.data or fsutil.join(self.run_dir, "data")

    @property
    def store_uri(self) -> str:
        return self.store or fsutil.join(self.run_dir, "adapters")

    @property
    def bases_uri(self) -> str:
        """The folder of the run's bases: ``bases`` where set, else ``run_dir``."""
        return self.bases or self.run_dir

    def base_uri(self, flavour: str) -> str:
        """Where the merged base of a flavour lives: ``base`` for plain, ``base-<flavour>`` else,
        under ``bases_uri``."""
        return fsutil.join(self.bases_uri, "base" if flavour == "plain" else f"base-{flavour}")

    def base_flavour(self, profile: bool, k: int) -> str:
        """The configured base that answers prompts with (``profile``, ``k`` retrieved items).

        The base trained for exactly that prompt shape where ``base.flavours`` has it (``rag-k2``,
        ``profile+rag-k1``), as the paper trains one base per k; otherwise the shared one of its
        family (``rag``, trained at ``base.rag_k``; ``profile``, at k=0).
        """
        if k == 0:
            return "profile" if profile else "plain"
        exact = f"{'profile+' if profile else ''}rag-k{k}"
        if exact in self.base.flavours:
            return exact
        return "profile" if profile else "rag"

    def variant_base(self, variant: str) -> str:
        """The base flavour a personal-adapter variant trains on (and is evaluated over)."""
        profile, k = parse_variant(variant)
        return self.base_flavour(profile, k)

    @property
    def pretrained_uri(self) -> str:
        """The model the base adaptation starts from (the tiny model is built into ``bases_uri``, so a
        new tiny base set, e.g. with other ``tiny.*`` settings, is pretrained apart from the old)."""
        return fsutil.join(self.bases_uri, "pretrained") if self.model == "tiny" else self.model
