"""Parameter report of a tuner config on a UNet: per tuner type and per block, with % of the UNet.

    python -m restune_diffusion.report configs/res_tuning.yaml [--model sd15|tiny|tiny-random|PATH]

The model is the one the config names (`train.pretrained_model_name_or_path`), else SD v1.5; `--model` overrides.
Only the UNet's architecture is built, on the meta device (no memory, no weights read). The last line is exactly
`trainable_params=<integer>`.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

import torch

from restune_diffusion.attach import attach
from restune_diffusion.config import load_yaml
from restune_diffusion.models import TINY, TINY_ASSETS, TINY_RANDOM, build_unet, check_sd15_folder
from restune_diffusion.tuners import REGISTRY

DEFAULT_MODEL = "sd15"


def _split_key(key: str, kinds) -> tuple[str, str]:
    """(tuner type, block) of a key like `up_blocks.1.attentions.0.transformer_blocks.0.ff.res_adapter.up.weight`."""
    parts = key.split(".")
    kind = next((p for p in parts if p in kinds), "other")
    found = re.match(r"(.*?transformer_blocks\.\d+)\.", key)
    if found:
        return kind, found.group(1)
    return kind, ".".join(parts[: parts.index(kind)]) if kind in parts else parts[0]


def count_by(handle) -> tuple[dict[str, int], dict[str, int]]:
    by_kind: dict[str, int] = defaultdict(int)
    by_block: dict[str, int] = defaultdict(int)
    for key, p in handle.module.named_parameters():
        if not p.requires_grad:
            continue
        kind, block = _split_key(key, REGISTRY)
        by_kind[kind] += p.numel()
        by_block[block] += p.numel()
    if handle.full_unet:
        total = sum(p.numel() for p in handle.unet.parameters() if p.requires_grad)
        by_kind["full"] += total
        by_block["unet (all weights)"] += total
    return dict(by_kind), dict(by_block)


def format_report(handle) -> str:
    unet_params = sum(p.numel() for p in handle.unet.parameters())
    by_kind, by_block = count_by(handle)
    total = handle.num_parameters()

    def table(title: str, rows: dict[str, int]) -> list[str]:
        width = max([len(title)] + [len(k) for k in rows])
        lines = [f"{title:<{width}}  {'params':>13}  {'% of UNet':>9}", "-" * (width + 26)]
        lines += [f"{k:<{width}}  {v:>13,}  {100 * v / unet_params:>8.3f}%" for k, v in rows.items()]
        return lines

    lines = [f"tuner set '{handle.name}' on a UNet of {unet_params:,} parameters", ""]
    lines += table("tuner type", by_kind) + [""] + table("block", by_block) + [""]
    lines += [f"total trainable: {total:,} ({total / 1e6:.3f} M, {100 * total / unet_params:.3f}% of the UNet)"]
    return "\n".join(lines)


def build_report_unet(model: str):
    """The UNet architecture `model` names, on the meta device: "sd15", "tiny" (the shipped pretrained tiny base),
    "tiny-random" (the test model's), or a local diffusers SD folder (its unet/config.json; no weights read)."""
    if model in (DEFAULT_MODEL, TINY_RANDOM):
        return build_unet(model, device="meta")
    from diffusers import UNet2DConditionModel  # diffusers is slow to import: on first use

    folder = check_sd15_folder(TINY_ASSETS if model == TINY else model)
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))


def model_of(config: str, override: str | None) -> tuple[str, str]:
    """(model, where that choice came from): --model, else the config's train.pretrained_model_name_or_path, else
    SD v1.5."""
    if override:
        return override, "--model"
    named = (load_yaml(config).get("train") or {}).get("pretrained_model_name_or_path")
    if named:
        return str(named), f"{config}: train.pretrained_model_name_or_path"
    return DEFAULT_MODEL, "default"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Trainable parameters of a tuner config, per tuner type and block.")
    parser.add_argument("config", help="a YAML config with a tuners: list (e.g. configs/res_tuning.yaml)")
    parser.add_argument("--model", default=None,
                        help="sd15, tiny, tiny-random or a local SD folder; default: the model the config names "
                             "(train.pretrained_model_name_or_path), else sd15")
    args = parser.parse_args(argv)
    model, source = model_of(args.config, args.model)
    handle = attach(build_report_unet(model), args.config)
    print(f"model: {model} ({source})")
    print(format_report(handle))
    print(f"trainable_params={handle.num_parameters()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
