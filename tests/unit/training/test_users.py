"""PersonalTrainer, the Ray Data actor of jobs/train_users.py, called in-process (no Ray): both
trainers publish PEFT adapters with the same manifest contract, skip what the store holds (a
re-executed batch publishes nothing twice) and fail a bad user alone."""

from __future__ import annotations

import numpy as np
import pytest

from oppu.data.records import HistoryItem, UserData
from tests.unit.tiny_models import MOVIE_TAGS, build_movie_tag_base, movie_user, one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")



def _batch(users: list[UserData]) -> dict:
    """What Ray Data hands the actor: numpy columns of users.parquet rows."""
    rows = [u.to_row() for u in users]
    return {name: np.array([row[name] for row in rows], dtype=object) for name in rows[0]}


def _rows(out: dict) -> dict[str, dict]:
    return {user_id: {name: out[name][i] for name in out} for i, user_id in enumerate(out["user_id"])}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return build_movie_tag_base(tmp_path_factory.mktemp("run") / "base")


def _config(base_dir, store, trainer: str, *overrides: str):
    from oppu.config import load_config
    from oppu.run_config import RunConfig

    return load_config(RunConfig, None, [
        f"run_dir={base_dir.parent}", f"store={store}", "users.variants=[oppu]", f"users.trainer={trainer}",
        "users.optim.lr=1e-2", "users.optim.batch_size=4", "users.optim.epochs=2", "users.optim.max_length=256",
        "users.batched.tokens_per_forward=1024", "users.batched.max_active_users=2", *overrides])


def _trainer(base_dir, store, trainer: str, *overrides: str):
    from oppu.training.users_actor import PersonalTrainer

    return PersonalTrainer(_config(base_dir, store, trainer, *overrides), "oppu")


