from dataclasses import dataclass, field
from pathlib import Path

import pytest

from oppu.config import apply_overrides, from_dict, load_config
from oppu.errors import ConfigError


@dataclass
class Inner:
    lr: float = 1e-4
    modules: list[str] = field(default_factory=lambda: ["q_proj"])
    epochs: int | None = None


@dataclass
class Outer:
    name: str = "x"
    flag: bool = False
    inner: Inner = field(default_factory=Inner)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: run\ninner:\n  lr: 0.001\n")
    cfg = load_config(Outer, path, ["inner.epochs=3", "flag=true", "inner.modules=[q_proj,v_proj]"])
    assert cfg == Outer(name="run", flag=True, inner=Inner(lr=0.001, modules=["q_proj", "v_proj"], epochs=3))


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError, match=r"inner\.lrr"):
        load_config(Outer, None, ["inner.lrr=1"])


def test_bad_value_names_key_and_value():
    with pytest.raises(ConfigError, match=r"inner\.epochs.*'three'"):
        from_dict(Outer, {"inner": {"epochs": "three"}})
    with pytest.raises(ConfigError, match=r"flag"):
        from_dict(Outer, {"flag": "maybe"})


def test_override_needs_equals():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["inner.lr"])


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "nope.yaml")


SHIPPED = sorted((Path(__file__).resolve().parents[2] / "oppu" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_run_config_loads(path):
    from oppu.run_config import RunConfig

    cfg = load_config(RunConfig, path)
    assert cfg.task.startswith("LaMP-")


def test_run_config_rejects_unknown_variant_and_task():
    from oppu.run_config import RunConfig

    with pytest.raises(ConfigError, match="variant"):
        load_config(RunConfig, None, ["users.variants=[oppu,rag+oppu]"])
    with pytest.raises(ConfigError, match="LaMP-9"):
        load_config(RunConfig, None, ["task=LaMP-9"])


def test_run_dir_layout():
    from oppu.run_config import RunConfig, parse_variant

    cfg = load_config(RunConfig, None, ["run_dir=s3://bucket/run", "task=LaMP_3"])
    assert cfg.task == "LaMP-3"
    assert cfg.base_uri("plain") == "s3://bucket/run/base"
    assert cfg.base_uri("rag") == "s3://bucket/run/base-rag"
    assert cfg.store_uri == "s3://bucket/run/adapters"
    assert parse_variant("oppu") == (False, 0)
    assert parse_variant("rag-k2+oppu") == (False, 2)
    assert cfg.variant_base("rag-k2+oppu") == "rag"  # only the shared rag base is configured
    per_k = load_config(RunConfig, None, ["base.flavours=[plain,rag-k1,rag-k2,rag-k4]"])
    assert [per_k.variant_base(v) for v in ("oppu", "rag-k1+oppu", "rag-k2+oppu", "rag-k4+oppu")] == [
        "plain", "rag-k1", "rag-k2", "rag-k4"]
    assert per_k.base_uri("rag-k2") == "oppu-run/base-rag-k2"
    with pytest.raises(ConfigError, match="unknown base flavour 'rag-k0'"):
        load_config(RunConfig, None, ["base.flavours=[plain,rag-k0]"])
