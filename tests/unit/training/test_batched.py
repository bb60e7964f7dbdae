"""A user's adapter must not depend on who else trained in the same passes."""

from __future__ import annotations

import copy
import random

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from oppu.models.multi_lora import inject_multi_lora  # noqa: E402
from oppu.models.slot_export import export_slot_as_peft  # noqa: E402
from oppu.run_config import OptimSettings  # noqa: E402
from oppu.training.batched import linear_warmup_decay, step_plan, train_users_batched  # noqa: E402
from oppu.training.personal import user_seed  # noqa: E402
from oppu.training.slots import SlotAdamW, init_user_slot  # noqa: E402

VOCAB = 48
SEED = 7
HPARAMS = OptimSettings(lr=2e-2, weight_decay=0.01, max_grad_norm=0.3, warmup_ratio=0.2, batch_size=4,
                        epochs=2, max_length=40)
LORA = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
from tests.unit.tiny_models import one_thread, tiny_llama  # noqa: E402, F401

pytestmark = pytest.mark.usefixtures("one_thread")


def user_samples(n: int, seed: int) -> list[dict[str, list[int]]]:
    """Encoded samples: a masked prompt then a short trained target, lengths varying."""
    rng = random.Random(seed)
    samples = []
    for _ in range(n):
        prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 25))]
        target = [rng.randrange(3, 12) for _ in range(rng.randint(1, 8))] + [1]
        samples.append({"input_ids": prompt + target, "labels": [-100] * len(prompt) + target})
    return samples


USERS = {"u1": user_samples(11, 1), "u2": user_samples(5, 2), "u3": user_samples(8, 3)}


@pytest.fixture(scope="module")
def base():
    return tiny_llama(VOCAB, intermediate_size=48).train()


@pytest.fixture(scope="module")
def together(base):
    done = []
    adapters = train_users_batched(base, None, list(USERS.items()), LORA, HPARAMS, SEED, max_active_users=2,
                                   tokens_per_forward=96, on_user_done=lambda u, s, stats: done.append((u, stats)))
    return adapters, done


def assert_same_adapter(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("user_id", ["u1", "u2", "u3"])
def test_adapter_is_the_same_alone_or_in_company(base, together, user_id):
    alone = train_users_batched(base, None, [(user_id, USERS[user_id])], LORA, HPARAMS, SEED,
                                tokens_per_forward=96)
    assert_same_adapter(together[0][user_id], alone[user_id])


def test_users_finish_with_their_own_step_counts(together):
    adapters, done = together
    assert sorted(adapters) == ["u1", "u2", "u3"]
    stats = dict(done)
    # 2 epochs of ceil(n / 4) steps each; u2 (5 samples) starts in the slot u3 or u1 freed.
    assert {u: s.steps for u, s in stats.items()} == {"u1": 6, "u2": 4, "u3": 4}
    assert all(len(s.losses) == s.steps for s in stats.values())
    assert stats["u1"].input_tokens == 2 * sum(len(x["input_ids"]) for x in USERS["u1"])
    assert stats["u1"].losses[-1] < stats["u1"].losses[0]  # it learns
    # Different users, different data: different adapters.
    key = next(iter(adapters["u1"]))
    assert not torch.allclose(adapters["u1"][key], adapters["u2"][key])


def test_base_model_is_left_as_it_was(base, together):
    assert not any(type(m).__name__ == "MultiLoraLinear" for m in base.modules())


def reference_loop(base, user_id: str, samples: list[dict]) -> dict:
    """The plain one-user recipe: a PeftModel, torch AdamW, clip_grad_norm_, HF's linear warmup schedule."""
    from oppu.models.samples import collate

    initial = copy.deepcopy(base)
    inject_multi_lora(initial, LORA.target_modules, n_slots=1, rank=LORA.r, alpha=LORA.lora_alpha)
    init_user_slot(initial, 0, SEED, user_id)
    model = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(LORA))
    peft.set_peft_model_state_dict(model, export_slot_as_peft(initial, 0, LORA))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=HPARAMS.lr, weight_decay=HPARAMS.weight_decay)
    plan = step_plan(len(samples), HPARAMS.batch_size, HPARAMS.epochs,
                     torch.Generator().manual_seed(user_seed(SEED + 1, user_id)))
    scheduler = transformers.get_linear_schedule_with_warmup(
        optimizer, int(HPARAMS.warmup_ratio * len(plan)), len(plan))
    model.train()
    device = next(base.parameters()).device  # tests/gpu runs the same loop on CUDA
    for step in plan:
        batch = collate([samples[i] for i in step], pad_id=0)
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, HPARAMS.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return peft.get_peft_model_state_dict(model)


def test_batched_training_equals_the_plain_one_user_loop(base, together):
    expected = reference_loop(base, "u1", USERS["u1"])
    assert_same_adapter(together[0]["u1"], expected)


