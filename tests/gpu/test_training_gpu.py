"""GPU correctness of personal training (pytest -m gpu on a CUDA machine; skipped without one).

In float32 on the GPU, the batched trainer must give each user the adapter of the plain one-user
PEFT loop (the recipe of ``oppu.training.personal``), and the same adapter it gives on the CPU.
Tolerance: rtol 1e-3, atol 1e-5 on every LoRA matrix (float32 kernels differ between devices and
between batched and unbatched shapes only in summation order).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

peft = pytest.importorskip("peft")

from oppu.training.batched import train_users_batched  # noqa: E402
from tests.unit.tiny_models import tiny_llama  # noqa: E402
from tests.unit.training.test_batched import HPARAMS, LORA, SEED, USERS, VOCAB, reference_loop  # noqa: E402


def assert_close_adapters(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key].float().cpu(), expected[key].float().cpu(), rtol=1e-3, atol=1e-5)


@pytest.fixture(scope="module")
def bases():
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 here
    cpu = tiny_llama(VOCAB, intermediate_size=48).train()
    return cpu, copy.deepcopy(cpu).cuda()


def test_batched_on_gpu_equals_the_plain_one_user_peft_loop(bases):
    _, gpu = bases
    together = train_users_batched(gpu, None, list(USERS.items()), LORA, HPARAMS, SEED, max_active_users=2,
                                   tokens_per_forward=96)
    for user_id, samples in USERS.items():
        assert_close_adapters(together[user_id], reference_loop(gpu, user_id, samples))


def test_batched_gives_the_same_adapters_on_gpu_and_cpu(bases):
    cpu, gpu = bases
    on_cpu = train_users_batched(cpu, None, list(USERS.items()), LORA, HPARAMS, SEED, max_active_users=2,
                                 tokens_per_forward=96)
    on_gpu = train_users_batched(gpu, None, list(USERS.items()), LORA, HPARAMS, SEED, max_active_users=2,
                                 tokens_per_forward=96)
    for user_id in USERS:
        assert_close_adapters(on_gpu[user_id], on_cpu[user_id])
