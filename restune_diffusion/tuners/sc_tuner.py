"""SC-Tuner (SCEdit, arXiv 2312.11392, the Res-Tuning authors' follow-up) as a Res-Tuner on the UNet's skip connections.

Each up-block resnet reads `cat([hidden, skip])`; only the skip part is edited, skip' = skip + s·T(skip), with T a
bottleneck C→ratio·C→C whose last layer starts at zero (identity at init). 12 skips on SD v1.5, widths 1280×5, 640×3,
320×4 deepest first; ratio 1.0 gives Σ (2C² + 2C) = 19,680,000 parameters (SCEdit's 19.68 M). The tuners sit in the
decoder only, so the encoder runs without a graph whenever nothing before the decoder needs a gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from restune_diffusion.config import check, check_choice
from restune_diffusion.placement import attached_sets, call_input, cast_call, replace_input
from restune_diffusion.tuners.bypass import NoGradPrefix
from restune_diffusion.tuners.res_adapter import ACTIVATIONS, ResAdapter

DECODER = ("up_blocks", "conv_norm_out", "conv_act", "conv_out")


@dataclass
class SCTunerConfig:
    type: ClassVar[str] = "sc_tuner"
    ratio: float = 1.0  # bottleneck width = ratio × skip width
    act: str = "gelu"

    def __post_init__(self):
        check(isinstance(self.ratio, (int, float)) and not isinstance(self.ratio, bool) and self.ratio > 0,
              f"{self.type}.ratio", "a positive number", self.ratio)
        check_choice(self.act, ACTIVATIONS, f"{self.type}.act")


def skip_connections(unet) -> list[tuple[str, nn.Module, int, int]]:
    """(path, up-block resnet, hidden width, skip width) for every skip connection, deepest first (forward order).
    The hidden width is the previous module's output width; the skip takes the rest of the resnet's input."""
    width = (unet.mid_block or unet.down_blocks[-1]).resnets[-1].out_channels
    skips = []
    for i, block in enumerate(unet.up_blocks):
        for j, resnet in enumerate(block.resnets):
            skips.append((f"up_blocks.{i}.resnets.{j}", resnet, width, resnet.in_channels - width))
            width = resnet.out_channels  # an upsampler keeps the width
    return skips


def _edit_skip(handle, tuner: nn.Module, hidden_width: int):
    def pre_hook(_resnet, args, kwargs):
        if not handle.enabled:
            return None
        x = call_input(args, kwargs, "input_tensor")  # (B, C_hidden + C_skip, H, W)
        hidden, skip = x[:, :hidden_width], x[:, hidden_width:]
        delta = cast_call(tuner, skip.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # the tuner's Linears want (..., C)
        x = torch.cat([hidden, skip + handle.scale_tensor * delta], dim=1)
        return replace_input(args, kwargs, x, "input_tensor")

    return pre_hook


def _needs_encoder_grad(unet, encoder_params: list, args, kwargs) -> bool:
    """Does anything before the decoder need a gradient this call: an input, a UNet weight or another tuner there?"""
    values = [*args, *kwargs.values()]
    tensors = [t for v in values for t in (v if isinstance(v, (list, tuple)) else [v]) if torch.is_tensor(t)]
    if any(t.requires_grad for t in tensors) or any(p.requires_grad for p in encoder_params):
        return True
    for handle in attached_sets(unet).values():
        if handle.enabled:
            for key, p in handle.module.named_parameters():
                parts = key.split(".")  # keys mirror UNet paths; a bypass reads the encoder detached anyway
                if p.requires_grad and parts[0] not in DECODER and "bypass" not in parts:
                    return True
    return False


def install(unet, cfg: SCTunerConfig, handle) -> None:
    for path, resnet, hidden_width, skip_width in skip_connections(unet):
        if skip_width <= 0:
            raise ValueError(f"{cfg.type}: {path} takes {resnet.in_channels} channels, no skip beside the "
                             f"{hidden_width}-channel hidden state")
        tuner = ResAdapter(skip_width, max(1, round(cfg.ratio * skip_width)), cfg.act)
        handle.add_module(f"{path}.{cfg.type}", tuner)
        handle.keep(resnet.register_forward_pre_hook(_edit_skip(handle, tuner, hidden_width),
                                                              with_kwargs=True))
    encoder_params = [p for n, p in unet.named_parameters() if n.split(".")[0] not in DECODER]
    wants = lambda args, kwargs: handle.enabled and not _needs_encoder_grad(unet, encoder_params, args, kwargs)
    handle.keep(NoGradPrefix.of(unet).register(unet.up_blocks[0], wants))
