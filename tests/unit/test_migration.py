"""A base upgrade's migration (issue #17), without Ray: which users of the old base are migrated,
pending or cannot be; ``migrate_users`` hands the pending ones to the train_users stage on the new
bases (stubbed here; tests/integration/test_base_upgrade.py trains and serves for real); the
cut-over records the new bases in the run's config.yaml; ``oppu users migrate`` and
``jobs/migrate_users.py`` print the status lines and exit 0 only when every variant is complete."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from oppu import cli
from oppu.config import load_config
from oppu.errors import ConfigError
from oppu.run_config import RunConfig
from tests.unit.tiny_models import movie_user

TASK = "LaMP-2M"
VARIANTS = ["oppu", "rag-k1+oppu"]


def _fake_base(directory: Path, name: str) -> Path:
    """A folder a fingerprint can be taken of: config.json and a weight file, told apart by ``name``."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"name": name}))
    (directory / "model.safetensors").write_bytes(name.encode() * 8)
    return directory


def _publish(store, fingerprint: str, variant: str, user, tmp_path: Path, data_hash: str | None = None):
    from oppu.data.dataset import dataset_fingerprint
    from oppu.store import AdapterKey

    adapter = tmp_path / "adapter-files"
    adapter.mkdir(exist_ok=True)
    (adapter / "adapter_config.json").write_text("{}")
    user_id = user if isinstance(user, str) else user.user_id
    data_hash = data_hash or (dataset_fingerprint(user) if not isinstance(user, str) else "no-data")
    return store.publish(AdapterKey(TASK, fingerprint, variant, user_id), adapter, data_hash=data_hash,
                         config={"variant": variant}, peft_method="lora", data_span={}, metrics={})


@pytest.fixture
def run(tmp_path):
    """A run: old bases (plain, rag) in the run dir, new ones under bases/v2, users ann and bob (test,
    adapters of both variants on the old bases), cat (a base user with an old adapter), dan (not in
    the data set, an old adapter), eve (erased, an old adapter left behind)."""
    from oppu.data.dataset import write_dataset
    from oppu.erasure import add_tombstone
    from oppu.models import base_fingerprint
    from oppu.store import AdapterStore

    root = tmp_path / "run"
    old = {"plain": _fake_base(root / "base", "old"), "rag": _fake_base(root / "base-rag", "old-rag")}
    new = {"plain": _fake_base(root / "bases" / "v2" / "base", "new"),
           "rag": _fake_base(root / "bases" / "v2" / "base-rag", "new-rag")}
    users = [movie_user("ann", 6), movie_user("bob", 5), movie_user("eve", 4),
             dataclasses.replace(movie_user("cat", 3), role="base")]
    write_dataset(root / "data", TASK, users, {})
    (root / "config.yaml").write_text(yaml.safe_dump({"task": TASK, "users": {"variants": VARIANTS}}))
    store = AdapterStore(str(root / "adapters"))
    fingerprints = {which: {flavour: base_fingerprint(path) for flavour, path in bases.items()}
                    for which, bases in (("old", old), ("new", new))}
    for variant, flavour in zip(VARIANTS, ("plain", "rag"), strict=True):
        for user in [*users, "dan"]:
            _publish(store, fingerprints["old"][flavour], variant, user, tmp_path)
    add_tombstone(str(root / "adapters"), "eve")
    return {"dir": root, "store": store, "fp": fingerprints, "users": {u.user_id: u for u in users},
            "new": str(root / "bases" / "v2"), "tmp": tmp_path}


def _cfg(run, *overrides: str) -> RunConfig:
    return load_config(RunConfig, run["dir"] / "config.yaml", [f"run_dir={run['dir']}", *overrides])


def test_bases_folder_holds_the_bases_and_the_tiny_pretrained_model(tmp_path):
    from oppu.analysis.runs import sub_run

    cfg = load_config(RunConfig, None, [f"run_dir={tmp_path}"])
    assert cfg.bases_uri == str(tmp_path) and cfg.base_uri("rag") == str(tmp_path / "base-rag")
    moved = dataclasses.replace(cfg, bases=str(tmp_path / "bases" / "v2"))
    assert moved.base_uri("plain") == str(tmp_path / "bases" / "v2" / "base")
    assert moved.pretrained_uri == str(tmp_path / "bases" / "v2" / "pretrained")
    assert sub_run(moved, "x", link_bases=()).base_uri("plain") == str(tmp_path / "analysis" / "x" / "base")


