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

    fused = False  # True while folded into the op's weight (handle.fuse()): the hook then adds nothing

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float | None = None):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)  # A
        self.up = nn.Linear(rank, out_features, bias=False)  # B
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.scaling = (alpha if alpha is not None else rank) / rank

    def forward(self, x):
        return self.up(self.down(x)) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """(out, in) fp32: what fusing adds to the op's weight, (α/r)·B @ A, computed as the diffusers export's
        B' = (α/r)·B (export_diffusers_lora) times A, so a fused UNet equals diffusers' `fuse_lora()` of that file."""
        return (self.up.weight * self.scaling).float() @ self.down.weight.float()


def install(unet, cfg: LoraConfig, handle) -> None:
    for path, attn in iter_ops(unet, cfg.blocks, cfg.targets, cfg.type):
        for name in cfg.modules:
            linear = attn.get_submodule(name)
            tuner = Lora(linear.in_features, linear.out_features, cfg.rank, cfg.alpha)
            handle.add_residual(linear, handle.add_module(f"{path}.{name}.{cfg.type}", tuner))


def export_diffusers_lora(handle) -> dict[str, torch.Tensor]:
    """LoRA tensors under peft/diffusers names (`unet.<module>.lora_A.weight`), scaling folded into B."""
    state = {}
    for path, module in _loras(handle):
        state[f"unet.{path}.lora_A.weight"] = module.down.weight.detach().clone()
        state[f"unet.{path}.lora_B.weight"] = (module.up.weight * module.scaling).detach().clone()
    return state


def _loras(handle) -> list[tuple[str, Lora]]:
    """(UNet module path, its Lora) for every LoRA of the set, e.g. ("down_blocks.0....attn1.to_q", lora)."""
    return [(name[: -len(".lora")], module) for name, module in handle.module.named_modules()
            if isinstance(module, Lora)]


def export_kohya_lora(handle) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """LoRA tensors under kohya/A1111 names, and kohya's metadata: `lora_unet_<path, dots as _>.lora_down.weight`
    (A), `.lora_up.weight` (B, unscaled) and `.alpha`, read back as W + (alpha/rank)·B·A by A1111, ComfyUI and
    diffusers' `load_lora_weights`."""
    state, ranks, alphas = {}, set(), set()
    for path, module in _loras(handle):
        key = "lora_unet_" + path.replace(".", "_")
        rank = module.down.out_features
        alpha = module.scaling * rank
        state[f"{key}.lora_down.weight"] = module.down.weight.detach().clone()
        state[f"{key}.lora_up.weight"] = module.up.weight.detach().clone()
        state[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        ranks.add(rank)
        alphas.add(alpha)
    metadata = {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1", "ss_v2": "False",
                "ss_network_dim": ",".join(str(r) for r in sorted(ranks)),
                "ss_network_alpha": ",".join(f"{a:g}" for a in sorted(alphas))}
    return state, metadata
