"""Tuner weights in other tools' file formats: the LoRA and DoRA baselines as diffusers/peft load them
(`load_lora_weights`) and LoRA as kohya's sd-scripts write it (A1111, ComfyUI).

The key mapping lives with the tuner (`restune_diffusion.tuners.lora`); this module writes the files, atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import save_file

from restune_diffusion.files import atomic_write
from restune_diffusion.tuners.dora import export_diffusers_dora
from restune_diffusion.tuners.lora import export_diffusers_lora, export_kohya_lora

DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
DIFFUSERS_TYPES = ("lora", "dora")  # the tuner types diffusers' load_lora_weights reads


def has_diffusers_format(handle) -> bool:
    return any(c.type in DIFFUSERS_TYPES for c in handle.configs)


def save_diffusers_lora(directory: str | os.PathLike, handle) -> Path:
    """`<directory>/pytorch_lora_weights.safetensors` in diffusers' naming, for `pipe.load_lora_weights(directory)`:
    the set's LoRA or DoRA tuners (not both: diffusers reads a file with any DoRA magnitude as all DoRA)."""
    lora, dora = export_diffusers_lora(handle), export_diffusers_dora(handle)
    if lora and dora:
        raise ValueError(f"tuner set '{handle.name}' has LoRA and DoRA tuners; diffusers reads one file as one kind: "
                         "export them from separate sets")
    state = {k: v.contiguous().cpu() for k, v in (lora or dora).items()}
    if not state:
        raise ValueError(f"tuner set '{handle.name}' has no LoRA or DoRA tuner to export")
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
