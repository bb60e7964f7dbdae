"""FP8 GEMMs for a frozen base's linear layers (``users.base_precision`` / ``base.base_precision``).

A frozen base's ``nn.Linear`` needs two GEMMs per training step, the forward product and the
input gradient, and never a weight gradient. :func:`use_fp8_base` swaps every linear layer of
the decoder for a :class:`Fp8BaseLinear` that runs both through ``torch._scaled_mm`` (the H100's
FP8 tensor cores, up to twice the bf16 rate)::

    forward         y  = (x_q * s_x) @ (W_q * s_W).T        x_q, W_q: e4m3
    input gradient  dx = (g_q * s_g) @ (Wt_q * s_Wt).T      g_q: e4m3 (row) or e5m2 (tensor)

in the activations' dtype out. The weights are quantized once, when the layers are swapped
(once per base load), and kept beside the bf16 weight, which stays the module's parameter (the
model's state dict, fingerprint and LoRA merges see only it): ``W_q`` per output row for the
forward product, ``Wt_q`` (``W.T``, contiguous) per input column for the input gradient, as
``_scaled_mm`` wants its second operand column-major. The activations are quantized per pass; an
input that sibling layers share (q/k/v, gate/up) is quantized once (:class:`_SharedInput`).

Two recipes (``FP8_RECIPES``): ``row``, one scale per token row of activations and gradients
and per output row / input column of the weight, every operand e4m3; ``tensor``, one scale per
tensor, gradients in e5m2 (the wider range one scale needs). LoRA is untouched: the multi-LoRA
layers and PEFT wrap a :class:`Fp8BaseLinear` like any ``nn.Linear`` (it is one) and keep their
matrices, products and gradients in bf16/fp32.

``_scaled_mm`` needs both dimensions of a layer to be multiples of 16; a layer that is not stays
in its own dtype. ``fp8_linear_emulated`` is the same arithmetic with dequantized operands in
float32: the tests compare the module with it and with the full-precision product.
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from oppu.errors import ConfigError

logger = logging.getLogger(__name__)

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}
MIN_AMAX = 1e-12  # an all-zero row or tensor gets this abs-max: its codes are zeros, never NaN
DIM_MULTIPLE = 16  # _scaled_mm's rule for both dimensions of its second operand


@dataclass(frozen=True)
class Fp8Recipe:
    """How a layer's operands are scaled and which FP8 format its output gradient takes."""

    rowwise: bool
    grad_dtype: torch.dtype


FP8_RECIPES = {"row": Fp8Recipe(rowwise=True, grad_dtype=E4M3),
               "tensor": Fp8Recipe(rowwise=False, grad_dtype=E5M2)}


