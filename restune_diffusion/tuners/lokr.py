"""LoKr (Edalati et al., KronA; LyCORIS), built by peft: `LoKrConfig` on the LoRA row's targets.
ΔW = s · W1 ⊗ W2, a Kronecker product: W1 is factor × factor, W2 (out/factor) × (in/factor), itself a rank-r
product where that is smaller; W2's second factor starts at zero, so the tuned UNet equals the base at step 0.
SD v1.5 at factor 4 and the LoRA row's rank 50: 2,445,248 parameters (about the Res-Tuning row's 2.54 M; a full W2
would be 5.85 M). Mechanism: peft_layers.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from restune_diffusion.config import check
from restune_diffusion.tuners.lora import LoraConfig
from restune_diffusion.tuners.peft_layers import install_peft, peft_targets


@dataclass
class LokrConfig(LoraConfig):
    type: ClassVar[str] = "lokr"
    factor: int = 4  # LyCORIS' factor (peft's decompose_factor); -1: the factor nearest the square root

    def __post_init__(self):
        super().__post_init__()
        ok = isinstance(self.factor, int) and not isinstance(self.factor, bool) and (self.factor == -1 or
                                                                                      self.factor > 0)
        check(ok, f"{self.type}.factor", "a positive int or -1", self.factor)


def install(unet, cfg: LokrConfig, handle) -> None:
    import peft

    config = peft.LoKrConfig(r=cfg.rank, alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
                             decompose_factor=cfg.factor, target_modules=peft_targets(unet, cfg))
    install_peft(unet, cfg, handle, config)