def test_status_sorts_the_old_bases_users_into_migrated_pending_and_unmigratable(run):
    from oppu.migration import migration_status

    ann = run["users"]["ann"]
    _publish(run["store"], run["fp"]["new"]["plain"], "oppu", ann, run["tmp"])  # on its current history
    _publish(run["store"], run["fp"]["new"]["plain"], "oppu", run["users"]["bob"], run["tmp"], data_hash="older")
    plain, rag = migration_status(_cfg(run), run["new"])

    assert (plain.variant, plain.old_base, plain.new_base) == ("oppu", str(run["dir"] / "base"),
                                                              str(run["dir"] / "bases" / "v2" / "base"))
    assert (plain.old_fingerprint, plain.new_fingerprint) == (run["fp"]["old"]["plain"], run["fp"]["new"]["plain"])
    assert plain.migrated == ("ann",) and plain.pending == ("bob",)  # bob's new adapter: not his history
    assert sorted(plain.unmigratable) == ["cat", "dan"] and "eve" not in plain.pending
    assert "a base user" in plain.unmigratable["cat"] and "not in the data set" in plain.unmigratable["dan"]
    assert rag.variant == "rag-k1+oppu" and rag.new_fingerprint == run["fp"]["new"]["rag"]
    assert rag.migrated == () and rag.pending == ("ann", "bob")
    assert not plain.complete and plain.users == 4
    row = plain.row()
    assert json.loads(json.dumps(row)) == row
    assert (row["complete"], row["migrated"], row["pending"]) == (False, 1, ["bob"])


def test_status_refuses_a_missing_new_base_and_the_same_base(run):
    import shutil

    from oppu.migration import migration_status

    shutil.rmtree(run["dir"] / "bases" / "v2" / "base-rag")
    with pytest.raises(ConfigError, match=r"'rag-k1\+oppu': the new base is not at .*base-rag.*train-base"):
        migration_status(_cfg(run), run["new"])
    with pytest.raises(ConfigError, match="nothing to migrate"):
        migration_status(_cfg(run, "users.variants=[oppu]"), str(run["dir"]))


def test_migrate_trains_only_the_pending_users_on_the_new_bases_through_the_users_stage(run, monkeypatch):
    import oppu.pipeline
    import oppu.training.users
    from oppu.migration import MIGRATE_STAGE, migrate_users
    from oppu.models import base_fingerprint
    from oppu.training.users_report import UserResult

    calls = []

    def fake_stage(cfg, variant, log, stage):
        calls.append((variant, cfg.bases, list(cfg.users.users), cfg.users.max_failed_users, stage))
        fingerprint = base_fingerprint(cfg.base_uri(cfg.variant_base(variant)))
        results = []
        for user_id in cfg.users.users:
            if user_id == "bob" and variant == "rag-k1+oppu":
                results.append(UserResult(user_id, "failed", error="bad data"))
                continue
            version = _publish(run["store"], fingerprint, variant, run["users"][user_id], run["tmp"]).version
            results.append(UserResult(user_id, "trained", version=version))
        return results

    monkeypatch.setattr(oppu.training.users, "train_personal_adapters", fake_stage)
    monkeypatch.setattr(oppu.pipeline, "init_ray", lambda cfg: None)
    _publish(run["store"], run["fp"]["new"]["plain"], "oppu", run["users"]["ann"], run["tmp"])
    cfg = _cfg(run, "users.variants=[oppu,rag-k1+oppu]")
    results, status = migrate_users(cfg, run["new"])

    assert calls == [("oppu", run["new"], ["bob"], -1, MIGRATE_STAGE),
                     ("rag-k1+oppu", run["new"], ["ann", "bob"], -1, MIGRATE_STAGE)]
    assert [(r.user_id, r.status) for r in results["oppu"]] == [("bob", "trained"), ("cat", "failed"),
                                                                ("dan", "failed")]
    assert [(r.user_id, r.status) for r in results["rag-k1+oppu"]][:2] == [("ann", "trained"), ("bob", "failed")]
    assert status[0].migrated == ("ann", "bob") and status[1].pending == ("bob",)

    # Resumed with nobody pending: Ray is not started, nothing is trained.
    calls.clear()
    monkeypatch.setattr(oppu.pipeline, "init_ray", lambda cfg: pytest.fail("Ray started with nothing to train"))
    results, status = migrate_users(_cfg(run, "users.variants=[oppu]"), run["new"])
    assert calls == [] and [r.user_id for r in results["oppu"]] == ["cat", "dan"]


def _delete_unmigratable(run) -> None:
    for user in ("cat", "dan"):
        run["store"].delete_user(user)


