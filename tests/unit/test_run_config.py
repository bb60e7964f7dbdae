"""The one name grammar: base flavours, adapter variants and methods read by one parser."""

from __future__ import annotations

import re

import pytest

from oppu.errors import ConfigError
from oppu.evaluation.methods import resolve_method
from oppu.run_config import (
    ADAPTER_VARIANT,
    BASE_FLAVOUR,
    METHOD,
    PromptShape,
    parse_flavour,
    parse_name,
    parse_variant,
)

NAMES = [  # (kind, name, shape or None where the kind refuses the name)
    (BASE_FLAVOUR, "profile", PromptShape(True, 0, False)),
    (BASE_FLAVOUR, "rag-k2", PromptShape(False, 2, False)),
    (BASE_FLAVOUR, "profile+rag-k1", PromptShape(True, 1, False)),
    (BASE_FLAVOUR, "pag+rag-k1", None),
    (BASE_FLAVOUR, "rag-k1+oppu", None),
    (BASE_FLAVOUR, "rag-k0", None),
    (ADAPTER_VARIANT, "oppu", PromptShape(False, 0, True)),
    (ADAPTER_VARIANT, "pag+rag-k3+oppu", PromptShape(True, 3, True)),
    (ADAPTER_VARIANT, "rag-k1", None),
    (ADAPTER_VARIANT, "rag-k1+pag+oppu", None),
    (ADAPTER_VARIANT, "profile+oppu", None),
    (METHOD, "pag", PromptShape(True, 0, False)),
    (METHOD, "rag-k4", PromptShape(False, 4, False)),
    (METHOD, "pag+rag-k1+oppu", PromptShape(True, 1, True)),
    (METHOD, "", None),
    (METHOD, "+oppu", None),
    (METHOD, "oppu+rag-k1", None),
    (METHOD, "rag-k01", None),
]


@pytest.mark.parametrize(("kind", "name", "shape"), NAMES)
def test_one_grammar_for_every_kind_of_name(kind, name, shape):
    if shape is None:
        with pytest.raises(ConfigError, match=re.escape(f"unknown {kind.what} '{name}'")):
            parse_name(name, kind)
    else:
        assert parse_name(name, kind) == shape


def test_the_entry_points_agree_with_the_grammar():
    assert parse_flavour("plain", 3) == (False, 0)
    assert parse_flavour("rag", 3) == (False, 3)
    assert parse_flavour("profile+rag-k2", 3) == (True, 2)
    assert parse_variant("pag+oppu") == (True, 0)
    method = resolve_method("pag+rag-k2+oppu")
    assert (method.profile, method.k, method.retrieval, method.adapter_variant) == (True, 2, "bm25",
                                                                                   "pag+rag-k2+oppu")
    assert resolve_method("random-history").retrieval == "random"


def test_qlora_is_a_checked_users_key():
    from oppu.config import load_config
    from oppu.run_config import RunConfig
    from oppu.training.publish import adapter_train_config

    assert load_config(RunConfig).users.quantize == "none"
    with pytest.raises(ConfigError, match=r"users.quantize: 'int8' is not one of \['none', 'nf4'\]"):
        load_config(RunConfig, None, ["users.quantize=int8"])
    with pytest.raises(ConfigError, match="users.quantize=nf4 needs GPU actors"):
        load_config(RunConfig, None, ["users.quantize=nf4"])
    cfg = load_config(RunConfig, None, ["users.quantize=nf4", "users.num_gpus_per_actor=1"])
    # another training than the full-precision base's, so a re-run does not take one for the other
    assert adapter_train_config(cfg, "oppu", 3)["quantize"] == "nf4"
    assert "quantize" not in adapter_train_config(load_config(RunConfig), "oppu", 3)


def test_fp8_base_precision_is_a_checked_key_of_both_stages(tmp_path):
    from oppu.config import load_config
    from oppu.run_config import RunConfig
    from oppu.training.base import _deepspeed_config
    from oppu.training.publish import adapter_train_config

    defaults = load_config(RunConfig)
    assert defaults.users.base_precision == defaults.base.base_precision == "bf16"
    with pytest.raises(ConfigError, match=r"users.base_precision: 'int8' is not one of"):
        load_config(RunConfig, None, ["users.base_precision=int8"])
    with pytest.raises(ConfigError, match="users.base_precision=fp8 runs the base's GEMMs on a GPU"):
        load_config(RunConfig, None, ["users.base_precision=fp8"])
    with pytest.raises(ConfigError, match="base.base_precision=fp8-tensor runs the base's GEMMs on a GPU"):
        load_config(RunConfig, None, ["base.base_precision=fp8-tensor"])
    with pytest.raises(ConfigError, match="pick one"):
        load_config(RunConfig, None, ["users.base_precision=fp8", "users.quantize=nf4",
                                      "users.num_gpus_per_actor=1"])
    cfg = load_config(RunConfig, None, ["users.base_precision=fp8", "users.num_gpus_per_actor=0.5",
                                        "users.trainer=batched"])
    # another training than the bf16 base's: a re-run does not take one for the other
    assert adapter_train_config(cfg, "oppu", 3)["base_precision"] == "fp8"
    assert "base_precision" not in adapter_train_config(defaults, "oppu", 3)
    zero3 = tmp_path / "zero3.json"
    zero3.write_text('{"zero_optimization": {"stage": 3}}')
    with pytest.raises(ConfigError, match="ZeRO-3"):
        _deepspeed_config(load_config(RunConfig, None, ["base.base_precision=fp8", "base.use_gpu=true",
                                                        f"base.deepspeed={zero3}"]))
    assert _deepspeed_config(load_config(RunConfig, None, ["base.use_gpu=true", f"base.deepspeed={zero3}"]))


def test_a_4bit_base_without_cuda_is_a_config_error(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is visible: the 4-bit load would run")
    from oppu.models import load_model

    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        load_model(str(tmp_path), quantize="nf4")
