"""Res-Adapter (paper Sec. 3.2): a bottleneck MLP in parallel with an op, x' = OP(x) + s·up(φ(down(x))).

Sits on attn1, attn2, ff or a whole transformer block. The last layer starts at zero, so the tuned UNet equals the
base UNet at step 0. Also used by the sequential adapter baseline (adapter.py) and the bypass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from restune_diffusion.config import check_blocks, check_choice, check_positive_int, check_targets
from restune_diffusion.placement import iter_ops

ACTIVATIONS = {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU, "identity": nn.Identity}
SCALES = ("none", "scalar", "channel")
OPS = ("attn1", "attn2", "ff", "block")


@dataclass
class ResAdapterConfig:
    type: ClassVar[str] = "res_adapter"
    dim: int = 100  # bottleneck width
    targets: tuple = ("ff",)
    blocks: str | list = "all"
    act: str = "gelu"
    scale: str = "none"  # learnable output scale: none | scalar | channel (starts at 1)

    def __post_init__(self):
        check_positive_int(self.dim, f"{self.type}.dim")
        check_targets(self.targets, OPS, f"{self.type}.targets")
        check_blocks(self.blocks, f"{self.type}.blocks")
        check_choice(self.act, ACTIVATIONS, f"{self.type}.act")
        check_choice(self.scale, SCALES, f"{self.type}.scale")
        self.targets = list(self.targets)


class ResAdapter(nn.Module):
    """down (C→dim) → act → up (dim→C, zero-init) → optional learnable scale. (…, C) → (…, C)."""

    cannot_fuse = ("non-linear (an activation between down and up), so up(act(down(x))) is no matrix to add to the "
                   "op's weights: it stays a parallel branch")

    def __init__(self, width: int, dim: int, act: str = "gelu", scale: str = "none", out_width: int | None = None):
        super().__init__()
        out_width = out_width or width
        self.down = nn.Linear(width, dim)
        self.act = ACTIVATIONS[act]()
        self.up = nn.Linear(dim, out_width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        if scale != "none":
            self.scale = nn.Parameter(torch.ones(1 if scale == "scalar" else out_width))
        else:
            self.scale = None

    def forward(self, x):
        out = self.up(self.act(self.down(x)))
        return out if self.scale is None else out * self.scale


def op_width(op: nn.Module) -> int:
    """Channel width of an op's input, read from the module itself (never from its name)."""
    if hasattr(op, "to_q"):
        return op.to_q.in_features
    if hasattr(op, "net"):  # FeedForward
        return op.net[0].proj.in_features
    return op.norm1.normalized_shape[0]  # BasicTransformerBlock


def install(unet, cfg: ResAdapterConfig, handle) -> None:
    for path, op in iter_ops(unet, cfg.blocks, cfg.targets, cfg.type):
        width = op_width(op)
        tuner = handle.add_module(f"{path}.{cfg.type}", ResAdapter(width, cfg.dim, cfg.act, cfg.scale))
        handle.add_residual(op, tuner)