def test_exported_adapter_loads_with_peft_from_pretrained(base, together, tmp_path):
    from safetensors.torch import save_file

    save_file(together[0]["u3"], str(tmp_path / "adapter_model.safetensors"))
    LORA.save_pretrained(str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert_same_adapter(peft.get_peft_model_state_dict(loaded), together[0]["u3"])


def test_schedule_matches_transformers():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, 3, 11)
    for step in range(11):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(linear_warmup_decay(step, 3, 11))
        optimizer.step()
        scheduler.step()


def test_slot_adamw_updates_only_named_slots_like_torch_adamw():
    torch.manual_seed(0)
    stacked = torch.nn.Parameter(torch.randn(3, 4, 5))
    reference = torch.nn.Parameter(stacked.detach()[1].clone())
    slot_optimizer = SlotAdamW([stacked], n_slots=3, weight_decay=0.1)
    torch_optimizer = torch.optim.AdamW([reference], lr=0.05, weight_decay=0.1)
    untouched = stacked.detach()[[0, 2]].clone()
    for _ in range(3):
        grad = torch.randn(4, 5)
        stacked.grad = torch.zeros(3, 4, 5)
        stacked.grad[1] = grad
        reference.grad = grad.clone()
        slot_optimizer.step([1], [0.05])
        torch_optimizer.step()
    torch.testing.assert_close(stacked.detach()[1], reference.detach())
    torch.testing.assert_close(stacked.detach()[[0, 2]], untouched)


def test_packed_passes_train_the_same_adapters_as_length_grouped_rows(base, together):
    grouped = train_users_batched(base, None, list(USERS.items()), LORA, HPARAMS, SEED, max_active_users=2,
                                  tokens_per_forward=96, packed=False)
    for user_id in USERS:
        assert_same_adapter(together[0][user_id], grouped[user_id])


def test_varlen_attention_equals_attention_sample_by_sample():
    from oppu.training.varlen import varlen_causal_attention

    torch.manual_seed(1)
    lengths = [5, 1, 9, 3]
    query = torch.randn(sum(lengths), 4, 8)
    key, value = torch.randn(sum(lengths), 2, 8), torch.randn(sum(lengths), 2, 8)  # grouped-query
    cu_seqlens = torch.tensor([0, 5, 6, 15, 18], dtype=torch.int32)
    out = varlen_causal_attention(query, key, value, cu_seqlens, max(lengths))
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key.repeat_interleave(2, 1),
                                                            value.repeat_interleave(2, 1)))
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1)
        torch.testing.assert_close(out[start:end], expected)


def test_per_token_slots_equal_per_row_slots_and_route_gradients_to_owners():
    from oppu.models.multi_lora import MultiLoraLinear, model_adapters

    torch.manual_seed(2)
    layer = torch.nn.Module()
    layer.proj = MultiLoraLinear(torch.nn.Linear(6, 5), n_slots=3, rank=2, alpha=4)
    with torch.no_grad():
        layer.proj.lora_A.normal_()
        layer.proj.lora_B.normal_()
        layer.proj.scaling.copy_(torch.tensor([2.0, 0.5, 1.0]))
    x = torch.randn(3, 4, 6)
    rows = torch.tensor([2, -1, 0])
    with model_adapters(layer, rows):
        per_row = layer.proj(x)
    with model_adapters(layer, rows[:, None].expand(3, 4)):
        per_token = layer.proj(x)
    torch.testing.assert_close(per_token, per_row)
    # Packed: one row of tokens of slots 0 and 2 only; slot 1 gets an exactly zero gradient.
    owners = torch.tensor([[0, 0, 2, 2, 2, -1]])
    with model_adapters(layer, owners):
        layer.proj(torch.randn(1, 6, 6)).sum().backward()
    assert layer.proj.lora_B.grad[1].abs().sum() == 0 and layer.proj.lora_A.grad[1].abs().sum() == 0
    assert layer.proj.lora_B.grad[0].abs().sum() > 0 and layer.proj.lora_B.grad[2].abs().sum() > 0


