"""Tuner weights in other tools' file formats: the LoRA baseline as diffusers/peft load it (`load_lora_weights`)
and as kohya's sd-scripts write it (A1111, ComfyUI).

The key mapping lives with the tuner (`restune_diffusion.tuners.lora`); this module writes the files, atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import save_file

from restune_diffusion.files import atomic_write
from restune_diffusion.tuners.lora import export_diffusers_lora, export_kohya_lora

DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"


def save_diffusers_lora(directory: str | os.PathLike, handle) -> Path:
    """`<directory>/pytorch_lora_weights.safetensors` in diffusers' naming, for `pipe.load_lora_weights(directory)`."""
    state = {k: v.contiguous().cpu() for k, v in export_diffusers_lora(handle).items()}
    if not state:
        raise ValueError(f"tuner set '{handle.name}' has no LoRA tuner to export")
    path = Path(directory) / DIFFUSERS_LORA_FILE
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))


def save_kohya_lora(path: str | os.PathLike, handle, base_model: str | None = None) -> Path:
    """One kohya/A1111 LoRA file at `path` (`.safetensors`), with kohya's `ss_*` metadata (+ `ss_sd_model_name`)."""
    state, metadata = export_kohya_lora(handle)
    if not state:
        raise ValueError(f"tuner set '{handle.name}' has no LoRA tuner to export")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: expected a .safetensors file name for the kohya LoRA")
    if base_model:
        metadata["ss_sd_model_name"] = str(base_model)
    state = {k: v.contiguous().cpu() for k, v in state.items()}
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))
