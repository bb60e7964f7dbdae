"""Packed slot loading (one buffer per adapter) equals the per-tensor load; the one-token LoRA path
equals the batched matmuls; bad adapters are refused with the problem named."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from oppu.errors import AdapterError, AdapterIntegrityError  # noqa: E402
from oppu.models.multi_lora import (  # noqa: E402
    MultiLoraLinear,
    inject_multi_lora,
    load_peft_adapter_into_slot,
    multi_lora_layers,
)
from oppu.serving.lora import ServingLoraLinear, lora_delta_one_token, use_serving_layers  # noqa: E402
from oppu.serving.slot_packing import SafetensorsFile, SlotLayout, SlotLoader, pack_peft_adapter  # noqa: E402

VOCAB = 64
from tests.unit.tiny_models import tiny_llama  # noqa: E402


def peft_adapter(base, seed: int, r: int, alpha: float, targets=("q_proj", "v_proj")):
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                             init_lora_weights=False)
    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base), config)
    return peft.get_peft_model_state_dict(model), config


@pytest.fixture(scope="module")
def setup():
    base = tiny_llama(VOCAB, eos_token_id=1, bos_token_id=2)
    adapters = [peft_adapter(base, 10, r=8, alpha=8), peft_adapter(base, 11, r=4, alpha=16),
                peft_adapter(base, 12, r=8, alpha=4, targets=("q_proj",))]
    return base, adapters


def slots_model(base):
    model = copy.deepcopy(base)
    inject_multi_lora(model, ("q_proj", "v_proj"), n_slots=3, rank=8, alpha=8)
    return model


def slot_tensors(model, slot):
    return [(name, t[slot].clone()) for name, layer in multi_lora_layers(model).items()
            for t in (layer.lora_A, layer.lora_B, layer.scaling)]


def test_packed_load_equals_per_tensor_load_and_overwrites_everything(setup):
    base, adapters = setup
    reference, packed_model = slots_model(base), slots_model(base)
    loader = SlotLoader(packed_model)
    # Fill slot 1 with a full-rank adapter first: a lower-rank or partial adapter loaded over it
    # must leave no trace of it (zeroed rank columns, zeroed uncovered layers, new scaling).
    for state, config in [adapters[0], adapters[1], adapters[0], adapters[2]]:
        load_peft_adapter_into_slot(reference, 1, state, config)
        packed = pack_peft_adapter(loader.layout, state, config)
        loader.load(1, packed)
        for (name, expected), (_, got) in zip(slot_tensors(reference, 1), slot_tensors(packed_model, 1), strict=True):
            assert torch.equal(expected, got), name
    assert all(torch.count_nonzero(t) == 0 for _, t in slot_tensors(packed_model, 0)[:2])  # other slots untouched


def test_state_dict_views_share_the_packed_buffer(setup):
    base, adapters = setup
    layout = SlotLayout.of(slots_model(base))
    state, config = adapters[1]
    packed = pack_peft_adapter(layout, state, config)
    views = packed.state_dict
    assert views.keys() == state.keys()
    for key, tensor in state.items():
        assert torch.equal(views[key], tensor)
        assert views[key].untyped_storage().data_ptr() == packed.buffer.untyped_storage().data_ptr()
    assert packed.scaling == 4.0 and packed.buffer.numel() == layout.numel


@pytest.mark.parametrize("adapter", [0, 1, 2], ids=["rank8", "rank4", "q-only"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["same-dtype", "bf16-file"])
def test_packing_from_file_bytes_equals_packing_tensors(setup, adapter, dtype):
    from safetensors.torch import save

    base, adapters = setup
    layout = SlotLayout.of(slots_model(base))
    state, config = adapters[adapter]
    state = {k: v.to(dtype) for k, v in state.items()}
    from_file = pack_peft_adapter(layout, SafetensorsFile(save(state)), config)
    from_tensors = pack_peft_adapter(layout, state, config)
    assert torch.equal(from_file.buffer, from_tensors.buffer)
    assert dict(from_file.state_dict).keys() == state.keys()
    for key, tensor in state.items():
        assert torch.equal(from_file.state_dict[key], tensor)
        assert from_file.state_dict[key].dtype == tensor.dtype


def test_safetensors_file_reads_views_and_refuses_malformed_files():
    from safetensors.torch import save

    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.randn(7), "c": torch.zeros(0, 4)}
    data = save(tensors, metadata={"format": "pt"})
    file = SafetensorsFile(data)
    assert file.keys() == tensors.keys() and all(torch.equal(file[k], v) for k, v in tensors.items())
    header = int.from_bytes(data[:8], "little")
    for bad, problem in [(b"garbage", "shorter"), ((10**9).to_bytes(8, "little") + data[8:], "header length"),
                         (data[:8] + b"[" + data[9:], "JSON"), (data[:-4], "do not hold"),
                         (data.replace(b'"BF16"', b'"I8"  ', 1), "float dtype")]:
        with pytest.raises(ValueError, match=problem):
            SafetensorsFile(bad)
    assert header > 0


def test_bad_adapters_are_refused_when_packed_with_the_problem_named(setup):
    base, adapters = setup
    model = slots_model(base)
    layout = SlotLayout.of(model)
    state, config = adapters[0]
    with pytest.raises(AdapterError, match="k_proj"):
        pack_peft_adapter(layout, {k.replace("q_proj", "k_proj"): v for k, v in state.items()}, config)
    with pytest.raises(AdapterError, match="rank <= 8"):
        pack_peft_adapter(layout, {k: torch.zeros(16, v.shape[1]) if "lora_A" in k else torch.zeros(v.shape[0], 16)
                                   for k, v in state.items()}, config)
    with pytest.raises(AdapterError, match="needs lora_A and lora_B"):
        pack_peft_adapter(layout, {k: v for k, v in state.items() if "lora_B" not in k}, config)
    with pytest.raises(AdapterError, match="not a PEFT LoRA weight"):
        pack_peft_adapter(layout, {"garbage": torch.zeros(1)}, config)
    with pytest.raises(AdapterError, match="use_dora"):
        pack_peft_adapter(layout, state, peft.LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj"], use_dora=True))
    other = copy.deepcopy(base)
    inject_multi_lora(other, ("q_proj",), n_slots=3, rank=8, alpha=8)
    with pytest.raises(AdapterError, match="another model"):
        SlotLoader(model).load(0, pack_peft_adapter(SlotLayout.of(other), {}, config))
    with pytest.raises(ValueError, match="outside"):
        SlotLoader(model).load(3, pack_peft_adapter(layout, state, config))


def test_one_token_path_equals_the_batched_matmuls():
    torch.manual_seed(0)
    layer = MultiLoraLinear(torch.nn.Linear(24, 40), n_slots=5, rank=8, alpha=8)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
        layer.scaling.copy_(torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0]))
    slot_ids = torch.tensor([3, -1, 0, 3, 4, 1])
    x = torch.randn(6, 1, 24)
    layer.slot_ids = slot_ids
    with torch.no_grad():
        expected = layer(x)
        delta = lora_delta_one_token(x[:, 0], layer.lora_A, layer.lora_B, layer.scaling, slot_ids)
        assert torch.count_nonzero(delta[1]) == 0
        layer.__class__ = ServingLoraLinear
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        prompt = torch.randn(6, 3, 24)  # several tokens: the parent's path, unchanged
        assert torch.equal(layer(prompt), MultiLoraLinear.forward(layer, prompt))


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_the_compiled_one_token_update_equals_the_eager_one_at_every_width_and_batch():
    # compile_lora_decode compiles once with dynamic shapes: layers of other widths and batches of
    # other sizes must reuse it and answer as the eager form does (a base row's zero included).
    from oppu.serving import lora as serving_lora

    compiled = serving_lora._compiled_delta_one_token()
    assert serving_lora._compiled_delta_one_token() is compiled
    generator = torch.Generator().manual_seed(1)
    for batch, width_in, width_out in ((6, 24, 40), (2, 24, 40), (9, 40, 16)):
        lora_a = torch.randn(5, 8, width_in, generator=generator)
        lora_b = torch.randn(5, width_out, 8, generator=generator)
        scaling = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0])
        slot_ids = torch.randint(-1, 5, (batch,), generator=generator)
        slot_ids[0] = -1
        rows = torch.randn(batch, width_in, generator=generator)
        expected = lora_delta_one_token(rows, lora_a, lora_b, scaling, slot_ids)
        actual = compiled(rows, lora_a, lora_b, scaling, slot_ids)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
        assert torch.count_nonzero(actual[0]) == 0


def test_use_serving_layers_swaps_every_layer_in_place(setup):
    base, _ = setup
    model = slots_model(base)
    before = {name: layer.lora_A for name, layer in multi_lora_layers(model).items()}
    assert use_serving_layers(model) == 4
    after = multi_lora_layers(model)
    assert all(type(layer) is ServingLoraLinear and layer.lora_A is before[name] for name, layer in after.items())
    assert not any(layer.compile_one_token for layer in after.values())
    use_serving_layers(model, compile_one_token=True)
    assert all(layer.compile_one_token for layer in multi_lora_layers(model).values())


def test_prepare_packs_once_and_refuses_what_does_not_fit(tmp_path):
    from oppu.serving.adapters import AdapterShape, decode_adapter
    from oppu.serving.engine import GenerationEngine, LoraSlotsConfig
    from oppu.store import AdapterKey, AdapterStore
    from tests.unit.serving.tiny_setup import (
        build_tiny_base,
        load_tiny_base,
        make_user_adapter,
        publish_adapter,
    )

    base = build_tiny_base(tmp_path / "base")
    store = AdapterStore(str(tmp_path / "store"))
    publish_adapter(store, "LaMP-2M", "tinybase00000000", "u1", make_user_adapter(base, tmp_path / "a1", seed=1))
    manifest, files = store.read_files(AdapterKey("LaMP-2M", "tinybase00000000", "oppu", "u1"))
    shape = AdapterShape("tinybase00000000", 8, ("q_proj", "v_proj"))
    model, tokenizer = load_tiny_base(base)
    engine = GenerationEngine(model, tokenizer, LoraSlotsConfig(2, 8, ("q_proj", "v_proj")))
    adapter = decode_adapter(manifest, files, shape)
    original = {k: v.clone() for k, v in adapter.state_dict.items()}
    engine.prepare_adapter(adapter)
    packed = adapter.packed
    assert packed is not None and packed.layout == engine.slots.loader.layout
    assert all(torch.equal(adapter.state_dict[k], v) for k, v in original.items())
    engine.prepare_adapter(adapter)
    assert adapter.packed is packed  # once per host-cached version
    broken = decode_adapter(manifest, files, shape)
    broken.state_dict = {k: v[..., :3] if "lora_A" in k else v for k, v in broken.state_dict.items()}
    with pytest.raises(AdapterIntegrityError, match="user 'u1'.*lora_A"):
        engine.prepare_adapter(broken)

    # Through the host tier: packed straight from the downloaded bytes, once, as it enters.
    import asyncio

    from oppu.serving.adapters import AdapterCache

    def cache(prepare):
        return AdapterCache(store, task="LaMP-2M", variant="oppu", shape=shape, capacity=2, check_ttl_s=60.0,
                            prepare=prepare)

    cached = asyncio.run(cache(engine.prepare_adapter).get("u1"))
    assert cached.packed is not None and torch.equal(cached.packed.buffer, packed.buffer)
    assert all(torch.equal(cached.state_dict[k], v) for k, v in original.items())

    def refuse(adapter):
        raise AdapterIntegrityError(f"adapter of user {adapter.user!r} does not fit")

    refusing = cache(refuse)
    with pytest.raises(AdapterIntegrityError, match="does not fit"):
        asyncio.run(refusing.get("u1"))
    assert refusing.cached_users() == []


class UnpinnedBuffers:
    """``PinnedBuffers`` on a machine without CUDA: the same pool, plain host memory."""

    @staticmethod
    def make(layout):
        from oppu.serving.slot_packing import PinnedBuffers

        class Pool(PinnedBuffers):
            def _grow(self, n):
                slab = torch.empty(n * self.numel, dtype=self.dtype)
                self._free.extend((slab[i * self.numel:(i + 1) * self.numel], [None]) for i in range(n))
                self.slabs += 1

        return Pool(layout.numel, layout.dtype, per_slab=2)


def test_pooled_buffers_come_back_when_the_packed_adapter_goes_and_after_a_refusal(setup):
    import gc

    base, adapters = setup
    layout = SlotLayout.of(slots_model(base))
    pool = UnpinnedBuffers.make(layout)
    pool.reserve(2)
    state, config = adapters[0]
    first = pack_peft_adapter(layout, state, config, pool=pool)
    second = pack_peft_adapter(layout, adapters[1][0], adapters[1][1], pool=pool)
    assert pool.slabs == 1 and not pool._free
    reference = pack_peft_adapter(layout, state, config)
    assert torch.equal(first.buffer, reference.buffer)
    address = first.buffer.data_ptr()
    del first
    gc.collect()
    assert [b.data_ptr() for b, _ in pool._free] == [address]
    with pytest.raises(AdapterError, match="rank <= 8"):
        pack_peft_adapter(layout, {k: torch.zeros(16, v.shape[1]) if "lora_A" in k else torch.zeros(v.shape[0], 16)
                                   for k, v in state.items()}, config, pool=pool)
    assert [b.data_ptr() for b, _ in pool._free] == [address]  # the refused adapter's buffer came back
    third = pack_peft_adapter(layout, state, config, pool=pool)
    assert third.buffer.data_ptr() == address and torch.equal(third.buffer, reference.buffer)
    assert pool.slabs == 1 and second.buffer.data_ptr() != address


def test_the_engines_decode_steps_take_the_one_token_path(setup, monkeypatch):
    """Layers injected after ``model.eval()`` start in training mode; the engine must not leave them so."""
    from types import SimpleNamespace

    import oppu.serving.lora as serving_lora
    from oppu.serving.engine import GenerationEngine, GenerationRow, LoraSlotsConfig

    base, _ = setup
    model = copy.deepcopy(base)
    model.generation_config.eos_token_id = None
    engine = GenerationEngine(model, SimpleNamespace(pad_token_id=0, eos_token_id=None),
                              LoraSlotsConfig(2, 8, ("q_proj", "v_proj")), static_cache=True)
    assert all(type(layer) is ServingLoraLinear and not layer.training
               for layer in multi_lora_layers(model).values())
    calls = []
    original = serving_lora.lora_delta_one_token
    monkeypatch.setattr(serving_lora, "lora_delta_one_token", lambda *a: calls.append(1) or original(*a))
    engine.generate([GenerationRow([5, 6, 7], None, 3)])
    assert len(calls) == 2 * 4  # 2 decode steps (the 3rd token is never fed back) x 4 adapted layers
