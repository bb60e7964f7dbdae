"""users.kernels: liger-kernel's fused kernels for the frozen base, refused by name where they cannot run."""

from types import SimpleNamespace

import pytest
import torch

from oppu.config import load_config
from oppu.errors import ConfigError
from oppu.models.kernels import use_kernels
from oppu.run_config import RunConfig


def test_torch_leaves_the_model_as_it_is():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    before = [type(m) for m in model.modules()]
    use_kernels(model, "torch")
    assert [type(m) for m in model.modules()] == before


def test_liger_on_a_cpu_base_names_the_key_and_the_device():
    with pytest.raises(ConfigError, match=r"users.kernels=liger runs Triton kernels on a CUDA GPU.*cpu"):
        use_kernels(torch.nn.Linear(4, 4), "liger")
    with pytest.raises(ConfigError, match="base.kernels must be 'torch' or 'liger', got 'fast'"):
        use_kernels(torch.nn.Linear(4, 4), "fast", key="base.kernels")


def test_liger_missing_or_unsupported_is_a_config_error():
    cuda_param = SimpleNamespace(device=torch.device("cuda", 0))
    model = SimpleNamespace(parameters=lambda: iter([cuda_param]), config=SimpleNamespace(model_type="no-such-model"))
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"needs liger-kernel.*pip install 'oppu\[liger\]'"):
            use_kernels(model, "liger")
    else:
        with pytest.raises(ConfigError, match="no kernels for model type 'no-such-model'"):
            use_kernels(model, "liger")


def test_the_run_config_keys_need_gpu_workers():
    defaults = load_config(RunConfig)
    assert defaults.users.kernels == defaults.base.kernels == "torch"
    with pytest.raises(ConfigError, match="users.kernels=liger runs liger-kernel's Triton kernels on CUDA GPUs only"):
        load_config(RunConfig, None, ["users.kernels=liger"])
    with pytest.raises(ConfigError, match="base.kernels=liger .* base.use_gpu=false trains on CPU"):
        load_config(RunConfig, None, ["base.kernels=liger"])
    assert load_config(RunConfig, None, ["base.kernels=liger", "base.use_gpu=true"]).base.kernels == "liger"
    with pytest.raises(ConfigError, match="users.kernels"):
        load_config(RunConfig, None, ["users.kernels=fast", "users.num_gpus_per_actor=1"])
    assert load_config(RunConfig, None, ["users.kernels=liger", "users.num_gpus_per_actor=0.5"]).users.kernels == "liger"
