"""The multi-LoRA layer as serving runs it: a one-token decode step with two fused kernels per layer.

``MultiLoraLinear`` gathers each row's ``A`` and ``B`` and runs two batched matmuls: at decode
time (one token per row, a few rows) those are small kernels whose launch latency, not their
bytes, is what the adapters cost. Here a one-token step writes the same products as element-wise
multiplies and sums, which ``torch.compile`` turns into two kernels per layer that read the rows'
``A``/``B`` straight from the slots (no gathered copies), with the scaling and the residual add
folded into the base matmul's ``addmm``. Measured on an H100 (``bench/serve_lora_step.py``, 64
layers of 4096x4096, 64 rank-8 slots, CUDA-graphed): 7.4 us per layer over the bare matmul at
batch 32 (6.4 at batch 1), against 24.2 (16.9) for the gathers and batched matmuls, 16.2 for one
GEMM over all slots' ``A`` and ``B``, 10.7 with ``A`` stacked under the base weight, and 9.1 for
a hand-written fused Triton kernel. Prefill (several tokens per row) and training keep the
parent's path. Rounding points follow PEFT: ``A x`` and ``B (A x)`` are rounded to the
activations' dtype, then scaled and added.
"""

from __future__ import annotations

import functools

import torch

from oppu.models.multi_lora import MultiLoraLinear, multi_lora_layers


class ServingLoraLinear(MultiLoraLinear):
    """``MultiLoraLinear`` with an inference-only path for one-token steps (same results).

    ``compile_one_token`` (set by ``use_serving_layers``): on CUDA, run that path through
    ``torch.compile`` even where the caller's forward is not compiled. The continuous batcher's
    graphed forwards (``oppu.serving.row_cache``) are captured from eager code, where the
    element-wise form is ~19 kernels a layer (casts, gathers, products, sums) instead of two.
    """

    compile_one_token = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slot_ids = self.slot_ids
        if slot_ids is None or slot_ids.dim() != 1 or self.training or x.dim() != 3 or x.shape[1] != 1:
            return super().forward(x)
        batch = x.shape[0]
        if slot_ids.shape != (batch,):
            raise ValueError(f"slot_ids has shape {tuple(slot_ids.shape)}, the batch has {batch} rows")
        delta = lora_delta_one_token
        if self.compile_one_token and x.is_cuda and not torch.compiler.is_compiling():
            delta = _compiled_delta_one_token()
        return self.base(x) + delta(x[:, 0, :], self.lora_A, self.lora_B, self.scaling, slot_ids)[:, None, :]


@functools.cache
def _compiled_delta_one_token():
    """``lora_delta_one_token`` through ``torch.compile``, made once per process. Dynamic shapes:
    one compilation serves every batch size and layer width (a 7B model's q/v projections and a
    GQA model's narrower k/v alike), instead of one per shape up to dynamo's recompile limit."""
    return torch.compile(lora_delta_one_token, dynamic=True, fullgraph=True)


def lora_delta_one_token(rows: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                         scaling: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
    """``scaling[s_b] * B[s_b] @ (A[s_b] @ rows[b])`` per row ``b`` (zero where ``s_b = -1``).

    ``rows``: ``[batch, in]``; ``lora_a``: ``[slots, rank, in]``; ``lora_b``: ``[slots, out, rank]``.
    A base row (``s_b = -1``) gathers slot 0 to keep shapes static, and its zero is *selected*
    (``torch.where``), not slot 0's update scaled by 0: a NaN in slot 0 would survive ``* 0``
    and reach every base answer. Compiled, the select fuses into the same kernel.
    """
    dtype = rows.dtype
    gather = slot_ids.clamp(min=0)
    hidden = (rows.float()[:, None, :] * lora_a[gather].float()).sum(-1).to(dtype)  # [batch, rank]
    delta = (hidden.float()[:, None, :] * lora_b[gather].float()).sum(-1).to(dtype)  # [batch, out]
    delta = delta * scaling[gather].to(dtype)[:, None]
    return torch.where((slot_ids >= 0)[:, None], delta, 0.0)


def use_serving_layers(model: torch.nn.Module, compile_one_token: bool = False) -> int:
    """Switch every ``MultiLoraLinear`` of ``model`` to ``ServingLoraLinear`` in place (same tensors),
    their one-token path compiled on CUDA where ``compile_one_token`` (see ``ServingLoraLinear``).

    The layers are put in eval mode: layers injected after ``model.eval()`` start in training
    mode, which keeps them on the parent's path.
    """
    layers = multi_lora_layers(model).values()
    for layer in layers:
        if type(layer) is MultiLoraLinear:
            layer.__class__ = ServingLoraLinear
        layer.compile_one_token = compile_one_token
        layer.train(False)
    return len(layers)

