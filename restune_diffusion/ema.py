"""Exponential moving average of a tuner set's trainable weights (`--use_ema`; diffusers #9998 and kohya #1321 ask for
it for LoRA): an fp32 shadow copy, updated after each optimizer step, saved as a tuner file that load_tuners reads.

The decay ramps as in diffusers' EMAModel (its default, without `use_ema_warmup`): the k-th update uses
min(decay, (1 + (k-1)) / (10 + (k-1))), 0 at the first, so the average starts at the trained weights rather than at
the zero-initialised ones. `--ema_decay` defaults to 0.999, not diffusers' 0.9999: 0.9999 averages over ~10,000 steps,
longer than most tuner runs (a 500-step run would keep ~95% of its zero init); 0.999 averages over ~1,000 steps.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from restune_diffusion.weights import read_tuner_file, save_tuners

EMA_FILE = "tuners_ema.safetensors"
DEFAULT_DECAY = 0.999


def trainable_tensors(handle) -> dict[str, torch.nn.Parameter]:
    """The handle's trainable parameters under their state-dict keys (full fine-tuning: `unet.<key>`)."""
    named = {k: p for k, p in handle.module.named_parameters() if p.requires_grad}
    if handle.full_unet:
        named.update({f"unet.{k}": p for k, p in handle.unet.named_parameters() if p.requires_grad})
    return named


class TunerEMA:
    """An fp32 shadow of one tuner set's trainable tensors; `update()` after each optimizer step."""

    def __init__(self, handle, decay: float = DEFAULT_DECAY):
        if not (isinstance(decay, float) and 0.0 < decay < 1.0):
            raise ValueError(f"--ema_decay must be a number in (0, 1), got {decay!r}")
        self.handle, self.decay, self.num_updates = handle, decay, 0
        self.params = trainable_tensors(handle)
        self.shadow = {k: p.detach().float().clone() for k, p in self.params.items()}

    def current_decay(self) -> float:
        """The decay of the next update (diffusers' EMAModel.get_decay without warmup or update_after_step)."""
        step = self.num_updates  # updates already done
        return 0.0 if step <= 0 else min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self) -> None:
        """shadow = d·shadow + (1 - d)·weights."""
        weight = 1.0 - self.current_decay()
        for key, p in self.params.items():
            self.shadow[key].lerp_(p.detach().float(), weight)
        self.num_updates += 1

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Inside: the handle's trainable tensors hold the average (validation, export); restored after, exactly."""
        saved = {k: p.detach().clone() for k, p in self.params.items()}
        with torch.no_grad():
            for key, p in self.params.items():
                p.copy_(self.shadow[key])
        try:
            yield
        finally:
            with torch.no_grad():
                for key, p in self.params.items():
                    p.copy_(saved[key])

    def save(self, path: str | os.PathLike, extra_metadata: dict[str, str] | None = None) -> Path:
        """The averaged set as a tuner file (load_tuners reads it like tuners.safetensors), with the update count and
        decay in its header so a resume continues the average exactly."""
        meta = {"ema_decay": repr(self.decay), "ema_updates": str(self.num_updates), **(extra_metadata or {})}
        with self.applied():
            return save_tuners(path, self.handle, extra_metadata=meta)

    @torch.no_grad()
    def load(self, path: str | os.PathLike) -> int:
        """The shadow and update count from a file `save` wrote; returns the tensor count."""
        tensors, meta = read_tuner_file(path)
        missing = sorted(set(self.shadow) - set(tensors))
        if missing or "ema_updates" not in meta:
            raise ValueError(f"{path}: not an EMA file of this tuner set (missing {missing[:3] or 'ema_updates'})")
        for key, value in self.shadow.items():
            value.copy_(tensors[key])
        self.num_updates = int(meta["ema_updates"])
        return len(self.shadow)