def test_export_is_each_targeted_layers_slot_cut_to_the_configs_rank(base):
    """What a finished user's slot exports (``snapshot_slot``, one copy for the whole adapter):
    only the layers the config targets, each slot's A rows and B columns up to its rank."""
    from oppu.models.multi_lora import multi_lora_layers, remove_multi_lora

    model = copy.deepcopy(base)
    inject_multi_lora(model, ["q_proj", "v_proj"], n_slots=3, rank=6, alpha=8)
    init_user_slot(model, 1, SEED, "u1")
    for layer in model.modules():
        if hasattr(layer, "lora_B"):
            torch.nn.init.normal_(layer.lora_B)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"])
    got = export_slot_as_peft(model, 1, config)
    expected = {}
    for name, layer in multi_lora_layers(model).items():
        if name.endswith("v_proj"):
            expected[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A[1, :4]
            expected[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B[1, :, :4]
    assert list(got) == list(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key].detach()) and got[key].is_contiguous()
    remove_multi_lora(model)


# -- non-finite isolation (issue #15) -------------------------------------------------------

POISON = 2  # a token id no other user's samples use (theirs are 3..VOCAB-1, targets 1 and 3..11)


@pytest.fixture(scope="module")
def poisoned_base(base):
    """The base with token ``POISON``'s embedding NaN: a user whose samples hold it gets a NaN loss."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        model.get_input_embeddings().weight[POISON] = float("nan")
    return model


def diverging_samples() -> list[dict[str, list[int]]]:
    samples = user_samples(6, 9)
    samples[0] = {"input_ids": [POISON] + samples[0]["input_ids"], "labels": [-100] + samples[0]["labels"]}
    return samples


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "rows"])
def test_a_diverging_user_fails_alone_and_the_others_train_as_without_it(poisoned_base, packed):
    users = [("bad", diverging_samples()), *USERS.items()]
    done, failed = [], []
    adapters = train_users_batched(poisoned_base, None, users, LORA, HPARAMS, SEED, max_active_users=3,
                                   tokens_per_forward=96, packed=packed,
                                   on_user_done=lambda u, s, stats: done.append(u),
                                   on_user_failed=lambda u, error: failed.append((u, error)))
    assert [u for u, _ in failed] == ["bad"] and "bad" not in adapters and "bad" not in done
    error = failed[0][1]
    assert error.user == "bad" and "'bad'" in str(error) and "step" in str(error) and error.step >= 1
    assert sorted(done) == sorted(USERS)
    for user_id in USERS:
        alone = train_users_batched(poisoned_base, None, [(user_id, USERS[user_id])], LORA, HPARAMS, SEED,
                                    tokens_per_forward=96, packed=packed)
        assert_same_adapter(adapters[user_id], alone[user_id])
        assert all(torch.isfinite(t).all() for t in adapters[user_id].values())


def test_without_a_failure_callback_the_divergence_is_raised_after_the_others(poisoned_base):
    from oppu.errors import NonFiniteError

    done = []
    with pytest.raises(NonFiniteError, match="user 'bad'.*step 1 of"):
        train_users_batched(poisoned_base, None, [("bad", diverging_samples()), ("u2", USERS["u2"])], LORA,
                            HPARAMS, SEED, tokens_per_forward=96, on_user_done=lambda u, s, stats: done.append(u))
    assert done == ["u2"]


@pytest.mark.parametrize("per_token", [True, False], ids=["per-token", "per-row"])
def test_a_nan_slot_reaches_no_other_row_nor_other_slots_gradients(per_token):
    """Select, do not scale: slot 1 full of NaN (and a NaN input row of slot 1) leaves every
    other row's output and every other slot's gradient exactly as they are without it."""
    from oppu.models.multi_lora import MultiLoraLinear, model_adapters

    torch.manual_seed(3)
    layer = torch.nn.Module()
    layer.proj = MultiLoraLinear(torch.nn.Linear(6, 5), n_slots=3, rank=2, alpha=4)
    with torch.no_grad():
        layer.proj.lora_A.normal_()
        layer.proj.lora_B.normal_()
    x = torch.randn(4, 3, 6)
    slots = torch.tensor([0, -1, 2, 1])  # row 3 is the NaN slot's
    grad_out = torch.randn(4, 3, 5)

    def run(poison: bool):
        layer.proj.lora_A.grad = layer.proj.lora_B.grad = None
        inputs = x.clone()
        if poison:
            with torch.no_grad():
                layer.proj.lora_A[1] = float("nan")
                layer.proj.lora_B[1] = float("inf")
            inputs[3] = float("nan")
        ids = slots[:, None].expand(4, 3) if per_token else slots
        with model_adapters(layer, ids):
            out = layer.proj(inputs)
            (out * grad_out).sum().backward()
        return out.detach(), layer.proj.lora_A.grad.clone(), layer.proj.lora_B.grad.clone()

    clean, poisoned = run(False), run(True)
    torch.testing.assert_close(poisoned[0][:3], clean[0][:3], rtol=0, atol=0)
    assert not torch.isfinite(poisoned[0][3]).any()
    for grads_clean, grads_poisoned in zip(clean[1:], poisoned[1:], strict=True):
        torch.testing.assert_close(grads_poisoned[[0, 2]], grads_clean[[0, 2]], rtol=0, atol=0)


def test_a_pass_budget_off_the_alignment_grid_still_takes_a_sample_that_fills_it(base):
    # Packed passes pad each user's block to 16 tokens where the budget is a multiple of 16; a budget
    # of 41 could not hold a 40-token sample padded to 48, so that budget packs without the padding.
    long_sample = {"input_ids": [3 + i % 40 for i in range(40)], "labels": [-100] * 30 + [5] * 10}
    adapters = train_users_batched(base, None, [("u1", [long_sample] * 4)], LORA, HPARAMS, SEED,
                                   max_active_users=1, tokens_per_forward=41)
    assert set(adapters) == {"u1"} and all(torch.isfinite(t).all() for t in adapters["u1"].values())