def quantize(x: torch.Tensor, dtype: torch.dtype, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (2-D) as FP8 codes and float32 scales with ``x ~= codes.float() * scale``.

    ``rowwise``: one scale per row (``[rows, 1]``), else one for the tensor (0-dim). The scale maps
    the abs-max to the format's largest value; codes are rounded to nearest and saturate.
    """
    high = x.abs().amax(dim=-1, keepdim=True) if rowwise else x.abs().amax()
    scale = high.float().clamp(min=MIN_AMAX) / FP8_MAX[dtype]
    codes = (x.float() / scale).clamp(-FP8_MAX[dtype], FP8_MAX[dtype]).to(dtype)
    return codes, scale


def scaled_mm(a_codes: torch.Tensor, a_scale: torch.Tensor, b_codes: torch.Tensor, b_scale: torch.Tensor,
              out_dtype: torch.dtype) -> torch.Tensor:
    """``(a_codes * a_scale) @ (b_codes * b_scale).T`` on FP8 tensor cores: ``a`` ``[m, k]`` and ``b``
    ``[n, k]``, both row-major, scales per row (``[m, 1]``, ``[n, 1]``) or 0-dim. The one
    ``_scaled_mm`` call (tested against the emulation on CPU and on CUDA: tests/gpu/test_fp8_gpu.py)."""
    return torch._scaled_mm(a_codes, b_codes.t(), scale_a=a_scale, scale_b=b_scale.t(), out_dtype=out_dtype)


def scaled_mm_emulated(a_codes, a_scale, b_codes, b_scale, out_dtype: torch.dtype) -> torch.Tensor:
    """What :func:`scaled_mm` computes, from the dequantized operands in float32."""
    return ((a_codes.float() * a_scale) @ (b_codes.float() * b_scale).t()).to(out_dtype)


_quantize_compiled = None
_compile_failed = False


def _quantize_fn(device: torch.device):
    """:func:`quantize` compiled for CUDA (one fused kernel instead of four: measured on the H100,
    eager quantization cost more than the FP8 product saved), eager elsewhere or if compiling fails."""
    global _quantize_compiled, _compile_failed
    if device.type != "cuda" or _compile_failed:
        return quantize
    if _quantize_compiled is None:
        _quantize_compiled = torch.compile(quantize, dynamic=True)
    return _quantize_compiled


def quantize_mode() -> str:
    """``compiled`` or ``eager``: how activations and gradients are quantized on CUDA so far."""
    return "eager" if _compile_failed or _quantize_compiled is None else "compiled"


@torch.no_grad()
def _quantize(x: torch.Tensor, dtype: torch.dtype, rowwise: bool):
    """:func:`quantize` on the training path: outside autograd (codes never need a gradient, and an
    autograd graph would keep a float32 copy of the activation alive), compiled on CUDA."""
    global _compile_failed
    fn = _quantize_fn(x.device)
    if fn is quantize:
        return quantize(x, dtype, rowwise)
    try:
        return fn(x, dtype, rowwise)
    except Exception as error:  # noqa: BLE001 (no Triton or an unsupported pattern: eager is exact too)
        _compile_failed = True
        logger.warning("FP8 quantization runs eager: torch.compile failed (%s: %s)", type(error).__name__, error)
        return quantize(x, dtype, rowwise)


class _SharedInput(threading.local):
    """The last input quantized, so sibling layers fed the same tensor (q/k/v, gate/up) quantize it once.

    Keyed by the tensor object (a weak reference: a freed input is never matched) and its
    in-place version counter, so a modified or new tensor is quantized afresh.
    """

    def __init__(self):
        self.ref = None
        self.key = None
        self.value = None

    def get(self, x: torch.Tensor, rows: torch.Tensor, rowwise: bool):
        key = (x._version, rowwise, x.shape)
        if self.ref is not None and self.ref() is x and self.key == key:
            return self.value
        self.value = _quantize(rows, E4M3, rowwise)
        self.ref, self.key = weakref.ref(x), key
        return self.value


_shared_input = _SharedInput()


class _Fp8Product(torch.autograd.Function):
    """``rows @ W.T`` from the quantized operands; backward gives the input gradient only."""

    @staticmethod
    def forward(ctx, rows, x_codes, x_scale, layer: Fp8BaseLinear):
        ctx.layer = layer
        return scaled_mm(x_codes, x_scale, layer.weight_codes, layer.weight_scale, rows.dtype)

    @staticmethod
    def backward(ctx, grad):
        layer = ctx.layer
        recipe = layer.recipe
        g_codes, g_scale = _quantize(grad.contiguous(), recipe.grad_dtype, recipe.rowwise)
        grad_rows = scaled_mm(g_codes, g_scale, layer.weight_t_codes, layer.weight_t_scale, grad.dtype)
        return grad_rows, None, None, None


class Fp8BaseLinear(nn.Linear):
    """A frozen ``nn.Linear`` whose forward product and input gradient run in FP8.

    Built from the layer it replaces (:meth:`from_linear`), sharing its weight and bias; the FP8
    copies live on the weight's device (quantize after moving the model) and out of the state
    dict. Its weight never gets a gradient.
    """

    def __init__(self, source: nn.Linear, recipe: Fp8Recipe):
        nn.Module.__init__(self)
        self.in_features, self.out_features = source.in_features, source.out_features
        self.weight = source.weight
        self.register_parameter("bias", source.bias)
        self.weight.requires_grad_(False)
        self.recipe = recipe
        self.source = [source]  # in a list: not a submodule (state dict and named_modules unchanged)
        # Plain attributes, not buffers: out of the state dict, and never broadcast by DDP.
        with torch.no_grad():
            weight = source.weight.detach()
            self.weight_codes, self.weight_scale = quantize(weight, E4M3, recipe.rowwise)
            if recipe.rowwise:  # per input column: the input gradient's scales
                self.weight_t_codes, self.weight_t_scale = quantize(weight.t().contiguous(), E4M3, True)
            else:
                self.weight_t_codes, self.weight_t_scale = self.weight_codes.t().contiguous(), self.weight_scale

    @classmethod
    def from_linear(cls, source: nn.Linear, recipe: str | Fp8Recipe = "row") -> Fp8BaseLinear:
        return cls(source, FP8_RECIPES[recipe] if isinstance(recipe, str) else recipe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        x_codes, x_scale = _shared_input.get(x, rows, self.recipe.rowwise)
        out = _Fp8Product.apply(rows, x_codes, x_scale, self)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        recipe = "row" if self.recipe.rowwise else "tensor"
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8={recipe}"


def fp8_linear_emulated(layer: Fp8BaseLinear, x: torch.Tensor) -> torch.Tensor:
    """The layer's forward from dequantized operands in float32 (its reference in the tests)."""
    rows = x.reshape(-1, layer.in_features)
    codes, scale = quantize(rows, E4M3, layer.recipe.rowwise)
    out = scaled_mm_emulated(codes, scale, layer.weight_codes, layer.weight_scale, torch.float32)
    return out.view(*x.shape[:-1], layer.out_features)


def fp8_input_grad_emulated(layer: Fp8BaseLinear, grad: torch.Tensor) -> torch.Tensor:
    """The layer's input gradient for output gradient ``grad``, from dequantized operands in float32."""
    rows = grad.reshape(-1, layer.out_features)
    codes, scale = quantize(rows, layer.recipe.grad_dtype, layer.recipe.rowwise)
    out = scaled_mm_emulated(codes, scale, layer.weight_t_codes, layer.weight_t_scale, torch.float32)
    return out.view(*grad.shape[:-1], layer.in_features)


def check_fp8_device(device: torch.device, allow_cpu: bool = False) -> None:
    """Raise ``ConfigError`` unless FP8 GEMMs run on ``device``: a CUDA GPU of compute capability
    8.9 or newer (Ada, Hopper, Blackwell), or with ``allow_cpu`` a CPU whose torch runs
    ``_scaled_mm`` (tests and the bench's CPU smoke run; slow, for the numerics only)."""
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            raise ConfigError(f"base_precision=fp8 needs FP8 tensor cores (compute capability >= 8.9: "
                              f"H100, L4, L40S, ...); {torch.cuda.get_device_name(device)} has "
                              f"{capability[0]}.{capability[1]}: set base_precision=bf16")
        return
    if device.type == "cpu" and allow_cpu and _cpu_scaled_mm_works():
        return
    raise ConfigError(f"base_precision=fp8 runs on a CUDA GPU with FP8 tensor cores, and the base is on "
                      f"{device}: set base_precision=bf16 (or give the actors GPUs)")


def _cpu_scaled_mm_works() -> bool:
    one = torch.ones((), dtype=torch.float32)
    codes = torch.zeros(16, 16, dtype=E4M3)
    try:
        scaled_mm(codes, one, codes, one, torch.float32)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def base_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The frozen ``nn.Linear`` layers of the model's decoder, by name in ``model``.

    Not the LM head (it runs on trained positions only, in full precision for the loss), not a
    LoRA matrix (PEFT's ``lora_A`` / ``lora_B`` are ``nn.Linear``\\ s too), not a layer already
    swapped. Swapping freezes them.
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    prefix = next(name for name, module in model.named_modules() if module is decoder)
    found = {}
    for name, module in decoder.named_modules():
        if type(module) is nn.Linear and "lora_" not in name:
            found[f"{prefix}.{name}" if prefix else name] = module
    return found


def use_fp8_base(model: nn.Module, recipe: str = "row", *, allow_cpu: bool = False) -> list[str]:
    """Swap the decoder's frozen linear layers (:func:`base_linears`) for :class:`Fp8BaseLinear`
    in place, quantizing their weights now; returns the names swapped. Call it on the bare base
    before any LoRA goes in (once per base load); :func:`restore_base_linears` undoes it.

    A layer whose dimensions are not multiples of 16 stays as it is. ``ConfigError`` where the
    model's device has no FP8 GEMMs (:func:`check_fp8_device`) or ``recipe`` is unknown.
    """
    if recipe not in FP8_RECIPES:
        raise ConfigError(f"unknown FP8 recipe {recipe!r}: use one of {sorted(FP8_RECIPES)}")
    linears = base_linears(model)
    if not linears:
        return []
    weight = next(iter(linears.values())).weight
    check_fp8_device(weight.device, allow_cpu)
    if weight.device.type == "cuda" and weight.dtype != torch.bfloat16:
        raise ConfigError(f"base_precision=fp8 needs the base in bfloat16 on the GPU (the FP8 products give "
                          f"bf16), not {weight.dtype}")
    swapped = []
    for name, linear in linears.items():
        if linear.in_features % DIM_MULTIPLE or linear.out_features % DIM_MULTIPLE:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, Fp8BaseLinear.from_linear(linear, recipe))
        swapped.append(name)
    return swapped


def restore_base_linears(model: nn.Module) -> int:
    """Put back the ``nn.Linear`` each :class:`Fp8BaseLinear` of ``model`` replaced, wherever it now
    sits (a LoRA wrapper's base layer too); returns how many. Frees the FP8 copies."""
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, Fp8BaseLinear)]
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module.source[0])
    _shared_input.__init__()
    return len(found)


PRECISION_RECIPES = {"fp8": "row", "fp8-tensor": "tensor"}  # run-config base_precision -> recipe


def set_base_precision(model: nn.Module, base_precision: str, *, allow_cpu: bool = False) -> list[str]:
    """The run config's ``base_precision`` applied to a freshly loaded base: ``bf16`` leaves it as it
    is, ``fp8`` / ``fp8-tensor`` swap its decoder's linear layers (:func:`use_fp8_base`, recipe
    ``row`` / ``tensor``). The one place every trainer and the bench turn FP8 on; returns the
    names swapped."""
    if base_precision == "bf16":
        return []
    if base_precision not in PRECISION_RECIPES:
        raise ConfigError(f"base_precision must be bf16, fp8 or fp8-tensor, got {base_precision!r}")
    swapped = use_fp8_base(model, PRECISION_RECIPES[base_precision], allow_cpu=allow_cpu)
    logger.info("base_precision=%s: %d linear layers compute in FP8", base_precision, len(swapped))
    return swapped
