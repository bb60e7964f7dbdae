"""``oppu quickstart --size smoke`` / OPPU_QUICKSTART_SIZE: valid run-config overrides, a bad value named."""

from __future__ import annotations

from oppu import cli
from oppu.commands import quickstart


def test_smoke_overrides_load_into_the_quickstart_config_with_one_base_and_one_variant():
    from oppu.config import load_config
    from oppu.pipeline import PACKAGED_CONFIGS
    from oppu.run_config import RunConfig

    cfg = load_config(RunConfig, PACKAGED_CONFIGS / "quickstart.yaml", quickstart.SMOKE_OVERRIDES)
    assert cfg.base.flavours == ["plain"] and cfg.users.variants == ["oppu"]
    assert cfg.eval.methods == ["non-personalized", "oppu"]


def test_the_size_comes_from_the_environment_and_a_bad_one_is_named(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(quickstart.SIZE_ENV, "smoke")
    args = cli.build_parser(["quickstart"]).parse_args(["quickstart"])
    assert args.size == "smoke"
    monkeypatch.setenv(quickstart.SIZE_ENV, "huge")
    assert cli.main(["quickstart", "--out", str(tmp_path / "run")]) == 2
    assert "OPPU_QUICKSTART_SIZE='huge'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
