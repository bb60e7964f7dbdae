"""Scheduling faults of jobs/train_users.py on a local Ray: a PersonalTrainer actor is SIGKILLed
mid-batch, right after it published the first user of its batch. Ray restarts the actor and
re-runs the batch; the store's skip-existing keeps the re-run from publishing that user again.
Every user must end with exactly one complete adapter version, and a second run skips them all.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TASK = "LaMP-2M"
TINY = ["tiny.hidden_size=64", "tiny.num_layers=2", "tiny.num_heads=4", "tiny.num_kv_heads=4",
        "tiny.intermediate_size=128", "tiny.vocab_size=800", "tiny.pretrain_steps=20"]
PUBLISH_LOG = "OPPU_TEST_PUBLISH_LOG"


def log_publishes() -> None:
    """Ray worker setup hook: every adapter a worker publishes appends ``pid user version``, then
    the worker pauses a moment, so a kill on seeing that line lands before the task can end."""
    path = os.environ.get(PUBLISH_LOG)
    from oppu.store import AdapterStore

    real = AdapterStore.publish
    if not path or getattr(real, "logs_publishes", False):
        return

    def publish(self, key, *args, **kwargs):
        manifest = real(self, key, *args, **kwargs)
        with open(path, "a") as log:
            log.write(f"{os.getpid()} {key.user} {manifest.version}\n")
        time.sleep(0.5)
        return manifest

    publish.logs_publishes = True
    AdapterStore.publish = publish


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Prepared synthetic data and a tiny model standing in for the task-adapted base (no Ray)."""
    from oppu import cli
    from oppu.data.dataset import read_dataset
    from oppu.models import TinyModelConfig, build_tiny_base
    from oppu.training.samples import pretraining_corpus

    out = tmp_path_factory.mktemp("run")
    lamp = out / "data" / "lamp"
    assert cli.main(["synth", "--task", TASK, "--users", "10", "--seed", "5", "--n-test", "6",
                     "--out", str(lamp)]) == 0
    assert cli.main(["prepare", "--task", TASK, "--questions", str(lamp / "questions.json"),
                     "--outputs", str(lamp / "outputs.json"), "--n-test", "6", "--out", str(out / "data")]) == 0
    dataset = read_dataset(out / "data")
    config = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=128,
                             vocab_size=800, pretrain_steps=20)
    build_tiny_base(pretraining_corpus(dataset.task, dataset.base_users()), out / "base", config, seed=0)
    return out


