"""Mixed-adapter batches decode exactly like each user's PEFT model alone."""

from __future__ import annotations

import pytest
import torch

from oppu.errors import AdapterIntegrityError
from oppu.serving.adapters import AdapterShape, decode_adapter
from oppu.serving.engine import GenerationEngine, GenerationRow, LoraSlotsConfig
from oppu.store import AdapterKey, AdapterStore
from tests.unit.serving.tiny_setup import (
    build_tiny_base,
    load_tiny_base,
    make_user_adapter,
    peft_greedy,
    publish_adapter,
)

PROMPTS = ["the movie about love", "a dark space story with a robot hero", "king"]
FINGERPRINT = "tinybase00000000"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    base = build_tiny_base(root / "base")
    adapters = {user: make_user_adapter(base, root / f"adapter-{user}", seed=i, rank=4 + 4 * (i % 2))
                for i, user in enumerate(["u1", "u2", "u3"])}
    store = AdapterStore(str(root / "store"))
    shape = AdapterShape(FINGERPRINT, max_rank=8, target_modules=("q_proj", "v_proj"))
    loaded = {}
    for user, adapter_dir in adapters.items():
        publish_adapter(store, "LaMP-2M", FINGERPRINT, user, adapter_dir)
        manifest, files = store.read_files(AdapterKey("LaMP-2M", FINGERPRINT, "oppu", user))
        loaded[user] = decode_adapter(manifest, files, shape)
    return base, adapters, loaded


CASES = [("u1", PROMPTS[0]), ("u2", PROMPTS[1]), (None, PROMPTS[2]), ("u3", PROMPTS[0]), ("u2", PROMPTS[2])]


@pytest.fixture(scope="module")
def offline_answers(setup):
    """Each case answered as offline evaluation does: the user's PEFT model alone."""
    base, adapters, _ = setup
    return [peft_greedy(base, adapters[user] if user else None, [prompt], 8)[0] for user, prompt in CASES]


def make_engine(base, n_slots=3, static_cache=False):
    model, tokenizer = load_tiny_base(base)
    return GenerationEngine(model, tokenizer, LoraSlotsConfig(n_slots, 8, ("q_proj", "v_proj")),
                            static_cache=static_cache)


@pytest.mark.parametrize("static_cache", [False, True], ids=["dynamic-cache", "static-cache"])
def test_mixed_batch_equals_each_users_peft_model_alone(setup, offline_answers, static_cache):
    base, adapters, loaded = setup
    engine = make_engine(base, static_cache=static_cache)
    rows = [GenerationRow(engine.encode(prompt), loaded[user] if user else None, max_new_tokens=8)
            for user, prompt in CASES]
    outputs = [engine.decode(ids) for ids in engine.generate(rows)]
    assert outputs == offline_answers
    if static_cache:  # the same shapes reuse the static cache: it must start clean
        again = engine.generate(rows[::-1])
        assert [engine.decode(ids) for ids in again] == offline_answers[::-1]
        assert len(engine._decoders) == 1
    # Personalization is visible: the same prompt gives different answers for different users.
    assert outputs[0] != outputs[3]
    assert engine.slots.stats.misses == 3 and len(engine.slots.resident()) == 3


def test_slots_are_reused_least_recently_used_first(setup):
    base, _, loaded = setup
    engine = make_engine(base, n_slots=2)
    ids = engine.encode(PROMPTS[0])
    engine.generate([GenerationRow(ids, loaded["u1"], 2), GenerationRow(ids, loaded["u2"], 2)])
    engine.generate([GenerationRow(ids, loaded["u1"], 2)])  # u1 is now the most recent
    engine.generate([GenerationRow(ids, loaded["u3"], 2)])  # evicts u2, not u1
    assert set(engine.slots.resident()) == {loaded["u1"].cache_id, loaded["u3"].cache_id}
    assert (engine.slots.stats.hits, engine.slots.stats.misses) == (1, 3)
    with pytest.raises(ValueError, match="slots"):
        engine.generate([GenerationRow(ids, loaded[u], 2) for u in ("u1", "u2", "u3")])


