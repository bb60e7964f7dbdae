"""A job's inputs, checked on the driver before Ray or any actor starts.

Each stage reads what an earlier stage or command wrote into the run directory:

| stage (job) | reads | made by |
| --- | --- | --- |
| ``base`` (jobs/train_base.py) | the data set; ``model`` when it is a path | ``oppu prepare`` |
| ``users`` (jobs/train_users.py) | the data set; the base of every variant's flavour; profiles for ``pag+oppu`` | ``jobs/train_base.py``, ``oppu profiles`` |
| ``evaluate`` (jobs/evaluate.py) | the data set; the base of every method's flavour; profiles for the PAG methods | likewise |

A job that runs several stages (jobs/pipeline.py, ``oppu quickstart``) does not need what its
own earlier stages write: ``base`` makes the bases of ``base.flavours`` (and, for the
``profile`` flavour, the profiles). Anything else missing stops the job in the driver with one
line naming each missing input, where it was looked for and the command that makes it (a
``ConfigError``: exit status 2), instead of every actor of the pool dying in its constructor.

Not checked: the personal adapters ``evaluate`` plugs in (a user without one fails that
user's method only, as before), and a ``model`` given as a Hugging Face hub id.
"""

from __future__ import annotations

from dataclasses import dataclass

from oppu import fsutil
from oppu.errors import ConfigError
from oppu.run_config import RunConfig, parse_flavour, parse_variant

JOB_NAMES = {"base": "train_base", "users": "train_users", "evaluate": "evaluate"}


@dataclass(frozen=True)
class Input:
    """One input of a job: what it is, the file whose presence proves it, how to make it."""

    what: str
    uri: str  # the directory or file a user would look for
    probe: str  # the file that must exist
    make: str  # the command that makes it


class MissingInputError(ConfigError):
    """Inputs a job needs are not there; the message is one line naming each and its command."""

    def __init__(self, job: str, missing: list[Input]):
        self.job, self.missing = job, missing
        parts = [f"{i.what} at {i.uri} (make it with {i.make})" for i in missing]
        super().__init__(f"{job} cannot start, missing input{'s' if len(missing) > 1 else ''}: "
                         + "; ".join(parts))


def required_inputs(cfg: RunConfig, stages: list[str]) -> list[Input]:
    """Every input the ``stages`` of one job read and no earlier stage of that job writes."""
    inputs: list[Input] = [_dataset(cfg)]
    made_flavours = set(cfg.base.flavours) if "base" in stages else set()
    if "base" in stages and cfg.model != "tiny":
        model = _model(cfg.model)
        if model is not None:
            inputs.append(model)
    needs: dict[str, list[str]] = {}  # flavour -> the variants / methods that need it
    profile_users: list[str] = []
    if "users" in stages:
        for variant in cfg.users.variants:
            needs.setdefault(cfg.variant_base(variant), []).append(f"variant {variant}")
            if parse_variant(variant)[0]:
                profile_users.append(f"variant {variant}")
    if "evaluate" in stages:
        from oppu.evaluation.methods import resolve_method

        for name in cfg.eval.methods:
            method = resolve_method(name)
            needs.setdefault(method.base_flavour(cfg), []).append(f"method {name}")
            if method.profile:
                profile_users.append(f"method {name}")
    for flavour, users in needs.items():
        if flavour not in made_flavours:
            inputs.append(_base(cfg, flavour, users))
    if profile_users and not any(parse_flavour(f, cfg.base.rag_k)[0] for f in made_flavours):
        inputs.append(_profiles(cfg, profile_users))
    return inputs


def missing_inputs(cfg: RunConfig, stages: list[str]) -> list[Input]:
    return [i for i in required_inputs(cfg, stages) if not fsutil.exists(i.probe)]


def check_inputs(cfg: RunConfig, stages: list[str]) -> None:
    """Raise ``MissingInputError`` (one line) when an input of the job ``stages`` is missing."""
    missing = missing_inputs(cfg, stages)
    if missing:
        job = "pipeline" if len(stages) > 1 else JOB_NAMES.get(stages[0], stages[0])
        raise MissingInputError(job, missing)


def _publish_hint(cfg: RunConfig) -> str:
    if not fsutil.is_remote(cfg.run_dir):
        return ""
    return f", or make it in a local run dir and `oppu publish --run LOCAL --to {cfg.run_dir}`"


def _dataset(cfg: RunConfig) -> Input:
    from oppu.data.dataset import dataset_json_path

    return Input("the data set", cfg.data_uri, dataset_json_path(cfg.data_uri),
                 f"`oppu prepare --task {cfg.task} --questions Q.json --outputs O.json "
                 f"--out {cfg.data_uri}`" + _publish_hint(cfg))


def _model(model: str) -> Input | None:
    from oppu.models.loading import is_hub_id
    from oppu.models.sources import NAMED_MODELS, is_gguf

    if is_hub_id(model):
        return None  # looked up on the hub (or its cache) when loaded
    if model in NAMED_MODELS:
        named = NAMED_MODELS[model]
        return Input(f"the named model {model!r}", named.package, _installed_file(named), f"`{named.install}`")
    if is_gguf(model):
        return Input("the GGUF model to adapt (model)", model, model.removeprefix("file://"),
                     "a .gguf file at that path")
    return Input("the model to adapt (model)", model, fsutil.join(model, "config.json"),
                 "a Hugging Face model directory (config.json, tokenizer, weights) at that path")


def _installed_file(named) -> str:
    """The named model's file where its package is installed, else a path that does not exist."""
    from oppu.errors import OppuError
    from oppu.models.sources import named_model_file

    try:
        return str(named_model_file(named.name))
    except OppuError:
        return f"/nonexistent/{named.package}/{named.file}"


def _base(cfg: RunConfig, flavour: str, users: list[str]) -> Input:
    flavours = ",".join(sorted({*cfg.base.flavours, flavour}))
    uri = cfg.base_uri(flavour)
    return Input(f"the {flavour!r} base (for {', '.join(users)})", uri, fsutil.join(uri, "config.json"),
                 f"`python jobs/train_base.py --config CONFIG --set run_dir={cfg.run_dir} "
                 + (f"--set bases={cfg.bases} " if cfg.bases else "")
                 + f"--set base.flavours=[{flavours}]`" + _publish_hint(cfg))


def _profiles(cfg: RunConfig, users: list[str]) -> Input:
    from oppu.profiles import profiles_uri

    uri = profiles_uri(cfg.data_uri, cfg.profiles.writer)
    return Input(f"the {cfg.profiles.writer} profiles (for {', '.join(users)})", uri, uri,
                 f"`oppu profiles --run {cfg.run_dir} --writer {cfg.profiles.writer}`")
