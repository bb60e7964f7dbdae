"""The one publish path (``oppu.training.publish``): the actor's two trainers and the in-process
analyses write the same manifest contract (train config, hashes, metric keys), so a re-run or
the evaluation job cannot tell which of them published an adapter."""

from __future__ import annotations

import copy
import math

import pytest

from tests.unit.tiny_models import build_movie_tag_base, movie_user, one_thread  # noqa: F401
from tests.unit.training.test_users import _batch, _config, _rows, _trainer

pytestmark = pytest.mark.usefixtures("one_thread")

METRIC_KEYS = {"final_loss", "samples", "steps", "tokens", "seconds"}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return build_movie_tag_base(tmp_path_factory.mktemp("run") / "base")


@pytest.mark.parametrize("trainer", ["per-user", "batched"])
def test_both_trainers_record_the_same_metrics(base_dir, tmp_path, trainer):
    from oppu.store import AdapterKey, AdapterStore

    actor = _trainer(base_dir, tmp_path / "store", trainer)
    out = _rows(actor(_batch([movie_user("ann", 8), movie_user("bob", 5, offset=1)])))
    store = AdapterStore(str(tmp_path / "store"))
    for user in ("ann", "bob"):
        metrics = store.latest(AdapterKey("LaMP-2M", actor.fingerprint, "oppu", user)).metrics
        assert metrics.keys() == METRIC_KEYS
        assert metrics["samples"] == {"ann": 8, "bob": 5}[user] and metrics["steps"] == {"ann": 4, "bob": 4}[user]
        assert metrics["tokens"] > 0 and metrics["seconds"] > 0 and math.isfinite(metrics["final_loss"])
        assert out[user]["loss"] == pytest.approx(metrics["final_loss"])


def test_train_stats_metrics_are_one_set_of_keys():
    from oppu.training.personal import TrainStats

    stats = TrainStats(samples=3, epochs=2, steps=2, target_tokens=10, input_tokens=40, final_loss=0.5,
                       seconds=1.5, losses=[0.7, 0.5])
    assert stats.metrics() == {"final_loss": 0.5, "samples": 3, "steps": 2, "tokens": 10, "seconds": 1.5}


def test_analysis_publishes_what_the_job_would_skip(base_dir, tmp_path):
    """An adapter the in-process analysis published for the job's own samples is the job's: the
    actor finds the same data and config in the store and skips the user."""
    from oppu.analysis.personal_inprocess import train_and_publish
    from oppu.store import AdapterKey, AdapterStore
    from oppu.tasks import get_task
    from oppu.training.samples import personal_samples

    cfg = _config(base_dir, tmp_path / "store", "per-user")
    ann = movie_user("ann", 6)
    stats = train_and_publish(cfg, [ann], lambda user: personal_samples(get_task("LaMP-2M"), user), "oppu", {},
                              log=lambda _: None)
    assert stats["ann"].samples == 6 and len(stats["ann"].losses) == stats["ann"].steps
    actor = _trainer(base_dir, tmp_path / "store", "per-user")
    manifest = AdapterStore(str(tmp_path / "store")).latest(AdapterKey("LaMP-2M", actor.fingerprint, "oppu", "ann"))
    assert manifest.metrics.keys() == METRIC_KEYS
    assert manifest.config_hash == actor.publisher.config_hash
    again = _rows(actor(_batch([ann])))["ann"]
    assert (again["status"], again["version"]) == ("skipped", manifest.version)


def test_publish_state_writes_what_peft_loads(base_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from oppu.store import AdapterStore
    from oppu.training.personal import TrainStats
    from oppu.training.publish import AdapterPublisher

    cfg = _config(base_dir, tmp_path / "store", "batched")
    publisher = AdapterPublisher.for_run(cfg, "oppu", "0123456789abcdef", "plain", trainer="batched")
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    reference = PeftModel(model, copy.copy(publisher.peft_config))
    state = {name: torch.randn_like(tensor) for name, tensor in reference.state_dict().items() if "lora_" in name}
    state = {name.replace(".default", ""): tensor for name, tensor in state.items()}
    ann = movie_user("ann", 4)
    manifest = publisher.publish_state(ann, state, TrainStats(4, 2, 2), model.name_or_path)
    assert manifest.train_config["trainer"] == "batched" and manifest.metrics.keys() == METRIC_KEYS
    fetched = AdapterStore(str(tmp_path / "store")).fetch(publisher.key("ann"), tmp_path / "fetched")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), fetched)
    for name, tensor in loaded.state_dict().items():
        if "lora_" in name:
            torch.testing.assert_close(tensor, state[name.replace(".default", "")])