def test_an_adapter_that_does_not_fit_fails_only_its_row(setup):
    base, adapters, loaded = setup
    engine = make_engine(base)
    broken = decode_adapter(loaded["u1"].manifest, {
        "adapter_config.json": (adapters["u1"] / "adapter_config.json").read_bytes(),
        "adapter_model.safetensors": (adapters["u1"] / "adapter_model.safetensors").read_bytes()},
        AdapterShape(FINGERPRINT, 8, ("q_proj", "v_proj")))
    broken.state_dict = {k: v[..., :3] if "lora_A" in k else v for k, v in broken.state_dict.items()}
    broken.version = "vbroken"
    ids = engine.encode(PROMPTS[1])
    steps = list(engine.stream([GenerationRow(ids, broken, 4), GenerationRow(ids, loaded["u2"], 4)]))
    assert isinstance(steps[0][0], AdapterIntegrityError)
    assert all(step[0] is None for step in steps[1:])
    healthy = [step[1] for step in steps[1:] if step[1] is not None]
    assert engine.decode(healthy) == peft_greedy(base, adapters["u2"], [PROMPTS[1]], 4)[0]
    assert broken.cache_id not in engine.slots.resident()


def test_adapter_for_another_base_is_refused(setup):
    _, adapters, loaded = setup
    files = {name: (adapters["u1"] / name).read_bytes()
             for name in ("adapter_config.json", "adapter_model.safetensors")}
    with pytest.raises(AdapterIntegrityError, match="trained on base"):
        decode_adapter(loaded["u1"].manifest, files, AdapterShape("otherbase0000000", 8, ("q_proj", "v_proj")))
    with pytest.raises(AdapterIntegrityError, match="rank"):
        decode_adapter(loaded["u2"].manifest, files | {"adapter_config.json": (
            adapters["u2"] / "adapter_config.json").read_bytes()}, AdapterShape(FINGERPRINT, 4, ("q_proj", "v_proj")))
    with pytest.raises(AdapterIntegrityError, match="unreadable"):
        decode_adapter(loaded["u1"].manifest, files | {"adapter_model.safetensors": b"garbage"},
                       AdapterShape(FINGERPRINT, 8, ("q_proj", "v_proj")))


def nan_adapter_files(adapter_dir, tensor_index: int = 0) -> tuple[dict[str, bytes], str]:
    """The adapter's files with one tensor set to NaN; and that tensor's name."""
    from safetensors.torch import load, save

    weights = load((adapter_dir / "adapter_model.safetensors").read_bytes())
    name = sorted(weights)[tensor_index]
    weights[name] = torch.full_like(weights[name], float("nan"))
    return {"adapter_config.json": (adapter_dir / "adapter_config.json").read_bytes(),
            "adapter_model.safetensors": save(weights)}, name


def test_a_nan_adapter_is_refused_with_a_422_naming_it(setup):
    from oppu.serving.http_errors import as_api_error

    _, adapters, loaded = setup
    files, name = nan_adapter_files(adapters["u1"])
    for zero_copy in (False, True):
        with pytest.raises(AdapterIntegrityError, match=f"user 'u1'.*NaN.*{name}") as raised:
            decode_adapter(loaded["u1"].manifest, files, AdapterShape(FINGERPRINT, 8, ("q_proj", "v_proj")),
                           zero_copy=zero_copy)
        error = as_api_error(raised.value)
        assert error.status == 422 and "u1" in error.message and loaded["u1"].version in error.message


@pytest.mark.parametrize("static_cache", [False, True], ids=["dynamic-cache", "static-cache"])
def test_nan_in_slot_0_and_another_slot_changes_no_other_answer(setup, offline_answers, static_cache):
    """A NaN adapter sitting in a slot (put there behind the loader's back) leaves the base rows,
    which gather slot 0, and other users' rows exactly as they were: select, do not scale by 0."""
    from oppu.models.multi_lora import multi_lora_layers

    base, _, loaded = setup
    engine = make_engine(base, n_slots=4, static_cache=static_cache)
    rows = [GenerationRow(engine.encode(prompt), loaded[user] if user else None, max_new_tokens=8)
            for user, prompt in CASES]
    engine.generate(rows)  # u1, u2, u3 take slots 3, 2, 1; slot 0 stays free
    poisoned = [slot for slot in range(4) if slot not in engine.slots._resident.values()] + [2]
    assert poisoned == [0, 2]
    with torch.no_grad():
        for layer in multi_lora_layers(engine.model).values():
            for slot in poisoned:
                layer.lora_A[slot] = float("nan")
                layer.lora_B[slot] = float("nan")
    # u2 now sits in a NaN slot: only its answers may change.
    keep = [i for i, (user, _) in enumerate(CASES) if user != "u2"]
    outputs = [engine.decode(ids) for ids in engine.generate([rows[i] for i in keep])]
    assert outputs == [offline_answers[i] for i in keep]