@pytest.fixture(scope="module")
def ray_with_publish_log(tmp_path_factory):
    import ray

    log = tmp_path_factory.mktemp("faults") / "publishes.txt"
    log.touch()
    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True,
             # PYTHONPATH: workers import this module to run the hook
             runtime_env={"worker_process_setup_hook": log_publishes, "env_vars": {
                 PUBLISH_LOG: str(log),
                 "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield log
    ray.shutdown()


def _config(run_dir: Path, store: Path, trainer: str):
    from oppu.config import load_config
    from oppu.pipeline import PACKAGED_CONFIGS
    from oppu.run_config import RunConfig

    return load_config(RunConfig, PACKAGED_CONFIGS / "quickstart.yaml", [
        f"task={TASK}", f"run_dir={run_dir}", f"store={store}", *TINY, "users.variants=[oppu]",
        f"users.trainer={trainer}", "users.actors=2", "users.users_per_batch=2", "users.optim.epochs=1",
        "users.optim.max_length=256", "users.batched.tokens_per_forward=2048", "ray.num_cpus=2"])


def _publishes(log: Path) -> list[tuple[int, str, str]]:
    lines = [line.split() for line in log.read_text().splitlines() if line.strip()]
    return [(int(pid), user, version) for pid, user, version in lines]


def _kill_first_publisher(log: Path, killed: dict, stop: threading.Event) -> None:
    """SIGKILL the first actor process that publishes an adapter, the moment it has."""
    while not stop.is_set():
        publishes = _publishes(log)
        if publishes:
            pid, user, version = publishes[0]
            os.kill(pid, signal.SIGKILL)
            killed.update(pid=pid, user=user, version=version, published_then=publishes)
            return
        time.sleep(0.02)


def test_actor_killed_mid_batch_every_user_gets_exactly_one_adapter(run_dir, ray_with_publish_log, tmp_path,
                                                                     monkeypatch):
    """Per-user trainer (the CPU default); the batched trainer's re-executed batch is covered in
    tests/unit/training/test_users.py (the skip logic is shared), its Ray run in test_batched_trainer_job."""
    from oppu.data.dataset import read_dataset
    from oppu.models import base_fingerprint
    from oppu.store import AdapterKey, AdapterStore
    from oppu.training.users import train_personal_adapters
    from oppu.training.users_report import load_report

    log = ray_with_publish_log
    log.write_text("")
    store_root = tmp_path / "store"
    trainer = "per-user"
    cfg = _config(run_dir, store_root, trainer)
    test_users = sorted(u.user_id for u in read_dataset(run_dir / "data").test_users())

    killed: dict = {}
    stop = threading.Event()
    killer = threading.Thread(target=_kill_first_publisher, args=(log, killed, stop), daemon=True)
    killer.start()
    try:
        results = train_personal_adapters(cfg, "oppu")
    finally:
        stop.set()
        killer.join()

    # The kill landed mid-task: the killed actor had published one adapter and was still in
    # the publish call (the hook's pause), so its batch had not returned.
    assert killed, "no actor published an adapter"
    assert [pid for pid, _, _ in killed["published_then"]].count(killed["pid"]) == 1

    # The job finished with every user, none failed; the killed actor's batch was re-run and
    # found its first user's adapter in the store.
    by_user = {r.user_id: r for r in results}
    assert sorted(by_user) == test_users and len(results) == len(test_users)
    assert {r.status for r in results} <= {"trained", "skipped"}, [r.error for r in results if r.error]
    assert by_user[killed["user"]].status == "skipped"
    assert by_user[killed["user"]].version == killed["version"]

    # Exactly one publish per user over the whole run, and exactly one complete, verified version.
    published = [user for _, user, _ in _publishes(log)]
    assert sorted(published) == test_users
    store = AdapterStore(str(store_root))
    fingerprint = base_fingerprint(str(run_dir / "base"))
    versions = {}
    for user in test_users:
        key = AdapterKey(TASK, fingerprint, "oppu", user)
        versions[user] = store.versions(key)
        assert len(versions[user]) == 1, (user, versions[user])
        manifest, files = store.read_files(key)  # raises unless every file matches its sha256
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
        assert manifest.train_config.get("trainer", "per-user") == trainer

    # A second run skips them all and publishes nothing, found in the store by the driver: no
    # actor pool starts (one would load the base only to skip everyone).
    log.write_text("")
    import oppu.actor_pools

    def no_pool(*args, **kwargs):
        raise AssertionError("an actor pool started although every user's adapter was in the store")

    monkeypatch.setattr(oppu.actor_pools, "map_users", no_pool)
    again = train_personal_adapters(cfg, "oppu")
    assert {r.user_id: (r.status, r.version) for r in again} == {u: ("skipped", versions[u][0]) for u in test_users}
    assert _publishes(log) == []
    assert load_report(str(run_dir), "oppu")["skipped"] == len(test_users)


def test_batched_trainer_job(run_dir, ray_with_publish_log, tmp_path):
    """users.trainer=batched through the Ray Data job: every user published once, in PEFT format."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from oppu.data.dataset import read_dataset
    from oppu.models import base_fingerprint
    from oppu.store import AdapterKey, AdapterStore
    from oppu.training.users import train_personal_adapters

    log = ray_with_publish_log
    log.write_text("")
    store_root = tmp_path / "store"
    cfg = _config(run_dir, store_root, "batched")
    cfg.users.users_per_batch = 3
    test_users = sorted(u.user_id for u in read_dataset(run_dir / "data").test_users())
    # Two users first; the whole run then finds them in the store before its pool starts and
    # hands the pool only the others.
    cfg.users.users = test_users[:2]
    first = train_personal_adapters(cfg, "oppu")
    assert {r.user_id: r.status for r in first} == dict.fromkeys(test_users[:2], "trained")
    cfg.users.users = None
    results = train_personal_adapters(cfg, "oppu")
    assert {r.user_id: r.status for r in results} == {
        **dict.fromkeys(test_users, "trained"), **dict.fromkeys(test_users[:2], "skipped")}
    assert sorted(user for _, user, _ in _publishes(log)) == test_users
    store = AdapterStore(str(store_root))
    fingerprint = base_fingerprint(str(run_dir / "base"))
    for user in test_users:
        assert len(store.versions(AdapterKey(TASK, fingerprint, "oppu", user))) == 1
    adapter = store.fetch(AdapterKey(TASK, fingerprint, "oppu", test_users[0]), tmp_path / "fetched")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run_dir / "base"), adapter)
    assert any("lora_B" in name and p.abs().sum() > 0 for name, p in model.named_parameters())
