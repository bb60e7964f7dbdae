"""The per-user LoRA rank's path (docs/internals.md, "The LoRA rank's path"): which library modules
open what carries ``users.peft.r``, and that the configured shape is the stored adapter's.

The module checks parse the source (no import): a module opens the rank where it reads one of
the LoRA's shape fields, or the settings holding them, by attribute name. A new reader, or the
run config's dict round trip coming back into an actor, fails here until the doc's list says why.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from tests.unit.tiny_models import build_movie_tag_base, movie_user, one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[3]
OPPU = ROOT / "oppu"

# Attribute names under which the LoRA's shape (or the settings holding it) is read.
RANK_FIELDS = frozenset({"peft", "to_peft_config", "r", "alpha", "lora_alpha", "dropout", "lora_dropout",
                         "target_modules", "use_rslora", "rank"})

# The doc's "after" list but oppu/config.py, which turns YAML into dataclasses by field type and
# names no field.
THE_PATH = frozenset({"run_config/stages.py", "training/publish.py", "models/multi_lora.py", "training/slots.py",
                      "models/slot_export.py"})

# Modules that read such fields for something other than a user's adapter on its way to the store.
BESIDE_THE_PATH = {
    "training/base.py": "base.peft: the base adaptation's own LoRA",
    "analysis/peft_methods.py": "swaps users.peft.method for an ablation's sub-runs, which then take the path",
    "analysis/training_cost.py": "times train_user_adapter on users.peft and stores nothing",
    "commands/adapters.py": "oppu adapters import: the serving limits (--target-modules) an imported adapter must fit",
}

# Serving reads stored adapters' configs back into its slots: past the store, the path's far end.
AFTER_THE_STORE = "serving/"


def rank_reads(source: str) -> list[tuple[int, str]]:
    """``(line, expression)`` of every attribute read of a ``RANK_FIELDS`` name in ``source``."""
    return [(node.lineno, ast.unparse(node)) for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Attribute) and node.attr in RANK_FIELDS and isinstance(node.ctx, ast.Load)]


def _library_modules() -> dict[str, str]:
    return {path.relative_to(OPPU).as_posix(): path.read_text() for path in sorted(OPPU.rglob("*.py"))}


def test_only_the_listed_modules_open_the_rank():
    readers = {module: rank_reads(source) for module, source in _library_modules().items()
               if not module.startswith(AFTER_THE_STORE)}
    readers = {module: reads for module, reads in readers.items() if reads}
    expected = THE_PATH | set(BESIDE_THE_PATH)
    unexpected = {module: reads[:3] for module, reads in readers.items() if module not in expected}
    assert not unexpected, f"these modules now read the LoRA's shape (hand the LoraConfig down instead): {unexpected}"
    assert set(readers) == expected, f"listed but reading nothing: {sorted(expected - set(readers))}"


def test_a_reader_outside_the_path_is_seen():
    """The check above fails on code like the batched trainer's old unpacking of the config."""
    source = "def inject(peft_config):\n    return peft_config.r, peft_config.lora_alpha\n"
    assert rank_reads(source) == [(2, "peft_config.r"), (2, "peft_config.lora_alpha")]


def test_the_run_config_reaches_the_actors_as_it_is():
    """``from_dict`` turns YAML into a run config once (``load_config``); no actor rebuilds one
    from a dict, and no driver flattens one into a dict for it."""
    round_trips = []
    for module, source in _library_modules().items():
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            flattens_cfg = name == "asdict" and any(
                (isinstance(arg, ast.Name) and arg.id == "cfg") or (isinstance(arg, ast.Attribute) and arg.attr == "cfg")
                for arg in node.args)
            if (name == "from_dict" and module != "config.py") or flattens_cfg:
                round_trips.append(f"oppu/{module}:{node.lineno} {ast.unparse(node)}")
    assert not round_trips


def test_the_doc_lists_the_path():
    text = (ROOT / "docs" / "internals.md").read_text()
    section = text.split("### The LoRA rank's path", 1)[1].split("\n## ", 1)[0]
    after = section.split("**After**", 1)[1].split("\n\n", 2)[1]
    listed = {match[len("oppu/"):] for match in re.findall(r"^\d+\. `(oppu/[\w/]+\.py)`", after, flags=re.M)}
    assert listed == THE_PATH | {"config.py"}
    assert re.search(rf"\(({len(listed)}) files, top-down\)", section)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return build_movie_tag_base(tmp_path_factory.mktemp("run") / "base")


def test_the_configured_shape_is_the_stored_adapters(base_dir, tmp_path):
    """``users.peft`` set away from its defaults reaches both trainers' stored adapters: the
    config PEFT saved, the weights' shapes and the hashed train config; the two trainers save
    the same ``adapter_config.json``."""
    from safetensors.torch import load as load_safetensors

    from oppu.store import AdapterStore
    from tests.unit.training.test_users import _batch, _trainer

    shape = ["users.peft.r=4", "users.peft.alpha=16", "users.peft.dropout=0.0",
             "users.peft.target_modules=[q_proj,k_proj,v_proj]"]
    config_files = {}
    for trainer in ("per-user", "batched"):
        actor = _trainer(base_dir, tmp_path / trainer, trainer, *shape)
        actor(_batch([movie_user("ann", 5)]))
        manifest, files = AdapterStore(str(tmp_path / trainer)).read_files(actor.publisher.key("ann"))
        saved = json.loads(files["adapter_config.json"])
        assert (saved["r"], saved["lora_alpha"], saved["lora_dropout"]) == (4, 16, 0.0)
        assert sorted(saved["target_modules"]) == ["k_proj", "q_proj", "v_proj"] and saved["inference_mode"]
        assert manifest.peft_config == saved
        assert manifest.train_config["peft"] == {"method": "lora", "r": 4, "alpha": 16, "dropout": 0.0,
                                                  "target_modules": ["q_proj", "k_proj", "v_proj"],
                                                  "num_virtual_tokens": 8}
        weights = load_safetensors(files["adapter_model.safetensors"])
        assert {name.split(".")[-3] for name in weights} == {"q_proj", "k_proj", "v_proj"}
        for name, tensor in weights.items():
            assert tensor.shape[0 if ".lora_A." in name else 1] == 4, name
        config_files[trainer] = files["adapter_config.json"]
    assert config_files["per-user"] == config_files["batched"]
