"""LoHa (Hyeon-Woo et al., FedPara; LyCORIS), built by peft: `LoHaConfig` on the LoRA row's targets.
ΔW = s · (B1·A1) ⊙ (B2·A2), a Hadamard product of two rank-r products (rank up to r²); one factor starts at zero,
so the tuned UNet equals the base at step 0. 2r(in + out) parameters per layer: rank 25 has exactly the LoRA row's
budget on SD v1.5 (9,964,800). Mechanism: peft_layers.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from restune_diffusion.tuners.lora import LoraConfig
from restune_diffusion.tuners.peft_layers import install_peft, peft_targets


@dataclass
class LohaConfig(LoraConfig):
    type: ClassVar[str] = "loha"
    rank: int = 25


def install(unet, cfg: LohaConfig, handle) -> None:
    import peft

    config = peft.LoHaConfig(r=cfg.rank, alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
                             target_modules=peft_targets(unet, cfg))
    install_peft(unet, cfg, handle, config)
