"""users.kernels and base.kernels=liger on the GPU: liger-kernel's fused RMSNorm, SwiGLU and RoPE give the
batched trainer's adapters, and base adaptation's loss and LoRA gradients, that torch's modules give
(pytest -m gpu on a CUDA machine with liger-kernel).

Float32 throughout; liger's kernels sum in another order than torch's, so the tolerance is
rtol 1e-2, atol 1e-4 on every LoRA matrix after the users' full schedules (the losses of the two
runs agree to 1e-3).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

pytest.importorskip("liger_kernel")

from oppu.models.kernels import use_kernels  # noqa: E402
from oppu.training.batched import train_users_batched  # noqa: E402
from tests.unit.tiny_models import tiny_llama  # noqa: E402
from tests.unit.training.test_batched import HPARAMS, LORA, SEED, USERS, VOCAB  # noqa: E402


def test_batched_with_liger_kernels_trains_the_adapters_torch_modules_train(monkeypatch):
    from transformers.models.llama import modeling_llama

    torch.backends.cuda.matmul.allow_tf32 = False
    plain = tiny_llama(VOCAB, intermediate_size=48).train().cuda()
    fused = copy.deepcopy(plain)
    losses = {}

    def record(run):
        return lambda user_id, state, stats: losses.setdefault(run, {}).__setitem__(user_id, stats.final_loss)

    expected = train_users_batched(plain, None, list(USERS.items()), LORA, HPARAMS, SEED, max_active_users=2,
                                   tokens_per_forward=96, on_user_done=record("torch"))
    # liger also patches the Llama module's RoPE function and classes for the process: undone after.
    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    use_kernels(fused, "liger")
    layer = fused.model.layers[0]
    assert (layer.mlp._get_name(), layer.input_layernorm._get_name()) == ("LigerSwiGLUMLP", "LigerRMSNorm")
    actual = train_users_batched(fused, None, list(USERS.items()), LORA, HPARAMS, SEED, max_active_users=2,
                                 tokens_per_forward=96, on_user_done=record("liger"))
    assert actual.keys() == expected.keys()
    for user_id in expected:
        assert losses["liger"][user_id] == pytest.approx(losses["torch"][user_id], rel=1e-3)
        for key in expected[user_id]:
            torch.testing.assert_close(actual[user_id][key].float().cpu(), expected[user_id][key].float().cpu(),
                                       rtol=1e-2, atol=1e-4)


def test_base_adaptation_step_with_liger_kernels_equals_torch_modules(monkeypatch):
    """base.kernels=liger: base adaptation's step (PEFT LoRA over the whole base, right-padded rows,
    ``target_loss``) gives the loss and LoRA gradients that torch's modules give."""
    import peft
    from transformers.models.llama import modeling_llama

    from oppu.models.samples import collate, target_loss

    torch.backends.cuda.matmul.allow_tf32 = False
    generator = torch.Generator().manual_seed(7)
    rows = []
    for length in (5, 17, 11, 23):  # right padding up to 23 tokens
        ids = torch.randint(1, VOCAB, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (length - 3) + ids[-3:]})
    batch = {k: v.cuda() for k, v in collate(rows, pad_id=0).items()}
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    base = tiny_llama(VOCAB, intermediate_size=48).cuda()
    results = {}
    for name in ("torch", "liger"):
        model = copy.deepcopy(base)
        if name == "liger":
            for attr in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):
                monkeypatch.setattr(modeling_llama, attr, getattr(modeling_llama, attr))
            use_kernels(model, "liger", key="base.kernels")
            assert model.model.layers[0].mlp._get_name() == "LigerSwiGLUMLP"
        torch.manual_seed(0)  # the same LoRA draws for both
        model = peft.get_peft_model(model, lora).train()
        loss = target_loss(model, batch)
        loss.backward()
        results[name] = (float(loss), {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.requires_grad})
    assert results["liger"][0] == pytest.approx(results["torch"][0], rel=1e-4)
    assert results["liger"][1].keys() == results["torch"][1].keys() and results["torch"][1]
    for key, grad in results["torch"][1].items():
        assert float(grad.abs().max()) > 0, key
        torch.testing.assert_close(results["liger"][1][key], grad, rtol=1e-2, atol=1e-5, msg=key)
