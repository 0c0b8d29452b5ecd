"""DoRA (Liu et al., 2024, weight-decomposed LoRA), built by peft: `LoraConfig(use_dora=True)` on the LoRA row's
targets. W' = m · (W + s·B·A) / ||W + s·B·A|| (column norms), m initialised to ||W||, B zero-init: the tuned UNet
equals the base at step 0. SD v1.5 at rank 50 (the LoRA row's rank): 10,064,640 = the LoRA row's 9,964,800 plus one
magnitude per output channel (99,840). Mechanism: peft_layers.py. Saved also in diffusers' LoRA naming
(`unet.<module>.lora_A.weight`, `.lora_B.weight`, `.lora_magnitude_vector`), which `pipe.load_lora_weights` reads as
DoRA.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch

from restune_diffusion.tuners.lora import LoraConfig
from restune_diffusion.tuners.peft_layers import ADAPTER, install_peft, peft_layers, peft_targets


@dataclass
class DoraConfig(LoraConfig):
    type: ClassVar[str] = "dora"


def install(unet, cfg: DoraConfig, handle) -> None:
    import peft

    _traceable_weight_lookup()
    config = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank, use_dora=True,
                             target_modules=peft_targets(unet, cfg))
    install_peft(unet, cfg, handle, config)


@functools.cache
def _traceable_weight_lookup() -> None:
    """Let torch.compile(fullgraph=True) trace peft's DoRA layer: its forward asks peft's `dequantize_module_weight`
    for the base weight, which tests `type(weight).__module__.startswith("torchao.")`, a call dynamo cannot trace (a
    graph break in every DoRA layer). While tracing, this stand-in returns a plain Parameter weight as is (what the
    original returns for it) and calls the original for anything else (quantized weights). Eager code is untouched.
    Registered once per process (cached)."""
    from peft.utils import integrations

    original = integrations.dequantize_module_weight

    @torch.compiler.substitute_in_graph(original, skip_signature_check=True)
    def plain_weight(module):
        weight = module.weight
        if not hasattr(module, "W_q") and type(weight) is torch.nn.Parameter:
            return weight
        return original(module)


def export_diffusers_dora(handle) -> dict[str, torch.Tensor]:
    """DoRA tensors under diffusers/peft names, the scaling folded into B (the file then loads at alpha = rank)."""
    state = {}
    for path, layer in peft_layers(handle, DoraConfig.type):
        scaling = layer.lora_alpha[ADAPTER] / layer.r[ADAPTER]  # the trained scaling, whatever handle.scale is now
        state[f"unet.{path}.lora_A.weight"] = layer.lora_A[ADAPTER].weight.detach().clone()
        state[f"unet.{path}.lora_B.weight"] = (layer.lora_B[ADAPTER].weight * scaling).detach().clone()
        state[f"unet.{path}.lora_magnitude_vector"] = layer.lora_magnitude_vector[ADAPTER].weight.detach().clone()
    return state