def test_cut_over_only_once_complete_and_into_the_runs_config(run):
    from oppu.migration import cut_over, migration_status

    cfg = _cfg(run, "users.variants=[oppu]")
    with pytest.raises(ConfigError, match="incomplete"):
        cut_over(str(run["dir"]), run["new"], migration_status(cfg, run["new"]))
    _delete_unmigratable(run)
    for user in ("ann", "bob"):
        _publish(run["store"], run["fp"]["new"]["plain"], "oppu", run["users"][user], run["tmp"])
    status = migration_status(cfg, run["new"])
    assert status[0].complete
    config_file = run["dir"] / "config.yaml"
    config_file.write_text("# the run's config, kept as written\n" + config_file.read_text())
    uri = cut_over(str(run["dir"]), run["new"], status)
    written = yaml.safe_load(Path(uri).read_text())
    assert written["bases"] == run["new"] and written["users"] == {"variants": VARIANTS}
    assert Path(uri).read_text().startswith("# the run's config, kept as written\n")
    assert load_config(RunConfig, uri).base_uri("plain") == str(Path(run["new"]) / "base")
    cut_over(str(run["dir"]), str(run["dir"] / "bases" / "v3"), status)  # the next upgrade: the line replaced
    assert Path(uri).read_text().count("bases:") == 1
    assert yaml.safe_load(Path(uri).read_text())["bases"] == str(run["dir"] / "bases" / "v3")
    (run["dir"] / "config.yaml").unlink()
    with pytest.raises(ConfigError, match="no config.yaml"):
        cut_over(str(run["dir"]), run["new"], status)


def _command(capsys, *argv: str) -> tuple[int, list[dict], str]:
    code = cli.main(["users", "migrate", *argv])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines() if line.startswith("{")], err


def test_command_status_and_cut_over(run, capsys):
    base_args = ["--run", str(run["dir"]), "--to-bases", run["new"], "--set", "users.variants=[oppu]"]
    code, rows, _ = _command(capsys, *base_args, "--status")
    assert code == 1 and [(r["variant"], r["pending"], r["complete"]) for r in rows] == [("oppu", ["ann", "bob"], False)]
    code, _, err = _command(capsys, *base_args, "--cut-over")
    assert code == 2 and "incomplete" in err
    code, _, err = _command(capsys, *base_args, "--status", "--cut-over")
    assert code == 2 and "give one" in err
    code, _, err = _command(capsys, *base_args, "--cut-over", "--config", str(run["dir"] / "config.yaml"))
    assert code == 2 and "--config" in err

    _delete_unmigratable(run)
    for user in ("ann", "bob"):
        _publish(run["store"], run["fp"]["new"]["plain"], "oppu", run["users"][user], run["tmp"])
    code, rows, err = _command(capsys, *base_args, "--status")
    assert code == 0 and rows[0]["complete"] and rows[0]["migrated"] == 2 and "--cut-over" in err
    code, rows, err = _command(capsys, *base_args, "--cut-over")
    assert code == 0 and "cut over" in err
    assert yaml.safe_load((run["dir"] / "config.yaml").read_text())["bases"] == run["new"]
    code, _, err = _command(capsys, *base_args, "--status")  # the run's bases are the new ones now
    assert code == 2 and "nothing to migrate" in err


def test_job_entry_point_prints_the_status(run, capsys):
    from oppu.commands.users import migrate_job_main

    code = migrate_job_main("doc", ["--config", str(run["dir"] / "config.yaml"), "--set", f"run_dir={run['dir']}",
                                    "--to-bases", run["new"], "--status"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1 and [row["variant"] for row in rows] == VARIANTS
    assert migrate_job_main("doc", ["--config", str(run["dir"] / "config.yaml"), "--set", f"run_dir={run['dir']}",
                                    "--to-bases", str(run["dir"] / "nowhere"), "--status"]) == 2


def test_allow_unmigratable_cuts_over_leaving_those_users_named(run, capsys):
    """Users with no history to train on (cat: a base user, dan: not in the data set) block the
    cut-over unless it is told to leave them behind; pending users block it either way."""
    base_args = ["--run", str(run["dir"]), "--to-bases", run["new"], "--set", "users.variants=[oppu]"]
    code, _, err = _command(capsys, *base_args, "--status", "--allow-unmigratable")
    assert code == 1  # ann and bob are still to train
    for user in ("ann", "bob"):
        _publish(run["store"], run["fp"]["new"]["plain"], "oppu", run["users"][user], run["tmp"])
    code, rows, err = _command(capsys, *base_args, "--cut-over")
    assert code == 2 and "cat, dan cannot be migrated" in err and "--allow-unmigratable" in err
    code, rows, err = _command(capsys, *base_args, "--status", "--allow-unmigratable")
    assert code == 0 and not rows[0]["complete"] and sorted(rows[0]["unmigratable"]) == ["cat", "dan"]
    assert "left behind" in err and "cat, dan" in err
    code, rows, err = _command(capsys, *base_args, "--cut-over", "--allow-unmigratable")
    assert code == 0 and "cut over" in err
    assert yaml.safe_load((run["dir"] / "config.yaml").read_text())["bases"] == run["new"]
