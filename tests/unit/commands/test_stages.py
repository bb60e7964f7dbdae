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


@pytest.mark.parametrize(("command", "flags"), [
    ("train-users", {"--max-failed-users"}), ("pipeline", {"--max-failed-users", "--max-failed-queries"}),
    ("evaluate", {"--max-failed-queries"}), ("train-base", set())])
def test_the_failure_thresholds_are_flags_of_the_stages_they_concern(command, flags):
    parser = build_parser([command])
    known = {option for action in parser._subparsers._group_actions[0].choices[command]._actions
             for option in action.option_strings}
    assert known & {"--max-failed-users", "--max-failed-queries"} == flags


@pytest.mark.parametrize(("command", "argv", "expected"), [
    ("train-users", ["--max-failed-users", "3"], ("users.max_failed_users", 3)),
    ("train-users", ["--set", "users.max_failed_users=1", "--max-failed-users", "-1"], ("users.max_failed_users", -1)),
    ("evaluate", ["--max-failed-queries", "5"], ("eval.max_failed_queries", 5)),
    ("pipeline", ["--set", "eval.max_failed_queries=2"], ("eval.max_failed_queries", 2)),
])
def test_a_failed_stage_exits_1_in_one_line_and_the_flag_sets_its_threshold(
        command, argv, expected, tmp_path, monkeypatch, capsys):
    from oppu import pipeline, preflight
    from oppu.errors import StageFailed

    seen = {}

    def run_stages(cfg, stages):
        section, key = expected[0].split(".")
        seen["value"] = getattr(getattr(cfg, section), key)
        raise StageFailed("train_users oppu: 2 of 3 users failed (u1, u2), more than users.max_failed_users=0 allows")

    monkeypatch.setattr(preflight, "check_inputs", lambda cfg, stages: None)
    monkeypatch.setattr(pipeline, "run_stages", run_stages)
    assert main([command, "--set", f"run_dir={tmp_path}", *argv]) == 1
    assert seen["value"] == expected[1]
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the [config] log line
    assert err == (f"oppu {command}: error: train_users oppu: 2 of 3 users failed (u1, u2), more than "
                   "users.max_failed_users=0 allows")


def test_a_job_script_exits_1_when_its_stage_failed(tmp_path, monkeypatch, capsys):
    from oppu import pipeline, preflight
    from oppu.commands.stages import job_main
    from oppu.errors import StageFailed

    def run_stages(cfg, stages):
        assert cfg.users.max_failed_users == 4
        raise StageFailed("5 of 9 users failed")

    monkeypatch.setattr(preflight, "check_inputs", lambda cfg, stages: None)
    monkeypatch.setattr(pipeline, "run_stages", run_stages)
    argv = ["--set", f"run_dir={tmp_path}", "--max-failed-users", "4"]
    assert job_main(STAGE_COMMANDS["train-users"], "train users", argv) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: 5 of 9 users failed"


@pytest.mark.parametrize("override", ["users.max_failed_users=-2", "eval.max_failed_queries=-5"])
def test_a_threshold_below_minus_one_is_refused(override, tmp_path, capsys):
    assert main(["pipeline", "--set", f"run_dir={tmp_path}", "--set", override]) == 2
    assert override.split("=")[0] in capsys.readouterr().err
