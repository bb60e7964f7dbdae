"""Both trainers over an FP8 base (``base_precision: fp8``, oppu.models.fp8), on the CPU.

The quality bar of issue 18 is the final training loss within 1% of the full-precision base on
the same data and seed; here per user, on the tiny models (the 7B-shaped figure is
``batched_fp8`` against ``batched_liger`` in bench/train_users.py).
"""

from __future__ import annotations

import pytest
import torch

from oppu.models import fp8
from tests.unit.tiny_models import one_thread  # noqa: F401 (the fixture pytestmark uses)

pytestmark = [pytest.mark.skipif(not fp8._cpu_scaled_mm_works(), reason="this torch has no CPU _scaled_mm"),
              pytest.mark.usefixtures("one_thread")]

LOSS_TOLERANCE = 0.01


def _batched_final_losses(base, packed: bool) -> dict[str, float]:
    from oppu.training.batched import train_users_batched
    from tests.unit.training.test_batched import HPARAMS, LORA, SEED, USERS

    losses: dict[str, float] = {}
    train_users_batched(base, None, list(USERS.items()), LORA, HPARAMS, SEED, max_active_users=2,
                        tokens_per_forward=96, packed=packed,
                        on_user_done=lambda user, state, stats: losses.__setitem__(user, stats.final_loss))
    return losses


@pytest.mark.parametrize("precision", ["fp8", "fp8-tensor"])
@pytest.mark.parametrize("packed", [True, False])
def test_batched_trainer_over_an_fp8_base_ends_at_the_full_precision_loss(precision, packed):
    from tests.unit.tiny_models import tiny_llama
    from tests.unit.training.test_batched import VOCAB

    base = tiny_llama(VOCAB, intermediate_size=48).train()
    expected = _batched_final_losses(base, packed)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    swapped = fp8.set_base_precision(base, precision, allow_cpu=True)
    assert len(swapped) == 14
    actual = _batched_final_losses(base, packed)
    assert actual.keys() == expected.keys()
    for user, loss in expected.items():
        assert abs(actual[user] - loss) <= LOSS_TOLERANCE * loss, (user, actual[user], loss)
    # the trainer put its LoRA slots' layers back around the FP8 layers, and the weights are untouched
    assert all(isinstance(base.get_submodule(name), fp8.Fp8BaseLinear) for name in swapped)
    fp8.restore_base_linears(base)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_per_user_trainer_over_an_fp8_base_ends_at_the_full_precision_loss(tmp_path):
    from safetensors.torch import load_file

    from oppu.models import load_model
    from oppu.run_config import OptimSettings, PeftSettings
    from oppu.tasks import get_task
    from oppu.training.personal import train_user_adapter
    from oppu.training.samples import personal_samples
    from tests.unit.tiny_models import build_movie_tag_base, movie_user

    model, tokenizer = load_model(str(build_movie_tag_base(tmp_path / "model")))
    model.requires_grad_(False)
    user = movie_user("u1", 12)
    samples = personal_samples(get_task("LaMP-2M"), user)

    def train(out_dir):
        return train_user_adapter(model, tokenizer, samples, PeftSettings().to_peft_config(),
                                  OptimSettings(lr=1e-2, batch_size=4), epochs=2, seed=7, user_id="u1",
                                  out_dir=out_dir)

    expected = train(tmp_path / "bf16")
    swapped = fp8.set_base_precision(model, "fp8", allow_cpu=True)
    assert swapped
    actual = train(tmp_path / "fp8")
    assert expected.losses[0] > expected.final_loss  # it learns, so the comparison means something
    assert abs(actual.final_loss - expected.final_loss) <= LOSS_TOLERANCE * expected.final_loss
    # the adapter file has the same keys (LoRA only, in PEFT's layout), and the base is FP8 still
    assert load_file(tmp_path / "fp8" / "adapter_model.safetensors").keys() == \
        load_file(tmp_path / "bf16" / "adapter_model.safetensors").keys()
    assert all(isinstance(model.get_submodule(name), fp8.Fp8BaseLinear) for name in swapped)
