"""A user's adapter updated incrementally from the command line (issue #17 part 3), on a local
Ray: ``oppu users train`` trains a user, ``oppu users add`` brings new history, and ``oppu users
train --set users.update=incremental`` publishes a version continuing the first, which ``oppu
adapters list`` shows with its parent and the items it was trained on."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.unit.tiny_models import build_movie_tag_base, movie_user

pytestmark = pytest.mark.integration

TASK = "LaMP-2M"


def test_users_add_then_incremental_train_continues_the_current_version(tmp_path, capsys):
    import ray

    from oppu import cli
    from oppu.data.dataset import write_dataset

    run = tmp_path / "run"
    build_movie_tag_base(run / "base")
    ann = movie_user("ann", 12)
    write_dataset(run / "data", TASK, [movie_user("ann", 8)], {})
    (run / "config.yaml").write_text(yaml.safe_dump({
        "task": TASK, "users": {"variants": ["oppu"], "actors": 1, "users_per_batch": 1,
                                "optim": {"lr": 1e-2, "batch_size": 4, "epochs": 2, "max_length": 256}},
        "ray": {"num_cpus": 2}}))
    later = tmp_path / "later.json"
    later.write_text(json.dumps([{"id": item.id, **item.fields, "date": item.date} for item in ann.history[8:]]))

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert cli.main(["users", "train", "--run", str(run), "--user", "ann"]) == 0
        assert cli.main(["users", "add", "--run", str(run), "--user", "ann", "--history", str(later)]) == 0
        assert cli.main(["users", "train", "--run", str(run), "--user", "ann",
                         "--set", "users.update=incremental", "--set", "users.incremental.replay_ratio=0.5"]) == 0
    finally:
        ray.shutdown()

    capsys.readouterr()
    assert cli.main(["adapters", "list", "--run", str(run), "--user", "ann"]) == 0
    first, second = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert first["trainer"] == "per-user" and first["data_range"]["n_items"] == 8
    assert second["trainer"] == "per-user+incremental" and second["current"]
    update = second["data_range"]["update"]
    assert update["parent"] == first["version"] and second["data_range"]["n_items"] == 12
    assert (update["new_items"], update["first_new_item_id"], update["replay_items"]) == (4, "ann-8", 2)
