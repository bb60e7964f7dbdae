"""``oppu adapters`` (issue #17): a user's versions listed and rolled back, exported as a PEFT folder
that gives the serving engine's greedy answers, and PEFT folders imported only when serving could
load them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from oppu import cli
from tests.unit.serving.tiny_setup import (
    build_tiny_base,
    make_user_adapter,
    peft_greedy,
    publish_adapter,
    reseeded_adapter,
)
from tests.unit.tiny_models import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

TASK = "LaMP-2M"
PROMPTS = ["the dark space movie about a robot", "a funny story about a king"]
ROW_KEYS = {"version", "created", "trainer", "data_range", "current", "variant"}


@pytest.fixture(scope="module")
def template_run(tmp_path_factory):
    """A run dir (tiny base, config.yaml) whose store holds three versions of alice's adapter."""
    from oppu.models import base_fingerprint
    from oppu.store import AdapterStore

    root = tmp_path_factory.mktemp("user-adapters")
    run = root / "run"
    base = build_tiny_base(run / "base")
    (run / "config.yaml").write_text(yaml.safe_dump({"task": TASK, "users": {"variants": ["oppu", "rag-k1+oppu"]}}))
    fingerprint = base_fingerprint(base)
    store = AdapterStore(str(run / "adapters"))
    template = make_user_adapter(base, root / "template", seed=0)
    adapters = [reseeded_adapter(template, root / f"alice-{i}", seed=i) for i in range(3)]
    versions = [publish_adapter(store, TASK, fingerprint, "alice", adapter).version for adapter in adapters]
    return {"run": run, "fingerprint": fingerprint, "adapters": adapters, "versions": versions, "root": root}


@pytest.fixture
def setup(template_run, tmp_path):
    """A copy of the template run, for a test to change."""
    run = tmp_path / "run"
    shutil.copytree(template_run["run"], run)
    return template_run | {"run": run}


def oppu(capsys, *argv: str) -> tuple[int, list[dict], str]:
    """Exit status, the JSON lines printed, stderr."""
    status = cli.main(["adapters", *argv])
    out, err = capsys.readouterr()
    return status, [json.loads(line) for line in out.splitlines() if line.strip()], err


def test_list_prints_one_line_per_version_with_the_current_one_marked(setup, capsys):
    status, rows, _ = oppu(capsys, "list", "--run", str(setup["run"]), "--user", "alice")
    assert status == 0
    assert [row["version"] for row in rows] == setup["versions"]
    assert all(set(row) == ROW_KEYS for row in rows)
    assert [row["current"] for row in rows] == [False, False, True]
    assert rows[0]["trainer"] == "per-user" and rows[0]["data_range"] == {"n_items": 1}
    assert {row["variant"] for row in rows} == {"oppu"}  # the run has no base for rag-k1+oppu


def test_list_names_what_is_unknown_with_exit_status_2(setup, capsys, tmp_path):
    run = str(setup["run"])
    status, rows, err = oppu(capsys, "list", "--run", run, "--user", "nobody", "--variant", "oppu")
    assert status == 2 and not rows and "user 'nobody' has no adapter" in err
    status, _, err = oppu(capsys, "list", "--run", str(tmp_path / "missing"), "--user", "alice")
    assert status == 2 and "no run directory" in err
    status, _, err = oppu(capsys, "list", "--run", run, "--user", "../alice")
    assert status == 2 and "--user" in err
    status, _, err = oppu(capsys, "list", "--run", run, "--user", "alice", "--variant", "nonsense")
    assert status == 2 and "unknown adapter variant 'nonsense'" in err


