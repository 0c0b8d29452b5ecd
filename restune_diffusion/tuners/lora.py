"""LoRA (Hu et al.), the bound baseline: W' = W + (α/r)·B·A on the attention projections, B zero-init.

Installed as forward hooks on the frozen nn.Linear layers (output + (α/r)·B(A(x))): the UNet's modules and keys stay
as they are. Paper row "LoRA": rank 50 on to_q/to_k/to_v/to_out.0 of attn1 and attn2 in the 16 blocks (9.96 M),
the same count as diffusers + peft `LoraConfig(r=50, target_modules=[...])`. We keep our own because peft replaces
modules (new state-dict keys, a second mechanism); `export_diffusers_lora` gives peft/diffusers key names so
`pipe.load_lora_weights` reads our files unchanged (`restune_diffusion.exports` writes them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from restune_diffusion.config import check, check_blocks, check_positive_int, check_targets
from restune_diffusion.placement import iter_ops

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class LoraConfig:
    type: ClassVar[str] = "lora"
    rank: int = 50
    alpha: float | None = None  # default: rank (scale 1), as diffusers' script
    targets: tuple = ("attn1", "attn2")
    modules: tuple = PROJECTIONS
    blocks: str | list = "all"

    def __post_init__(self):
        check_positive_int(self.rank, f"{self.type}.rank")
        check(self.alpha is None or isinstance(self.alpha, (int, float)), f"{self.type}.alpha", "a number", self.alpha)
        check_targets(self.targets, ("attn1", "attn2"), f"{self.type}.targets")
        check_targets(self.modules, PROJECTIONS, f"{self.type}.modules")
        check_blocks(self.blocks, f"{self.type}.blocks")
        self.targets, self.modules = list(self.targets), list(self.modules)


class Lora(nn.Module):
    """(…, in) → (…, out): (α/r)·B·A·x, with B = 0 at init."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float | None = None):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)  # A
        self.up = nn.Linear(rank, out_features, bias=False)  # B
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.scaling = (alpha if alpha is not None else rank) / rank

    def forward(self, x):
        return self.up(self.down(x)) * self.scaling


def install(unet, cfg: LoraConfig, handle) -> None:
    for path, attn in iter_ops(unet, cfg.blocks, cfg.targets, cfg.type):
        for name in cfg.modules:
            linear = attn.get_submodule(name)
            tuner = Lora(linear.in_features, linear.out_features, cfg.rank, cfg.alpha)
            handle.add_residual(linear, handle.add_module(f"{path}.{name}.{cfg.type}", tuner))


def export_diffusers_lora(handle) -> dict[str, torch.Tensor]:
    """LoRA tensors under peft/diffusers names (`unet.<module>.lora_A.weight`), scaling folded into B."""
    state = {}
    for name, module in handle.module.named_modules():
        if isinstance(module, Lora):
            base = name[: -len(".lora")]
            state[f"unet.{base}.lora_A.weight"] = module.down.weight.detach().clone()
            state[f"unet.{base}.lora_B.weight"] = (module.up.weight * module.scaling).detach().clone()
    return state
