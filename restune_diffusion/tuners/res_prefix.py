"""Res-Prefix (paper Eq. 4-5): the prefix branch unbound from the attention it tunes.

Bound prefix tuning mixes  MHA_pre = (1-λ)·Attn(Q, K, V) + λ·Attn(Q, K_pre, V_pre),  with λ the softmax mass that
falls on the prefix keys (per query and head). Res-Prefix keeps the parallel branch and frees λ:
    x' = MHA(x) + W_out·λ·Attn(Q, K_pre, V_pre)
reusing the backbone's Q and its frozen output projection (no bias: the bias is in MHA(x) already).
λ is learnable (a scalar per attention, starts at 0: identity at init), fixed, or "exact": the bound form's own λ,
which makes Res-Prefix equal bound prefix tuning (tested); exact mode materialises the (B, H, N, M) scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from restune_diffusion.config import check, check_blocks, check_choice, check_positive_int, check_targets
from restune_diffusion.fusion import cached_kv
from restune_diffusion.kernel import attention, log_partition, split_heads
from restune_diffusion.placement import iter_ops

LAMBDA_MODES = ("learnable", "fixed", "exact")


@dataclass
class ResPrefixConfig:
    type: ClassVar[str] = "res_prefix"
    num_tokens: int = 10
    targets: tuple = ("attn1",)
    blocks: str | list = "all"
    lam: str = "learnable"
    lam_value: float | None = None  # start (learnable, default 0) or constant (fixed, default 1)

    def __post_init__(self):
        check_positive_int(self.num_tokens, f"{self.type}.num_tokens")
        check_targets(self.targets, ("attn1", "attn2"), f"{self.type}.targets")
        check_blocks(self.blocks, f"{self.type}.blocks")
        check_choice(self.lam, LAMBDA_MODES, f"{self.type}.lam")
        if self.lam_value is not None:
            check(isinstance(self.lam_value, (int, float)), f"{self.type}.lam_value", "a number", self.lam_value)
        self.targets = list(self.targets)


class ParallelBranch(nn.Module):
    """λ·Attn(Q, K_x, V_x) beside the backbone's attention; children say where K_x, V_x come from."""

    kv_cache = None  # set while the set is fused (fusion.KVCache): K_x, V_x do not depend on the input

    def __init__(self, lam: str, lam_value: float | None):
        super().__init__()
        self.mode = lam
        if lam == "learnable":
            self.lam = nn.Parameter(torch.tensor(float(lam_value or 0.0)))
        else:
            self.register_buffer("lam", torch.tensor(float(1.0 if lam_value is None else lam_value)), persistent=False)

    def compute_kv(self, attn):  # (L, C) each
        raise NotImplementedError

    def branch(self, attn, q, k, out, mask, backend):
        """Δ added to the per-head attention output before W_out. q, out: (B, H, N, d); k: keys (B, H, M, d)"""
        kp, vp = cached_kv(self, attn)
        dtype = kp.dtype
        batch, heads = q.shape[:2]
        kp, vp = (split_heads(t[None].expand(batch, -1, -1), heads) for t in (kp, vp))  # (B, H, L, d)
        qd = q.to(dtype)
        prefix_out = attention(qd, kp, vp, None, backend, attn.scale)
        if self.mode != "exact":
            return (self.lam * prefix_out).to(out.dtype)
        # λ = Σ_pre e / (Σ e + Σ_pre e) = sigmoid(lse_pre - lse), then (1-λ)O + λO_pre = O + λ(O_pre - O)
        lam = torch.sigmoid(log_partition(qd, kp, None, attn.scale) - log_partition(qd, k.to(dtype), mask, attn.scale))
        return (lam[..., None] * (prefix_out - out.to(dtype))).to(out.dtype)


class ResPrefix(ParallelBranch):
    """Learnable keys/values (L, C) in the attention's key space."""

    def __init__(self, width: int, num_tokens: int, lam: str = "learnable", lam_value: float | None = None):
        super().__init__(lam, lam_value)
        self.key = nn.Parameter(torch.randn(num_tokens, width) * 0.02)
        self.value = nn.Parameter(torch.randn(num_tokens, width) * 0.02)
        if lam == "fixed":
            nn.init.zeros_(self.value)  # identity at init under a constant λ

    def compute_kv(self, attn):
        return self.key, self.value


def install(unet, cfg: ResPrefixConfig, handle) -> None:
    for path, attn in iter_ops(unet, cfg.blocks, cfg.targets, cfg.type):
        tuner = ResPrefix(attn.to_k.out_features, cfg.num_tokens, cfg.lam, cfg.lam_value)
        handle.add_attention_tuner(attn, handle.add_module(f"{path}.{cfg.type}", tuner))
