"""OFT (Qiu et al., 2023, orthogonal fine-tuning), built by peft: `OFTConfig` on the LoRA row's targets.
W' = W·R with R block-diagonal orthogonal (each block the Cayley transform of a skew-symmetric matrix), which keeps
the angles between the layer's neurons; R = I at init, so the tuned UNet equals the base at step 0. A layer has
in·(b−1)/2 parameters for blocks of size b: b = 32 (peft's default) gives 1,541,568 on SD v1.5, between the paper's
Prompt (1.25 M) and Res-Tuning (2.54 M) rows; b must divide every targeted width (64 is the largest for SD v1.5's
320/640/1280 and the text's 768: 3.13 M). A rotation has no strength: `scale` must stay 1. Mechanism: peft_layers.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from restune_diffusion.config import check_blocks, check_positive_int, check_targets
from restune_diffusion.tuners.lora import PROJECTIONS
from restune_diffusion.tuners.peft_layers import install_peft, peft_targets


@dataclass
class OftConfig:
    type: ClassVar[str] = "oft"
    block_size: int = 32
    targets: tuple = ("attn1", "attn2")
    modules: tuple = PROJECTIONS
    blocks: str | list = "all"

    def __post_init__(self):
        check_positive_int(self.block_size, f"{self.type}.block_size")
        check_targets(self.targets, ("attn1", "attn2"), f"{self.type}.targets")
        check_targets(self.modules, PROJECTIONS, f"{self.type}.modules")
        check_blocks(self.blocks, f"{self.type}.blocks")
        self.targets, self.modules = list(self.targets), list(self.modules)


def install(unet, cfg: OftConfig, handle) -> None:
    import peft

    for path in peft_targets(unet, cfg):  # peft would silently pick another block size
        width = unet.get_submodule(path).in_features
        if width % cfg.block_size:
            raise ValueError(f"{cfg.type}.block_size: {cfg.block_size} does not divide the width {width} of {path}; "
                             "pick a block size that divides every targeted width")
    install_peft(unet, cfg, handle, peft.OFTConfig(r=0, oft_block_size=cfg.block_size,
                                                   target_modules=peft_targets(unet, cfg)))