def test_batched_trainer_publishes_peft_adapters_and_rerun_skips(base_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from oppu.store import AdapterKey, AdapterStore

    users = [movie_user("ann", 9), movie_user("bob", 6, offset=1), movie_user("cy", 5, offset=2)]
    store_root = tmp_path / "store"
    trainer = _trainer(base_dir, store_root, "batched")
    first = _rows(trainer(_batch(users)))
    assert {u: r["status"] for u, r in first.items()} == dict.fromkeys(["ann", "bob", "cy"], "trained")
    assert all(r["samples"] > 0 and r["tokens"] > 0 and r["seconds"] > 0 and np.isfinite(r["loss"])
               for r in first.values())

    store = AdapterStore(str(store_root))
    per_user = _trainer(base_dir, tmp_path / "per-user", "per-user")
    reference = _rows(per_user(_batch(users[:1])))["ann"]
    reference_manifest = AdapterStore(str(tmp_path / "per-user")).latest(
        AdapterKey("LaMP-2M", per_user.fingerprint, "oppu", "ann"))
    for user in ("ann", "bob", "cy"):
        key = AdapterKey("LaMP-2M", trainer.fingerprint, "oppu", user)
        manifest = store.latest(key)
        assert manifest.version == first[user]["version"] and store.versions(key) == [manifest.version]
        # the per-user path's manifest contract: fields, PEFT config keys, metrics
        assert manifest.metrics.keys() == reference_manifest.metrics.keys()
        assert manifest.peft_config.keys() == reference_manifest.peft_config.keys()
        assert manifest.peft_config["inference_mode"] is True and manifest.peft_method == "lora"
        assert manifest.train_config["trainer"] == "batched"
        assert manifest.data_span["n_items"] == {"ann": 9, "bob": 6, "cy": 5}[user]
        # loadable by PEFT, and what loads is the trained adapter
        adapter_dir = store.fetch(key, tmp_path / "fetched" / user)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
        lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
        assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
    assert reference["status"] == "trained"

    again = _rows(_trainer(base_dir, store_root, "batched")(_batch(users)))
    assert {u: (r["status"], r["version"]) for u, r in again.items()} == {
        u: ("skipped", first[u]["version"]) for u in first}
    assert all(len(store.versions(AdapterKey("LaMP-2M", trainer.fingerprint, "oppu", u))) == 1 for u in first)
    # the other trainer is another training: it does not take the batched adapters for its own
    assert _rows(per_user(_batch(users[1:2])))["bob"]["status"] == "trained"


@pytest.mark.parametrize("trainer", ["per-user", "batched"])
def test_reexecuted_batch_does_not_publish_twice(base_dir, tmp_path, trainer):
    """Ray re-runs the whole batch of an actor that died after publishing some of its users:
    those are skipped, the rest trained, and every user keeps exactly one version."""
    from oppu.store import AdapterKey, AdapterStore

    users = [movie_user("ann", 8), movie_user("bob", 6, offset=1), movie_user("cy", 4, offset=3)]
    store_root = tmp_path / "store"
    first = _rows(_trainer(base_dir, store_root, trainer)(_batch(users[:1])))  # died after "ann"
    actor = _trainer(base_dir, store_root, trainer)  # the restarted actor
    rerun = _rows(actor(_batch(users)))
    assert rerun["ann"]["status"] == "skipped" and rerun["ann"]["version"] == first["ann"]["version"]
    assert rerun["bob"]["status"] == rerun["cy"]["status"] == "trained"
    store = AdapterStore(str(store_root))
    for user in ("ann", "bob", "cy"):
        assert len(store.versions(AdapterKey("LaMP-2M", actor.fingerprint, "oppu", user))) == 1


def test_batched_bad_user_fails_alone(base_dir, tmp_path):
    broken = movie_user("broken", 5)
    broken.history[2] = HistoryItem(id="broken-2", fields={"description": "no tag field here"})
    empty = UserData(user_id="empty", role="test", history=[], queries=[])
    users = [movie_user("ann", 7), broken, empty, movie_user("bob", 5, offset=1)]
    out = _rows(_trainer(base_dir, tmp_path / "store", "batched")(_batch(users)))
    assert {u: r["status"] for u, r in out.items()} == {
        "ann": "trained", "broken": "failed", "empty": "failed", "bob": "trained"}
    assert "tag" in out["broken"]["error"] and "no training samples" in out["empty"]["error"]


def test_batched_pass_that_raises_retries_users_one_by_one(base_dir, tmp_path, monkeypatch):
    """Should the batched pass itself fail, its unfinished users are retried alone: only the
    user that breaks it fails."""
    import oppu.training.batched as batched

    real = batched.train_users_batched

    def breaks_on_bob(model, tokenizer, users, *args, **kwargs):
        if any(user_id == "bob" for user_id, _ in users):
            raise RuntimeError("bob breaks the pass")
        return real(model, tokenizer, users, *args, **kwargs)

    monkeypatch.setattr(batched, "train_users_batched", breaks_on_bob)
    users = [movie_user("ann", 6), movie_user("bob", 5, offset=1), movie_user("cy", 4, offset=2)]
    out = _rows(_trainer(base_dir, tmp_path / "store", "batched")(_batch(users)))
    assert {u: r["status"] for u, r in out.items()} == {"ann": "trained", "bob": "failed", "cy": "trained"}
    assert "bob breaks the pass" in out["bob"]["error"]


def test_batched_job_trains_what_train_users_batched_trains(base_dir, tmp_path):
    """The job hands ``train_users_batched`` the config's data, seed, epochs and optimiser settings,
    and publishes exactly the state dict it produced (no dropout, so no random masks)."""
    import torch
    from safetensors.torch import load_file

    from oppu.models import encode_sample, load_model
    from oppu.store import AdapterKey, AdapterStore
    from oppu.tasks import get_task
    from oppu.training.batched import train_users_batched
    from oppu.training.samples import personal_samples

    users = [movie_user("ann", 9), movie_user("bob", 6, offset=1)]
    actor = _trainer(base_dir, tmp_path / "store", "batched", "users.peft.dropout=0.0")
    assert {r["status"] for r in _rows(actor(_batch(users))).values()} == {"trained"}
    cfg = actor.cfg
    model, tokenizer = load_model(str(base_dir))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    samples = [(u.user_id, [encode_sample(tokenizer, s, cfg.users.optim.max_length)
                            for s in personal_samples(get_task("LaMP-2M"), u)]) for u in users]
    expected = train_users_batched(model, tokenizer, samples, cfg.users.peft.to_peft_config(), cfg.users.optim,
                                   cfg.seed, epochs=2, tokens_per_forward=1024)
    store = AdapterStore(str(tmp_path / "store"))
    for user in ("ann", "bob"):
        published = load_file(store.fetch(AdapterKey("LaMP-2M", actor.fingerprint, "oppu", user),
                                          tmp_path / "fetch" / user) / "adapter_model.safetensors")
        assert published.keys() == expected[user].keys()
        for name, tensor in expected[user].items():
            torch.testing.assert_close(published[name], tensor, rtol=1e-4, atol=2e-6, msg=name)


def test_batched_trainer_config_is_checked():
    from oppu.config import load_config
    from oppu.errors import ConfigError
    from oppu.run_config import RunConfig

    with pytest.raises(ConfigError, match="LoRA only"):
        load_config(RunConfig, None, ["users.trainer=batched", "users.peft.method=ia3"])
    with pytest.raises(ConfigError, match="tokens_per_forward"):
        load_config(RunConfig, None, ["users.trainer=batched", "users.batched.tokens_per_forward=512"])
    with pytest.raises(ConfigError):
        load_config(RunConfig, None, ["users.trainer=together"])
    assert load_config(RunConfig).users.trainer == "per-user"


def test_base_precision_fp8_swaps_the_actors_base_once_for_both_trainers(base_dir, tmp_path, monkeypatch):
    import functools

    import torch

    from oppu.errors import ConfigError
    from oppu.models import fp8

    if torch.cuda.is_available():
        pytest.skip("CUDA is visible: the actor would train on it")
    gpu_actor = ("users.base_precision=fp8", "users.num_gpus_per_actor=1")
    with pytest.raises(ConfigError, match="CUDA GPU with FP8 tensor cores"):  # no GPU: the actor's base is on CPU
        _trainer(base_dir, tmp_path / "store", "batched", *gpu_actor)
    if not fp8._cpu_scaled_mm_works():
        return
    # This torch runs _scaled_mm on the CPU: let the actor take it, and train through the FP8 base.
    monkeypatch.setattr(fp8, "set_base_precision", functools.partial(fp8.set_base_precision, allow_cpu=True))
    for trainer_name in ("batched", "per-user"):
        trainer = _trainer(base_dir, tmp_path / trainer_name, trainer_name, *gpu_actor)
        q_proj = trainer.model.get_decoder().layers[0].self_attn.q_proj
        assert isinstance(q_proj, fp8.Fp8BaseLinear)
        rows = _rows(trainer(_batch([movie_user("ann", 6), movie_user("bob", 5, offset=1)])))
        assert {u: r["status"] for u, r in rows.items()} == {"ann": "trained", "bob": "trained"}
        assert trainer.model.get_decoder().layers[0].self_attn.q_proj is q_proj  # LoRA taken out again
