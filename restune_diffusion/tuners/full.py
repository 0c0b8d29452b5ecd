"""Full fine-tuning, the paper's reference row: every UNet weight trains (859.5 M on SD v1.5)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass
class FullConfig:
    type: ClassVar[str] = "full"


def install(unet, cfg: FullConfig, handle) -> None:
    unet.requires_grad_(True)
    handle.full_unet = True