def test_rollback_makes_an_older_version_current_until_the_next_publish(setup, capsys):
    from oppu.store import AdapterKey, AdapterStore

    run, versions = str(setup["run"]), setup["versions"]
    status, rows, _ = oppu(capsys, "rollback", "--run", run, "--user", "alice", "--to", versions[0])
    assert status == 0 and rows[0]["version"] == versions[0] and rows[0]["current"] is True
    _, rows, _ = oppu(capsys, "list", "--run", run, "--user", "alice", "--variant", "oppu")
    assert [row["current"] for row in rows] == [True, False, False]

    status, _, err = oppu(capsys, "rollback", "--run", run, "--user", "alice", "--to", "v20000101T000000000000-00000000")
    assert status == 2 and "no complete version" in err and "oppu adapters list" in err

    store = AdapterStore(str(setup["run"] / "adapters"))
    newer = publish_adapter(store, TASK, setup["fingerprint"], "alice", setup["adapters"][1]).version
    assert store.latest(AdapterKey(TASK, setup["fingerprint"], "oppu", "alice")).version == newer


def test_export_is_a_peft_folder_answering_as_the_serving_engine_does(setup, capsys, tmp_path):
    from oppu.serving.adapters import AdapterShape, decode_adapter
    from oppu.serving.engine import GenerationEngine, GenerationRow, LoraSlotsConfig
    from oppu.store import AdapterKey, AdapterStore
    from tests.unit.serving.tiny_setup import load_tiny_base

    run, base = setup["run"], setup["run"] / "base"
    out = tmp_path / "exported" / "alice"
    status, _, err = oppu(capsys, "export", "--run", str(run), "--user", "alice", "--out", str(out))
    assert status == 0 and setup["versions"][-1] in err
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve()) and config["peft_type"] == "LORA"
    assert (out / "adapter_model.safetensors").read_bytes() == (
        setup["adapters"][-1] / "adapter_model.safetensors").read_bytes()

    exported = peft_greedy(base, out, PROMPTS, 8)
    assert exported == peft_greedy(base, setup["adapters"][-1], PROMPTS, 8)
    assert exported != peft_greedy(base, None, PROMPTS, 8)  # the adapter changes the answers
    # The serving engine, given the store's version as a replica loads it, answers the same.
    manifest, files = AdapterStore(str(run / "adapters")).read_files(AdapterKey(TASK, setup["fingerprint"], "oppu", "alice"))
    loaded = decode_adapter(manifest, files, AdapterShape(setup["fingerprint"], 16, ("q_proj", "v_proj")))
    model, tokenizer = load_tiny_base(base)
    engine = GenerationEngine(model, tokenizer, LoraSlotsConfig(2, 16, ("q_proj", "v_proj")))
    rows = [GenerationRow(engine.encode(prompt), loaded, max_new_tokens=8) for prompt in PROMPTS]
    assert [engine.decode(ids) for ids in engine.generate(rows)] == exported

    older = tmp_path / "older"
    status, _, _ = oppu(capsys, "export", "--run", str(run), "--user", "alice", "--out", str(older),
                        "--version", setup["versions"][0])
    assert status == 0 and peft_greedy(base, older, PROMPTS, 8) == peft_greedy(base, setup["adapters"][0], PROMPTS, 8)
    status, _, err = oppu(capsys, "export", "--run", str(run), "--user", "alice", "--out", str(out))
    assert status == 2 and "already holds" in err


def test_import_publishes_a_good_adapter_as_the_current_version(setup, capsys, tmp_path):
    from oppu.store import AdapterKey, AdapterStore

    run = str(setup["run"])
    exported = tmp_path / "alice-export"
    assert oppu(capsys, "export", "--run", run, "--user", "alice", "--out", str(exported))[0] == 0
    status, rows, err = oppu(capsys, "import", "--run", run, "--user", "bob", "--from", str(exported))
    assert status == 0, err
    assert rows[0]["trainer"] == "import" and rows[0]["current"] is True and rows[0]["data_range"] == {}
    _, listed, _ = oppu(capsys, "list", "--run", run, "--user", "bob", "--variant", "oppu")
    assert [row["version"] for row in listed] == [rows[0]["version"]]
    manifest, files = AdapterStore(str(setup["run"] / "adapters")).read_files(
        AdapterKey(TASK, setup["fingerprint"], "oppu", "bob"))
    assert files["adapter_model.safetensors"] == (exported / "adapter_model.safetensors").read_bytes()
    assert manifest.trainer == "import"

    # users.keep_versions applies to imports as to training
    status, _, _ = oppu(capsys, "import", "--run", run, "--user", "alice", "--from", str(exported),
                        "--set", "users.keep_versions=2")
    assert status == 0
    _, listed, _ = oppu(capsys, "list", "--run", run, "--user", "alice", "--variant", "oppu")
    assert len(listed) == 2 and [row["current"] for row in listed] == [False, True]
    assert listed[0]["version"] == setup["versions"][-1]


