"""Several tuner files on one UNet, each at its own weight, and the tuned UNet compiled (issue 26).

What diffusers/peft users do with LoRAs (`set_adapters(names, adapter_weights)`, A1111's `<lora:x:0.8>`), for every
tuner type: each set adds weight × its contribution (`TunerHandle.scale`). Weights change without reloading anything
and without recompiling a compiled UNet (the weight is a tensor changed in place).

Bypass files are different: each replaces the same input (conv_norm_out's), so several of them are *tasks*
(restune_diffusion.multitask: one image set per task). Mixing them on one UNet is asked for explicitly
(`mix=True`, `generate.py --mix`): the input becomes x + Σ_k w_k·(bypass_k − x).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from restune_diffusion.placement import attached_sets
from restune_diffusion.tuners.bypass import BypassHub
from restune_diffusion.weights import load_tuners, read_tuner_header

WEIGHTED = re.compile(r"^(?P<path>.+):(?P<weight>[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?)$")


def parse_weighted(spec: str | os.PathLike, default: float = 1.0) -> tuple[str, float]:
    """"out/a.safetensors:0.8" -> ("out/a.safetensors", 0.8). The weight comes only from a trailing `:<number>`, so
    a path with ':' in it stays whole ("C:/x.safetensors", "run:3/tuners.safetensors"); a file that exists under the
    whole spec is never split. No weight: `default`."""
    spec = os.fspath(spec)
    match = WEIGHTED.match(spec)
    if match is None or Path(spec).exists():
        return spec, float(default)
    return match["path"], float(match["weight"])


def tuner_types(path: str | os.PathLike) -> list[str]:
    """The tuner types a file holds, read from its header (nothing is loaded): ["bypass"], ["lora", "res_adapter"]."""
    _, meta = read_tuner_header(path)
    try:
        return [str(entry.get("type")) for entry in json.loads(meta["tuners"])]
    except (KeyError, ValueError, AttributeError, TypeError):
        return []  # load_tuners names what is wrong with the header


def load_weighted(unet, specs: Sequence[tuple[str | None, str | os.PathLike, float]], mix: bool = False,
                  device=None) -> dict:
    """Load each (name, path, weight) onto `unet` (name None: the file's own) at its weight -> {name: handle}.
    Several bypass files need mix=True (summed as weighted deltas); otherwise they are tasks, and this says so."""
    handles: dict = {}
    try:
        for name, path, weight in specs:
            handle = load_tuners(unet, path, name=name, device=device)
            handles[handle.name] = handle
            handle.scale = weight
        hub = BypassHub.of(unet)
        bypasses = [r.handle.name for r in hub.runs if r.handle.enabled] if hub is not None else []
        if len(bypasses) > 1:
            if not mix:
                raise ValueError(f"tuners: {len(bypasses)} bypass sets ({', '.join(bypasses)}) on one UNet. Bypass "
                                 "files are tasks: generate one image set per task with restune_diffusion.multitask "
                                 "(generate.py does with several --tuners), or sum them as weighted deltas with "
                                 "mix=True (generate.py --mix)")
            hub.mix = True
    except Exception:
        for handle in handles.values():
            handle.detach()
        raise
    return handles


def mix_bypasses(unet, on: bool = True) -> None:
    """Sum every enabled bypass on `unet` as weighted deltas, x + Σ_k w_k·(bypass_k − x) (on=False: one at a time)."""
    hub = BypassHub.of(unet)
    if hub is None:
        raise ValueError("mix_bypasses: this UNet has no bypass attached")
    hub.mix = on


def set_tuner_weights(target, names: str | Sequence[str], weights: float | Sequence[float] | None = None) -> None:
    """diffusers' `set_adapters(names, adapter_weights)` for tuner sets: the named sets of `target` (a pipeline or
    a UNet) are enabled at these weights (default 1.0), every other set on the UNet is disabled. Nothing reloads."""
    unet = getattr(target, "unet", target)
    sets = attached_sets(unet)
    names = [names] if isinstance(names, str) else list(names)
    if weights is None or isinstance(weights, (int, float)):
        weights = [1.0 if weights is None else weights] * len(names)
    weights = list(weights)
    if len(weights) != len(names):
        raise ValueError(f"set_tuner_weights: {len(names)} names but {len(weights)} weights")
    unknown = [n for n in names if n not in sets]
    if unknown:
        raise ValueError(f"set_tuner_weights: no tuner set named {unknown} on this UNet; sets: {sorted(sets)}")
    chosen = dict(zip(names, weights))
    for name, handle in sets.items():
        if name in chosen:
            handle.scale = chosen[name]
        handle.enabled = name in chosen


def fuse_all(handles) -> list[str]:
    """fuse() every handle that has something exact to fuse -> one line per set saying what was done or why not."""
    lines = []
    for handle in handles:
        try:
            plan = handle.fuse()
            lines.append(f"{handle.name}: " + "; ".join(f"{kind} {what}" for kind, what in plan.items()))
        except ValueError as err:
            lines.append(str(err))
    return lines


def compile_unet(unet, mode: str | None = None):
    """torch.compile the UNet in place (`nn.Module.compile`, fullgraph=True: a graph break is an error), so the tuner
    handles, hooks and processors stay on the module they know. A tuner weight change does not recompile; attaching,
    detaching, enabling/disabling a set, fusing, or a new input shape does, once. mode: torch.compile's ("default",
    "reduce-overhead" = CUDA graphs as in diffusers' recipe, "max-autotune")."""
    unet.compile(fullgraph=True, mode=None if mode in (None, "default") else mode)
    return unet

