"""Where tuners sit on a diffusers UNet, and how a hook reads the call of the op it sits on.

The layer under the tuner files and attach.py (DESIGN.md, "Layering"): it knows the UNet's transformer blocks and
their ops (attn1, attn2, ff, the whole block), which tuner sets a UNet carries, and nothing about any tuner.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn


def transformer_blocks(unet) -> list[tuple[str, nn.Module]]:
    """The UNet's BasicTransformerBlocks in forward order (down, mid, up), as (name, module)."""
    from diffusers.models.attention import BasicTransformerBlock  # diffusers is slow to import: on first use

    blocks = [(n, m) for n, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)]
    stage = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    return sorted(blocks, key=lambda nm: stage.get(nm[0].split(".")[0], 3))  # sort is stable: keeps in-stage order


def select_blocks(unet, blocks, field: str = "blocks") -> list[tuple[str, nn.Module]]:
    """`blocks`: "all" | "down" | "mid" | "up" | a regex on the block name | a list of positions (forward order)."""
    every = transformer_blocks(unet)
    if blocks == "all":
        chosen = every
    elif blocks in ("down", "mid", "up"):
        prefix = {"down": "down_blocks.", "mid": "mid_block.", "up": "up_blocks."}[blocks]
        chosen = [nm for nm in every if nm[0].startswith(prefix)]
    elif isinstance(blocks, str):
        chosen = [nm for nm in every if re.search(blocks, nm[0])]
    else:
        bad = [i for i in blocks if not isinstance(i, int) or not -len(every) <= i < len(every)]
        if bad:
            raise ValueError(f"{field}: positions must be ints in [0, {len(every)}), got {bad}")
        chosen = [every[i] for i in blocks]
    if not chosen:
        names = ", ".join(n for n, _ in every[:4])
        raise ValueError(f"{field}={blocks!r} matches no transformer block; blocks are named like {names}, ...")
    return chosen


def op_of(block: nn.Module, target: str) -> nn.Module:
    """The op of a transformer block a tuner sits on: attn1, attn2, ff, or the whole block."""
    return block if target == "block" else getattr(block, target)


def iter_ops(unet, blocks, targets: Iterable[str], field: str) -> Iterator[tuple[str, nn.Module]]:
    """(path, op) for each selected block × target, e.g. ("up_blocks.1.attentions.0.transformer_blocks.0.ff", ff)."""
    for block_name, block in select_blocks(unet, blocks, field=f"{field}.blocks"):
        for target in targets:
            op = op_of(block, target)
            if op is None:
                raise ValueError(f"{field}.targets: block {block_name} has no {target}")
            yield (block_name if target == "block" else f"{block_name}.{target}"), op


# ---------------------------------------------------------------------------------------------------------------------
# reading and replacing an op's input inside a forward (pre-)hook


def call_input(args: tuple, kwargs: dict, name: str = "hidden_states") -> torch.Tensor:
    """The op's first input, passed by position or as keyword `name`."""
    return args[0] if args else kwargs[name]


def replace_input(args: tuple, kwargs: dict, new: torch.Tensor, name: str = "hidden_states") -> tuple[tuple, dict]:
    """(args, kwargs) with the first input replaced: what a forward pre-hook with kwargs returns."""
    return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, name: new})


def cast_call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a tuner in its own dtype and hand the result back in the backbone's (fp32 tuners on an fp16 UNet)."""
    dtype = next(module.parameters()).dtype
    return module(x.to(dtype)).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# the tuner sets a UNet carries


def tuner_sets(unet) -> dict[str, Any]:
    """The live registry name -> handle of the tuner sets on `unet` (attach adds, detach removes)."""
    return unet.__dict__.setdefault("_restune_sets", {})


def attached_sets(unet) -> dict[str, Any]:
    """A copy of the tuner sets on `unet`, name -> handle."""
    return dict(unet.__dict__.get("_restune_sets", {}))


def unet_fingerprint(unet) -> str:
    """A short hash of the UNet config fields that fix tensor shapes (which base a tuner file was made for)."""
    keys = ("in_channels", "block_out_channels", "layers_per_block", "cross_attention_dim", "attention_head_dim",
            "down_block_types", "up_block_types", "transformer_layers_per_block")
    cfg = {k: unet.config.get(k) for k in keys}
    cfg = json.loads(json.dumps(cfg, default=list))
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]