def _nan_copy(adapter_dir: Path, out_dir: Path) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter_dir, out_dir)
    tensors = load_file(out_dir / "adapter_model.safetensors")
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("nan")
    save_file(tensors, out_dir / "adapter_model.safetensors")
    return out_dir


def _bad_adapters(setup, tmp_path) -> dict[str, tuple[Path, str]]:
    from peft import IA3Config, get_peft_model

    from tests.unit.serving.tiny_setup import load_tiny_base
    from tests.unit.store.adapter_factory import make_tiny_peft_adapter

    base = setup["run"] / "base"
    other_base = tmp_path / "other-base"
    make_tiny_peft_adapter(other_base)  # a 16-wide Llama's q/v LoRA: the wrong shapes for this base
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(setup["adapters"][0] / "adapter_config.json", no_weights)
    model, _ = load_tiny_base(base)
    ia3 = tmp_path / "ia3"
    get_peft_model(model, IA3Config(target_modules=["q_proj", "v_proj"], feedforward_modules=[])).save_pretrained(ia3)
    return {
        "wrong shapes": (other_base, "in=32"),
        "NaN weight": (_nan_copy(setup["adapters"][0], tmp_path / "nan"), "NaN or infinite"),
        "rank too high": (make_user_adapter(base, tmp_path / "rank32", seed=1, rank=32), "LoRA rank 32 exceeds"),
        "unknown target module": (make_user_adapter(base, tmp_path / "lm-head", seed=1, target_modules=("lm_head",)),
                                  "['lm_head']"),
        "no weights": (no_weights, "no adapter_model.safetensors"),
        "not LoRA": (ia3, "is not LORA"),
    }


def test_import_refuses_bad_adapters_naming_what_is_wrong(setup, capsys, tmp_path):
    from oppu.store import AdapterKey, AdapterStore

    run = str(setup["run"])
    for what, (adapter_dir, message) in _bad_adapters(setup, tmp_path).items():
        status, rows, err = oppu(capsys, "import", "--run", run, "--user", "alice", "--from", str(adapter_dir))
        assert (status, rows) == (2, []), what
        assert message in err and str(adapter_dir) in err, (what, err)
    store = AdapterStore(str(setup["run"] / "adapters"))
    assert store.versions(AdapterKey(TASK, setup["fingerprint"], "oppu", "alice")) == setup["versions"]

    # The serve app's limits are the import's: a lower max_lora_rank refuses a rank-4 adapter.
    status, _, err = oppu(capsys, "import", "--run", run, "--user", "bob", "--from", str(setup["adapters"][0]),
                          "--max-lora-rank", "2")
    assert status == 2 and "LoRA rank 4 exceeds" in err
    status, _, err = oppu(capsys, "import", "--run", run, "--user", "bob", "--from", str(tmp_path / "nowhere"))
    assert status == 2 and "no adapter folder" in err


def test_import_refuses_an_erased_user(setup, capsys):
    from oppu.erasure import add_tombstone

    add_tombstone(str(setup["run"] / "adapters"), "carol")
    status, _, err = oppu(capsys, "import", "--run", str(setup["run"]), "--user", "carol",
                          "--from", str(setup["adapters"][0]))
    assert status == 2 and "erased" in err
