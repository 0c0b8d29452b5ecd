"""Tuner weights as one safetensors file that rebuilds itself: tensors + tuner config, base fingerprint and version
in the header (k-diffusion / diffusers keep the config there too). Written atomically (tmp file + os.replace).

Header keys: `format` ("restune-diffusion/1"), `tuners` (JSON list of tuner configs), `name`, `base_fingerprint`,
`cross_attention_dim`, `block_out_channels`, `package_version`, `num_tensors`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

FORMAT = "restune-diffusion/1"
log = logging.getLogger(__name__)


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call write(tmp_path), then rename over `path`: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file (JSON, YAML, logs) through atomic_write."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def base_metadata(unet) -> dict[str, str]:
    from restune_diffusion import __version__
    from restune_diffusion.models import unet_fingerprint

    return {
        "format": FORMAT,
        "base_fingerprint": unet_fingerprint(unet),
        "cross_attention_dim": str(unet.config.cross_attention_dim),
        "block_out_channels": json.dumps(list(unet.config.block_out_channels)),
        "package_version": __version__,
    }


def save_tuners(path: str | os.PathLike, handle, extra_metadata: dict[str, str] | None = None) -> Path:
    """Write the handle's tuner tensors (fp32 unless stored otherwise) and config into one .safetensors file."""
    from safetensors.torch import save_file

    from restune_diffusion.config import to_dicts

    state = {k: v.detach().to("cpu").contiguous() for k, v in handle.state_dict().items()}
    meta = base_metadata(handle.unet)
    meta.update(name=handle.name, tuners=json.dumps(to_dicts(handle.configs)), num_tensors=str(len(state)))
    meta.update(extra_metadata or {})
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta))


def read_tuner_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a tuner file, or an error that says what the file is not."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: tuner file not found")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err}); it may be truncated or of another "
                         "format. Expected a file written by restune_diffusion.save_tuners.") from None
    if meta.get("format") != FORMAT or "tuners" not in meta:
        raise ValueError(f"{path}: a safetensors file without restune-diffusion tuner metadata "
                         f"(format={meta.get('format')!r}); expected one written by save_tuners")
    return tensors, meta


def base_mismatch(meta: dict[str, str], unet, path) -> str | None:
    """One line naming the base the file was made for and the one it met, or None when they agree."""
    from restune_diffusion.models import unet_fingerprint

    if meta.get("base_fingerprint") == unet_fingerprint(unet):
        return None
    made = f"cross_attention_dim={meta.get('cross_attention_dim')}, block_out_channels={meta.get('block_out_channels')}"
    cfg = unet.config
    met = f"cross_attention_dim={cfg.cross_attention_dim}, block_out_channels={list(cfg.block_out_channels)}"
    return (f"{path}: tuners made for another UNet architecture (fingerprint {meta.get('base_fingerprint')}: "
                     f"{made}); this UNet has fingerprint {unet_fingerprint(unet)}: {met}")


def load_tuners(unet, path: str | os.PathLike, name: str | None = None, device=None):
    """Rebuild the tuner set stored in `path` on `unet` (attach + strict load). Returns the handle."""
    from restune_diffusion.attach import attach

    tensors, meta = read_tuner_file(path)
    try:
        configs = json.loads(meta["tuners"])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: the 'tuners' metadata is not valid JSON ({err})") from None
    handle = attach(unet, configs, name=name or meta.get("name", "default"))
    try:
        try:
            count = handle.load_state_dict(tensors, strict=True, source=str(path))
        except ValueError as err:
            reason = base_mismatch(meta, unet, path)  # the base first, then the tensors and both shapes
            raise ValueError(f"{reason}\n{err}" if reason else str(err)) from None
    except Exception:
        handle.detach()
        raise
    log.info("%s: loaded %d tuner tensors (%s) into set '%s'", path, count, meta.get("num_tensors"), handle.name)
    if device is not None:
        handle.to(device)
    return handle


def load_tuners_into(handle, path: str | os.PathLike) -> int:
    """Load a file's tensors into an already attached handle (same config); returns the tensor count."""
    tensors, meta = read_tuner_file(path)
    return handle.load_state_dict(tensors, strict=True, source=str(path))
