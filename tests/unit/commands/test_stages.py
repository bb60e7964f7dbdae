"""``oppu train-base|train-users|evaluate|pipeline``: the run config's flags, and a clean failure
(exit 2, one line on stderr, before Ray starts) when an input is missing."""

from __future__ import annotations

import pytest
import yaml

from oppu.cli import build_parser, main
from oppu.pipeline import STAGE_COMMANDS

COMMANDS = sorted(STAGE_COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_stage_command_takes_the_jobs_flags(command):
    argv = [command, "--config", "run.yaml", "--set", "run_dir=/tmp/x", "--set", "users.actors=4"]
    args = build_parser(argv).parse_args(argv)
    assert (args.config, args.overrides) == ("run.yaml", ["run_dir=/tmp/x", "users.actors=4"])


@pytest.mark.parametrize("command", COMMANDS)
def test_a_stage_command_without_its_data_set_fails_in_one_line(command, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"task": "LaMP-3", "run_dir": str(tmp_path / "run")}))
    assert main([command, "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"oppu {command}: error: ") and "\n" not in err
    assert f"the data set at {tmp_path / 'run' / 'data'}" in err and "oppu prepare" in err


def test_evaluate_names_the_missing_bases(tmp_path, capsys):
    from oppu.data.dataset import dataset_json_path

    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    open(dataset_json_path(str(run / "data")), "w").close()  # only its presence is checked first
    assert main(["evaluate", "--set", f"run_dir={run}", "--set", "eval.methods=[oppu]"]) == 2
    err = capsys.readouterr().err
    assert "evaluate cannot start" in err and f"'plain' base (for method oppu) at {run / 'base'}" in err


@pytest.mark.parametrize(("overrides", "message"), [
    (["users.no_such_key=1"], "unknown config key 'users.no_such_key'"),
    (["users.variants=[oppu+rag-k1]"], "unknown adapter variant 'oppu+rag-k1'"),
])
def test_a_bad_config_value_fails_naming_the_key(overrides, message, tmp_path, capsys):
    argv = ["train-users", "--set", f"run_dir={tmp_path}", *[f"--set={o}" for o in overrides]]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_missing_config_file_fails_cleanly(tmp_path, capsys):
    assert main(["pipeline", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
