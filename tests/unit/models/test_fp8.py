"""FP8 GEMMs for the frozen base (oppu.models.fp8), on the CPU.

This torch runs ``torch._scaled_mm`` on the CPU, so the module's own products are checked here: equal
to the emulation (the dequantized operands multiplied in float32) to float32 rounding, and within
FP8's error of the full-precision layer. Tolerances: e4m3 keeps 3 mantissa bits (a relative step
of 2^-4 at most per element), so a product of two quantized operands over random data lands at a
relative (Frobenius) error of about 3%; the bound is 6% for e4m3 operands and 8% for an e5m2
gradient (2 mantissa bits). The same checks on CUDA, against bf16: tests/gpu/test_fp8_gpu.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

from oppu.errors import ConfigError
from oppu.models import fp8
from oppu.models.fp8 import (
    E4M3,
    E5M2,
    Fp8BaseLinear,
    base_linears,
    fp8_input_grad_emulated,
    fp8_linear_emulated,
    quantize,
    restore_base_linears,
    scaled_mm,
    scaled_mm_emulated,
    set_base_precision,
    use_fp8_base,
)

pytestmark = pytest.mark.skipif(not fp8._cpu_scaled_mm_works(), reason="this torch has no CPU _scaled_mm")

FORWARD_TOLERANCE = 0.06
GRAD_TOLERANCE = {"row": 0.06, "tensor": 0.08}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().float(), expected.detach().float()
    return float((actual - expected).norm() / expected.norm())


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("rowwise", [True, False])
def test_quantize_round_trips_within_one_fp8_step(dtype, rowwise):
    torch.manual_seed(0)
    x = torch.randn(8, 64) * torch.logspace(-2, 2, 8)[:, None]  # rows of very different ranges
    codes, scale = quantize(x, dtype, rowwise)
    assert codes.dtype == dtype and scale.dtype == torch.float32
    assert scale.shape == ((8, 1) if rowwise else ())
    back = codes.float() * scale
    mantissa_bits = 3 if dtype == E4M3 else 2
    # Round to nearest: half a step of the element's binade, and no finer than the format's
    # smallest subnormal times the scale for elements near zero.
    step = 2.0 ** -(mantissa_bits + 1)
    floor = scale * (2.0 ** -9 if dtype == E4M3 else 2.0 ** -16)
    assert bool(((back - x).abs() <= step * x.abs() + floor).all())
    # The abs-max maps to the format's largest value: nothing saturates.
    assert bool((codes.float().abs().amax(dim=-1) <= fp8.FP8_MAX[dtype]).all())


def test_an_all_zero_row_quantizes_to_zeros_not_nan():
    codes, scale = quantize(torch.zeros(2, 16), E4M3, True)
    assert bool(torch.isfinite(scale).all()) and bool((codes.float() == 0).all())


@pytest.mark.parametrize("rowwise", [True, False])
def test_scaled_mm_is_the_product_of_the_dequantized_operands(rowwise):
    torch.manual_seed(1)
    a, a_scale = quantize(torch.randn(24, 64), E4M3, rowwise)
    b, b_scale = quantize(torch.randn(48, 64), E4M3, rowwise)
    torch.testing.assert_close(scaled_mm(a, a_scale, b, b_scale, torch.float32),
                               scaled_mm_emulated(a, a_scale, b, b_scale, torch.float32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recipe", ["row", "tensor"])
@pytest.mark.parametrize("bias", [False, True])
def test_layer_output_and_input_gradient_match_the_full_precision_layer(recipe, bias):
    torch.manual_seed(2)
    linear = torch.nn.Linear(64, 48, bias=bias)
    layer = Fp8BaseLinear.from_linear(linear, recipe)
    x = torch.randn(3, 10, 64, requires_grad=True)
    grad = torch.randn(3, 10, 48)

    out = layer(x)
    (grad_x,) = torch.autograd.grad(out, x, grad)
    expected = linear(x)
    (expected_grad_x,) = torch.autograd.grad(expected, x, grad)

    assert out.shape == expected.shape and grad_x.shape == x.shape
    assert relative_error(out, expected) < FORWARD_TOLERANCE
    assert relative_error(grad_x, expected_grad_x) < GRAD_TOLERANCE[recipe]
    # ... and exactly what the emulated FP8 arithmetic gives (float32 rounding apart)
    emulated = fp8_linear_emulated(layer, x.detach()) + (linear.bias if bias else 0)
    torch.testing.assert_close(out, emulated, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_x, fp8_input_grad_emulated(layer, grad), rtol=1e-5, atol=1e-5)


def test_the_weight_never_gets_a_gradient():
    linear = torch.nn.Linear(32, 16, bias=False)
    layer = Fp8BaseLinear.from_linear(linear)
    x = torch.randn(4, 32, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight is linear.weight and not layer.weight.requires_grad and layer.weight.grad is None
    assert x.grad is not None


def test_sibling_layers_fed_one_input_quantize_it_once(monkeypatch):
    calls = []
    original = fp8._quantize
    monkeypatch.setattr(fp8, "_quantize", lambda x, *a: calls.append(x.shape) or original(x, *a))
    q, k = (Fp8BaseLinear.from_linear(torch.nn.Linear(32, 16, bias=False)) for _ in range(2))
    x = torch.randn(2, 5, 32)
    q(x), k(x)
    assert len(calls) == 1
    k(x.clone())  # another tensor: quantized afresh
    x.mul_(2)  # the same tensor changed in place: too
    q(x)
    assert len(calls) == 3


@pytest.fixture
def tiny():
    from tests.unit.tiny_models import tiny_llama

    return tiny_llama(48, intermediate_size=48).requires_grad_(False)


def test_use_fp8_base_swaps_the_decoders_linears_only_and_restores_them(tiny):
    reference = copy.deepcopy(tiny)
    originals = base_linears(tiny)
    state_keys = list(tiny.state_dict())
    swapped = use_fp8_base(tiny, allow_cpu=True)

    assert sorted(swapped) == sorted(originals)  # 7 per layer
    assert len(swapped) == 14 and all(name.startswith("model.layers.") for name in swapped)
    assert type(tiny.lm_head) is torch.nn.Linear
    assert all(isinstance(tiny.get_submodule(name), Fp8BaseLinear) for name in swapped)
    assert list(tiny.state_dict()) == state_keys  # the FP8 copies are not part of the model's state
    ids = torch.randint(3, 48, (2, 12))
    assert relative_error(tiny(ids).logits, reference(ids).logits) < 0.1

    assert restore_base_linears(tiny) == 14
    assert all(tiny.get_submodule(name) is module for name, module in originals.items())
    torch.testing.assert_close(tiny(ids).logits, reference(ids).logits)


def test_a_layer_whose_sizes_are_not_multiples_of_16_stays_as_it_is():
    from tests.unit.tiny_models import tiny_llama

    model = tiny_llama(48, intermediate_size=40)  # gate/up/down: 40 wide
    swapped = use_fp8_base(model, allow_cpu=True)
    assert not any(name.endswith(("gate_proj", "up_proj", "down_proj")) for name in swapped)
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear


def test_lora_trains_over_an_fp8_base_and_is_left_out_of_the_swap(tiny):
    peft = pytest.importorskip("peft")

    use_fp8_base(tiny, allow_cpu=True)
    model = peft.get_peft_model(tiny, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, Fp8BaseLinear)
    ids = torch.randint(3, 48, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n and p.grad is not None for n, p in trained.items())
    assert all(bool(p.grad.abs().sum() > 0) for n, p in trained.items() if "lora_B" in n)  # A's: 0 while B is
    assert not any("lora_" in name for name in base_linears(model))  # a second swap leaves LoRA alone
    model.base_model.unload()
    assert restore_base_linears(tiny) == 14


def test_set_base_precision_and_where_fp8_is_refused(tiny):
    assert set_base_precision(tiny, "bf16") == []
    with pytest.raises(ConfigError, match="CUDA GPU with FP8 tensor cores"):
        set_base_precision(tiny, "fp8")  # the CPU is allowed only where asked for (tests, the bench's smoke run)
    with pytest.raises(ConfigError, match="bf16, fp8 or fp8-tensor"):
        set_base_precision(tiny, "int8")
    assert len(set_base_precision(tiny, "fp8-tensor", allow_cpu=True)) == 14
    assert not tiny.model.layers[0].self_attn.q_proj.recipe.rowwise


def test_quantizing_the_input_records_no_autograd_graph():
    layer = Fp8BaseLinear.from_linear(torch.nn.Linear(32, 16, bias=False))
    x = torch.randn(4, 32, requires_grad=True)
    layer(x)
    codes, scale = fp8._shared_input.value
    assert codes.grad_fn is None and scale.grad_fn is None
