"""FP8 GEMMs of the frozen base on CUDA (pytest -m gpu; skipped without a GPU of compute capability 8.9+).

On the GPU ``torch._scaled_mm`` runs cuBLAS / CUTLASS FP8 kernels, not the CPU's reference one:
the one call (``oppu.models.fp8.scaled_mm``) must equal the emulation (the dequantized operands
multiplied in float32, rounded to bf16) to bf16 rounding, and the layer must stay within FP8's
error of the bf16 layer (the CPU tests' bounds: 6% relative for e4m3 operands, 8% for an e5m2
gradient). Shapes are the 7B model's (4096 / 11008) at a few hundred tokens. Then the batched
trainer over an FP8 base ends within 1% of the bf16 base's loss, per user.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                                 reason="needs a CUDA device with FP8 tensor cores")]

from oppu.models import fp8  # noqa: E402

SHAPES = [(320, 4096, 4096), (320, 4096, 11008), (256, 11008, 4096)]  # (tokens, in, out)


def relative_error(actual, expected) -> float:
    actual, expected = actual.detach().float(), expected.detach().float()
    return float((actual - expected).norm() / expected.norm())


@pytest.mark.parametrize("rowwise", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_scaled_mm_on_cuda_equals_the_emulation(rowwise, shape):
    tokens, width_in, width_out = shape
    torch.manual_seed(0)
    a, a_scale = fp8.quantize(torch.randn(tokens, width_in, device="cuda", dtype=torch.bfloat16), fp8.E4M3, rowwise)
    b, b_scale = fp8.quantize(torch.randn(width_out, width_in, device="cuda", dtype=torch.bfloat16) * 0.02,
                              fp8.E4M3, rowwise)
    got = fp8.scaled_mm(a, a_scale, b, b_scale, torch.bfloat16)
    expected = fp8.scaled_mm_emulated(a, a_scale, b, b_scale, torch.float32)
    assert got.dtype == torch.bfloat16
    assert relative_error(got, expected) < 1e-2  # bf16 output rounding and accumulation order


@pytest.mark.parametrize("recipe", ["row", "tensor"])
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_matches_bf16_forward_and_input_gradient_on_cuda(recipe, shape):
    tokens, width_in, width_out = shape
    torch.manual_seed(1)
    linear = torch.nn.Linear(width_in, width_out, bias=False, device="cuda", dtype=torch.bfloat16)
    linear.requires_grad_(False)
    layer = fp8.Fp8BaseLinear.from_linear(linear, recipe)
    x = torch.randn(2, tokens // 2, width_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(2, tokens // 2, width_out, device="cuda", dtype=torch.bfloat16)
    out = layer(x)
    (grad_x,) = torch.autograd.grad(out, x, grad)
    expected = linear(x)
    (expected_grad_x,) = torch.autograd.grad(expected, x, grad)
    assert out.dtype == grad_x.dtype == torch.bfloat16
    assert relative_error(out, expected) < 0.06
    assert relative_error(grad_x, expected_grad_x) < (0.06 if recipe == "row" else 0.08)
    assert layer.weight.grad is None
    # the compiled quantization (CUDA) gives the eager one's codes and scales
    rows = x.detach().reshape(-1, width_in)
    eager_codes, eager_scale = fp8.quantize(rows, fp8.E4M3, recipe == "row")
    compiled_codes, compiled_scale = fp8._quantize(rows, fp8.E4M3, recipe == "row")
    torch.testing.assert_close(compiled_scale, eager_scale)
    assert float((compiled_codes.float() != eager_codes.float()).float().mean()) < 1e-3  # ties may round apart


def test_batched_trainer_over_an_fp8_base_on_cuda_ends_at_the_bf16_loss():
    from oppu.training.batched import train_users_batched
    from tests.unit.tiny_models import tiny_llama
    from tests.unit.training.test_batched import HPARAMS, LORA, SEED, USERS, VOCAB

    base = tiny_llama(VOCAB, intermediate_size=48).to("cuda", torch.bfloat16).requires_grad_(False).train()

    def final_losses():
        losses = {}
        train_users_batched(base, None, list(USERS.items()), LORA, HPARAMS, SEED, max_active_users=2,
                            tokens_per_forward=96,
                            on_user_done=lambda user, state, stats: losses.__setitem__(user, stats.final_loss))
        return losses

    expected = final_losses()
    assert len(fp8.set_base_precision(base, "fp8")) == 14
    actual = final_losses()
    for user, loss in expected.items():
        assert abs(actual[user] - loss) <= 0.01 * loss, (user, actual[user], loss)
    fp8.restore_base_linears(base)
