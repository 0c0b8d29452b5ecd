"""Prompt tuning (VPT-deep style), the bound baseline: L learnable tokens joined to each block's sequence and dropped
after it. Paper row "Prompt": 100 tokens per block on the 16 blocks (1.25 M).

Every op of a transformer block but self-attention is per token, so for the image tokens "join at the block input,
drop after the block" is exactly: the tokens, in attn1's (post-LayerNorm) input space, projected by the frozen W_k, W_v
and joined to attn1's keys/values. That is what we install; the tokens' own outputs are never computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from restune_diffusion.fusion import cached_kv
from restune_diffusion.placement import iter_ops
from restune_diffusion.tuners.prefix import PrefixConfig


@dataclass
class PromptConfig(PrefixConfig):
    type: ClassVar[str] = "prompt"
    targets: tuple = ("attn1",)


class Prompt(nn.Module):
    kv_cache = None  # set while the set is fused (fusion.KVCache): the tokens' K/V do not depend on the input

    def __init__(self, width: int, num_tokens: int):
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(num_tokens, width) * 0.02)

    def compute_kv(self, attn):
        tokens = self.tokens.to(attn.to_k.weight.dtype)
        return attn.to_k(tokens), attn.to_v(tokens)  # (L, C)

    def extend_kv(self, attn, batch: int):
        k, v = cached_kv(self, attn)
        return k[None].expand(batch, -1, -1), v[None].expand(batch, -1, -1)


def install(unet, cfg: PromptConfig, handle) -> None:
    for path, attn in iter_ops(unet, cfg.blocks, cfg.targets, cfg.type):
        tuner = handle.add_module(f"{path}.{cfg.type}", Prompt(attn.to_k.in_features, cfg.num_tokens))
        handle.add_attention_tuner(attn, tuner)
