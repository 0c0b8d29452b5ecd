"""Prefix tuning (Li & Liang), the bound baseline: learnable K_pre, V_pre joined to the attention's keys and values,
Attn(Q, [K; K_pre], [V; V_pre]). Paper row "Prefix": 100 tokens on attn1 and attn2 of the 16 blocks (4.99 M).

The bound form shares the softmax with the backbone, so it cannot leave the output unchanged at init: that
entanglement is what Res-Prefix removes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from restune_diffusion.config import check_blocks, check_positive_int, check_targets
from restune_diffusion.fusion import cached_kv
from restune_diffusion.placement import iter_ops


@dataclass
class PrefixConfig:
    type: ClassVar[str] = "prefix"
    num_tokens: int = 100
    targets: tuple = ("attn1", "attn2")
    blocks: str | list = "all"

    def __post_init__(self):
        check_positive_int(self.num_tokens, f"{self.type}.num_tokens")
        check_targets(self.targets, ("attn1", "attn2"), f"{self.type}.targets")
        check_blocks(self.blocks, f"{self.type}.blocks")
        self.targets = list(self.targets)


class Prefix(nn.Module):
    kv_cache = None  # set while the set is fused (fusion.KVCache); here it holds the tokens in the backbone's dtype

    def __init__(self, width: int, num_tokens: int):
        super().__init__()
        self.key = nn.Parameter(torch.randn(num_tokens, width) * 0.02)
        self.value = nn.Parameter(torch.randn(num_tokens, width) * 0.02)

    def compute_kv(self, attn):
        dtype = attn.to_k.weight.dtype
        return self.key.to(dtype), self.value.to(dtype)  # (L, C)

    def extend_kv(self, attn, batch: int):
        k, v = cached_kv(self, attn)
        return k[None].expand(batch, -1, -1), v[None].expand(batch, -1, -1)  # (B, L, C)


def install(unet, cfg: PrefixConfig, handle) -> None:
    for path, attn in iter_ops(unet, cfg.blocks, cfg.targets, cfg.type):
        tuner = handle.add_module(f"{path}.{cfg.type}", Prefix(attn.to_k.out_features, cfg.num_tokens))
        handle.add_attention_tuner(attn, tuner)
