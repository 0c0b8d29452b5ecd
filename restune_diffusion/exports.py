"""Tuner weights in other tools' file formats: the LoRA baseline as diffusers/peft load it (`load_lora_weights`).

The key mapping lives with the tuner (`restune_diffusion.tuners.lora`); this module writes the files, atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import save_file

from restune_diffusion.tuners.lora import export_diffusers_lora
from restune_diffusion.weights import atomic_write

DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"


def save_diffusers_lora(directory: str | os.PathLike, handle) -> Path:
    """`<directory>/pytorch_lora_weights.safetensors` in diffusers' naming, for `pipe.load_lora_weights(directory)`."""
    state = {k: v.contiguous().cpu() for k, v in export_diffusers_lora(handle).items()}
    if not state:
        raise ValueError(f"tuner set '{handle.name}' has no LoRA tuner to export")
    path = Path(directory) / DIFFUSERS_LORA_FILE
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
