"""Sequential adapter (Houlsby et al.), the bound baseline: x' = OP(x) + A(OP(x)), the adapter *after* the op.

Same bottleneck module as Res-Adapter; only where it reads its input differs. Paper row "Adapter": dim 100 after the
FFN of each of the 16 transformer blocks (2.51 M on SD v1.5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from restune_diffusion.placement import iter_ops
from restune_diffusion.tuners.res_adapter import ResAdapter, ResAdapterConfig, op_width


@dataclass
class AdapterConfig(ResAdapterConfig):
    type: ClassVar[str] = "adapter"


def install(unet, cfg: AdapterConfig, handle) -> None:
    for path, op in iter_ops(unet, cfg.blocks, cfg.targets, cfg.type):
        tuner = handle.add_module(f"{path}.{cfg.type}", ResAdapter(op_width(op), cfg.dim, cfg.act, cfg.scale))
        handle.add_residual(op, tuner, on_output=True)
