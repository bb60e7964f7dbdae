"""Per-row multi-LoRA must compute exactly what PEFT computes with each row's adapter alone."""

from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from oppu.errors import AdapterError  # noqa: E402
from oppu.models.multi_lora import (  # noqa: E402
    NO_ADAPTER,
    clear_slot,
    inject_multi_lora,
    load_peft_adapter_into_slot,
    model_adapters,
)
from oppu.models.slot_export import export_slot_as_peft, save_slot_as_peft  # noqa: E402

VOCAB = 64
from tests.unit.tiny_models import one_thread, tiny_llama  # noqa: E402, F401

pytestmark = pytest.mark.usefixtures("one_thread")


def random_peft_adapter(base, seed: int, r: int, alpha: float, targets=("q_proj", "v_proj")):
    """A PeftModel over a copy of ``base`` with random (nonzero) A and B, and its saved state dict."""
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                             init_lora_weights=False)
    torch.manual_seed(seed)
    peft_model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    return peft_model, peft.get_peft_model_state_dict(peft_model), config


@pytest.fixture(scope="module")
def setup():
    base = tiny_llama(VOCAB, eos_token_id=1, bos_token_id=2)
    adapters = [random_peft_adapter(base, 10, r=8, alpha=8),
                random_peft_adapter(base, 11, r=4, alpha=16),  # lower rank than the slots
                random_peft_adapter(base, 12, r=8, alpha=4, targets=("q_proj",))]
    multi = copy.deepcopy(base)
    layers = inject_multi_lora(multi, ("q_proj", "v_proj"), n_slots=3, rank=8, alpha=8)
    for slot, (_, state, config) in enumerate(adapters):
        load_peft_adapter_into_slot(multi, slot, state, config)
    return base, adapters, multi, layers


def reference_row(base, adapters, slot: int):
    return base if slot == NO_ADAPTER else adapters[slot][0]


def test_inject_wraps_every_target_and_freezes_base(setup):
    _, _, multi, layers = setup
    assert len(layers) == 4  # q_proj and v_proj in 2 layers
    trainable = {name for name, p in multi.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in multi.named_parameters() if n.endswith(("lora_A", "lora_B"))}


def test_mixed_batch_logits_equal_peft_row_by_row(setup):
    base, adapters, multi, _ = setup
    slot_ids = [0, 1, 2, NO_ADAPTER, 1, 0]
    input_ids = torch.randint(3, VOCAB, (len(slot_ids), 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), model_adapters(multi, slot_ids):
        logits = multi(input_ids=input_ids).logits
    for row, slot in enumerate(slot_ids):
        with torch.no_grad():
            expected = reference_row(base, adapters, slot)(input_ids=input_ids[row:row + 1]).logits[0]
        torch.testing.assert_close(logits[row], expected, rtol=1e-5, atol=1e-5)
    # Outside the context the layers are the bare base again.
    with torch.no_grad():
        torch.testing.assert_close(multi(input_ids=input_ids).logits, base(input_ids=input_ids).logits)


def test_adapters_actually_change_the_output(setup):
    base, _, multi, _ = setup
    input_ids = torch.randint(3, VOCAB, (3, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), model_adapters(multi, [0, 1, 2]):
        logits = multi(input_ids=input_ids).logits
    with torch.no_grad():
        bare = base(input_ids=input_ids).logits
    for row in range(3):
        assert (logits[row] - bare[row]).abs().max() > 1e-3


def test_mixed_batch_greedy_generation_equals_peft(setup):
    base, adapters, multi, _ = setup
    slot_ids = [2, NO_ADAPTER, 0, 1]
    input_ids = torch.randint(3, VOCAB, (len(slot_ids), 5), generator=torch.Generator().manual_seed(3))
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad(), model_adapters(multi, slot_ids):
        generated = multi.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    for row, slot in enumerate(slot_ids):
        row_ids = input_ids[row:row + 1]
        with torch.no_grad():
            expected = reference_row(base, adapters, slot).generate(
                input_ids=row_ids, attention_mask=torch.ones_like(row_ids), **kwargs)
        assert generated[row].tolist() == expected[0].tolist()


def test_gradients_reach_only_the_rows_slots(setup):
    _, _, multi, layers = setup
    model = copy.deepcopy(multi).train()
    input_ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    with model_adapters(model, [0, 2]):
        model(input_ids=input_ids).logits.sum().backward()
    for layer in (m for m in model.modules() if m.__class__.__name__ == "MultiLoraLinear"):
        slot_norms = layer.lora_B.grad.flatten(1).norm(dim=1)
        assert slot_norms[0] > 0 and slot_norms[1] == 0


def test_export_round_trips_through_peft_from_pretrained(setup, tmp_path):
    base, adapters, multi, _ = setup
    _, saved_state, config = adapters[1]
    exported = export_slot_as_peft(multi, 1, config)
    assert {k: tuple(v.shape) for k, v in exported.items()} == {k: tuple(v.shape) for k, v in saved_state.items()}
    for key, tensor in saved_state.items():
        torch.testing.assert_close(exported[key], tensor)
    adapter_dir = save_slot_as_peft(multi, 1, config, tmp_path / "user-1")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).eval()
    input_ids = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), model_adapters(multi, [1]):
        expected = multi(input_ids=input_ids).logits
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_clear_slot_gives_the_bare_base(setup):
    base, _, multi, _ = setup
    model = copy.deepcopy(multi)
    clear_slot(model, 0)
    input_ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), model_adapters(model, [0]):
        torch.testing.assert_close(model(input_ids=input_ids).logits, base(input_ids=input_ids).logits)


def test_bad_adapters_are_refused_with_the_layer_named(setup):
    _, adapters, multi, _ = setup
    _, state, config = adapters[0]
    model = copy.deepcopy(multi)
    renamed = {k.replace("q_proj", "k_proj"): v for k, v in state.items()}
    with pytest.raises(AdapterError, match="k_proj"):
        load_peft_adapter_into_slot(model, 0, renamed, config)
    too_wide = {k: torch.zeros(16, v.shape[1]) if "lora_A" in k else torch.zeros(v.shape[0], 16)
                for k, v in state.items()}
    with pytest.raises(AdapterError, match="rank <= 8"):
        load_peft_adapter_into_slot(model, 0, too_wide, config)
    with pytest.raises(ValueError, match="slot_ids"):
        with model_adapters(model, [3]):
            pass
