"""The attention kernel shared by the tuned processor (attach.py) and the parallel branches (res_prefix.py).

One function, `attention(q, k, v, mask, backend)`, runs the backbone's own kernel (SDPA, xformers or plain math); masks
reach it additive, whatever diffusers was given (a bool mask, True = attend, becomes 0 / a very negative number), so
padding and the exact-λ log-partition treat both kinds alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def backend_of(processor) -> str:
    """The kernel name of a diffusers attention processor; an error for one we cannot wrap."""
    from diffusers.models import attention_processor as ap  # diffusers is slow to import: on first use

    if isinstance(processor, ap.AttnProcessor2_0):
        return "sdpa"
    if isinstance(processor, ap.XFormersAttnProcessor):
        return "xformers"
    if isinstance(processor, ap.AttnProcessor):
        return "math"
    raise ValueError(
        f"attention processor {type(processor).__name__} is not supported under tuners; expected diffusers' "
        "AttnProcessor2_0 (SDPA), XFormersAttnProcessor or AttnProcessor. Attach tuners to a UNet with one of those."
    )


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An attention mask as an additive bias in `dtype`: bool (True = attend) -> 0 / finfo.min; additive: cast."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask.to(dtype)


def attention(q, k, v, mask=None, backend: str = "sdpa", scale: float | None = None):
    """Softmax attention on (B, H, N, d) tensors with the backbone's kernel: "sdpa", "xformers" or "math".
    mask: additive, broadcastable to (B, H, N, M)."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if backend == "xformers":
        import xformers.ops  # optional dependency

        bias = None if mask is None else mask.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        out = xformers.ops.memory_efficient_attention(
            q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(),
            attn_bias=bias, scale=scale,
        )
        return out.transpose(1, 2)
    scores = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)  # (B, H, N, M)
    if mask is not None:
        scores = scores + mask
    return scores.softmax(-1) @ v


def log_partition(q, k, mask=None, scale: float | None = None):
    """log Σ_j exp(q·k_j·scale) per query: (B, H, N). Materialises the (B, H, N, M) scores; mask additive."""
    scores = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores + mask
    return scores.logsumexp(-1)


def split_heads(x, heads: int):
    """(B, N, H·d) -> (B, H, N, d)"""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)
