"""Res-Prompt (paper Sec. 3.2): prompt tokens x_pro in the attention's input space, projected by the frozen W_k, W_v,
in a parallel branch:  x' = MHA(x) + W_out·λ·Attn(Q, W_k·x_pro, W_v·x_pro).

With λ = "exact" it equals bound prompt tuning (prompt.py), tested. λ modes as in Res-Prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from restune_diffusion.config import check
from restune_diffusion.placement import iter_ops
from restune_diffusion.tuners.res_prefix import ParallelBranch, ResPrefixConfig


@dataclass
class ResPromptConfig(ResPrefixConfig):
    type: ClassVar[str] = "res_prompt"

    def __post_init__(self):
        super().__post_init__()
        # the tokens feed K and V, so no value can start at zero: a constant λ would move the output at step 0
        check(self.lam != "fixed", f"{self.type}.lam", "'learnable' (starts at 0) or 'exact'", self.lam)


class ResPrompt(ParallelBranch):
    """Learnable tokens (L, C_in) seen through the backbone's own key/value projections."""

    def __init__(self, width: int, num_tokens: int, lam: str = "learnable", lam_value: float | None = None):
        super().__init__(lam, lam_value)
        self.tokens = nn.Parameter(torch.randn(num_tokens, width) * 0.02)

    def compute_kv(self, attn):
        tokens = self.tokens.to(attn.to_k.weight.dtype)
        return attn.to_k(tokens).to(self.tokens.dtype), attn.to_v(tokens).to(self.tokens.dtype)  # (L, C)


def install(unet, cfg: ResPromptConfig, handle) -> None:
    for path, attn in iter_ops(unet, cfg.blocks, cfg.targets, cfg.type):
        tuner = ResPrompt(attn.to_k.in_features, cfg.num_tokens, cfg.lam, cfg.lam_value)
        handle.add_attention_tuner(attn, handle.add_module(f"{path}.{cfg.type}", tuner))
