"""Causal attention over packed samples: each sample attends to itself only.

``oppu.training.packing.pack_rows`` lays samples of many users end to end in one sequence; the
boundaries (``cu_seqlens``, int32, starting at 0 and ending at the sequence length) say where
each sample starts. On a GPU with bf16/fp16 activations this runs PyTorch's own variable-length
flash-attention kernels (``aten::_flash_attention_forward`` / ``_backward`` with ``cu_seqlens``):
no mask, no padding, work proportional to the sum of squared sample lengths, and no per-shape
planning. Elsewhere (CPU tests, float32) it runs SDPA with the equivalent block-diagonal causal
mask.

``packed_attention(model)`` plugs it into a transformers model through its attention registry
(``AttentionInterface``); the boundaries travel as the forward's ``cu_seq_lens_q`` /
``max_length_q`` keyword arguments (the names transformers' own varlen flash path uses), and
positions restart per sample through ``position_ids``. With a registered attention function of
its own, transformers builds no mask at all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

ATTENTION_NAME = "oppu_packed_varlen"
_calls = [0]  # packed attention calls so far: lets a caller check that a model really routes through it


class _FlashVarlen(torch.autograd.Function):
    """Causal varlen flash attention on ``[tokens, heads, head_dim]`` tensors (autograd through aten)."""

    @staticmethod
    def forward(ctx, query, key, value, cu_seqlens, max_seqlen, scale):
        out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            query, key, value, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, True, False, scale=scale)
        ctx.save_for_backward(query, key, value, out, lse, cu_seqlens, rng_state, unused)
        ctx.max_seqlen, ctx.scale = max_seqlen, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse, cu_seqlens, rng_state, unused = ctx.saved_tensors
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        grad_q, grad_k, grad_v = torch.ops.aten._flash_attention_backward(
            grad_out, query, key, value, out, lse, cu_seqlens, cu_seqlens, ctx.max_seqlen, ctx.max_seqlen,
            0.0, True, rng_state, unused, scale=ctx.scale)
        return grad_q, grad_k, grad_v, None, None, None


def flash_varlen_usable(query: torch.Tensor) -> bool:
    return query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and query.shape[-1] <= 256


def varlen_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                            max_seqlen: int, scale: float | None = None) -> torch.Tensor:
    """Causal attention within each segment; ``query`` ``[tokens, heads, d]``, ``key`` / ``value``
    ``[tokens, kv_heads, d]`` (grouped-query attention when fewer), returns ``[tokens, heads, d]``."""
    if flash_varlen_usable(query):
        return _FlashVarlen.apply(query, key, value, cu_seqlens.to(torch.int32), int(max_seqlen), scale)
    return _masked_attention(query, key, value, cu_seqlens, scale)


def _masked_attention(query, key, value, cu_seqlens, scale):
    """The same function through SDPA, segment by segment (small sizes, any device).

    One causal SDPA per segment, over that segment's tokens only, rather than one over all
    tokens with a block-diagonal mask: a masked-out probability is an exact 0, and ``0 * NaN``
    is NaN, so one sample with a non-finite value would reach every sample of the pass
    (flash attention's varlen kernel never reads other segments either). Reading the bounds is
    a sync, as was the mask's ``repeat_interleave``.
    """
    tokens, heads = query.shape[0], query.shape[1]
    if key.shape[1] != heads:
        repeat = heads // key.shape[1]
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != tokens or any(b < a for a, b in zip(bounds, bounds[1:], strict=False)):
        raise ValueError(f"cu_seqlens {bounds} do not cover the input's {tokens} tokens")
    parts = [torch.nn.functional.scaled_dot_product_attention(
        query[start:end].transpose(0, 1), key[start:end].transpose(0, 1), value[start:end].transpose(0, 1),
        is_causal=True, scale=scale).transpose(0, 1)
        for start, end in zip(bounds, bounds[1:], strict=False) if end > start]
    return torch.cat(parts) if parts else query.new_empty(query.shape[0], heads, value.shape[-1])


def hf_packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """transformers attention function: ``query`` ``[1, heads, tokens, d]`` -> ``([1, tokens, heads, d], None)``."""
    if cu_seq_lens_q is None or max_length_q is None:
        raise ValueError("packed attention needs cu_seq_lens_q and max_length_q in the forward's kwargs")
    if query.shape[0] != 1:
        raise ValueError(f"packed attention takes one packed row, got a batch of {query.shape[0]}")
    if dropout:
        raise ValueError("packed attention has no attention dropout")
    _calls[0] += 1
    # squeeze, not [0]: indexing's backward writes the gradient into a fresh zero-filled tensor
    # (a fill and a strided copy of every q/k/v gradient, seen in the H100 profile); a squeeze's
    # backward is a view.
    out = varlen_causal_attention(query.squeeze(0).transpose(0, 1), key.squeeze(0).transpose(0, 1),
                                  value.squeeze(0).transpose(0, 1), cu_seq_lens_q, max_length_q, scaling)
    return out.unsqueeze(0), None


def packed_attention_calls() -> int:
    return _calls[0]


@contextlib.contextmanager
def packed_attention(model) -> Iterator[None]:
    """Within the block, ``model`` (a transformers model) attends within packed samples only.

    Its forward then needs ``position_ids`` and ``cu_seq_lens_q`` / ``max_length_q``
    (``packed_forward_kwargs``). The model's attention implementation is restored afterwards.
    A model whose attention does not go through transformers' ``AttentionInterface`` would
    ignore it (and attend across samples): check ``packed_attention_calls`` after a forward.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, hf_packed_attention)
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = previous


def packed_forward_kwargs(batch: dict) -> dict:
    """The decoder forward's keyword arguments for a ``collate_packed`` batch."""
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
            "cu_seq_lens_q": batch["cu_seqlens"], "cu_seq_lens_k": batch["cu_seqlens"],
            "max_length_q": batch["max_seqlen"], "max_length_k": batch["max_seqlen"], "use_cache": False}
