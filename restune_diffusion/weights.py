"""Tuner weights as one safetensors file that rebuilds itself: tensors + tuner config, base fingerprint and version
in the header (k-diffusion / diffusers keep the config there too). Written atomically (files.atomic_write).

Header keys: `format` ("restune-diffusion/1"), `tuners` (JSON list of tuner configs), `name`, `base_fingerprint`,
`cross_attention_dim`, `block_out_channels`, `package_version`, `num_tensors`. A training run's files add how they
were made (train/outputs.py header_facts, issue 17): `base_model` (name, path or hub id), `base_model_revision`,
`base_model_variant`, `base_model_fingerprint` (its weights), `global_step`, `dataset`, `data_dir`,
`num_train_samples`, `data_fingerprint`; an EMA file (ema.py) also `ema_decay` and `ema_updates`.

A file from a stranger cannot hang, exhaust or silently break anything (issue 13, items 6-9):
- `blocks` is stored as the exact block names the set was attached to, never as a pattern; a pattern read from a file
  must be safe to run (`safe_file_pattern`), since regexes from files are code (ReDoS).
- every config is built first on a meta-device copy of the UNet and each tensor shape compared with the file's, so a
  header claiming `dim: 2**40` fails in milliseconds without allocating;
- NaN/Inf tensors are refused by file and tensor name unless `allow_nonfinite=True` (then a warning names them);
- every error about the file's config starts with the file's path.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from restune_diffusion.attach import attach, select_blocks, transformer_blocks
from restune_diffusion.files import atomic_write
from restune_diffusion.placement import unet_fingerprint
from restune_diffusion.tuners import parse_tuner_configs, to_dicts
from restune_diffusion.version import __version__

FORMAT = "restune-diffusion/1"
BLOCK_KEYWORDS = ("all", "down", "mid", "up")
MAX_FILE_PATTERN = 200  # characters of a `blocks` pattern read from a file
log = logging.getLogger(__name__)


def base_metadata(unet) -> dict[str, str]:
    return {
        "format": FORMAT,
        "base_fingerprint": unet_fingerprint(unet),
        "cross_attention_dim": str(unet.config.cross_attention_dim),
        "block_out_channels": json.dumps(list(unet.config.block_out_channels)),
        "package_version": __version__,
    }


def save_tuners(path: str | os.PathLike, handle, extra_metadata: dict[str, str] | None = None) -> Path:
    """Write the handle's tuner tensors (fp32 unless stored otherwise) and config into one .safetensors file."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in handle.state_dict().items()}
    meta = base_metadata(handle.unet)
    meta.update(name=handle.name, tuners=json.dumps(_explicit_blocks(handle.unet, handle.configs)),
                num_tensors=str(len(state)))
    meta.update(extra_metadata or {})
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta))


def _explicit_blocks(unet, configs: list) -> list[dict]:
    """Config dicts for a file, each `blocks` (keyword, regex or positions) replaced by the exact block names it
    selected: a loader then never runs a pattern from a file (PITFALLS: regexes from files are code)."""
    dicts = to_dicts(configs)
    for d in dicts:
        if "blocks" in d:
            d["blocks"] = [name for name, _ in select_blocks(unet, d["blocks"], field=f"{d['type']}.blocks")]
    return dicts


def _readable(path: Path, read):
    """read(path) for a safetensors file, or one error that says what the file is not."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: tuner file not found")
    try:
        return read(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err}); it may be truncated or of another "
                         "format. Expected a file written by restune_diffusion.save_tuners.") from None


def read_tuner_header(path: str | os.PathLike) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """(tensor shapes, metadata) of a tuner file without reading its tensors."""
    path = Path(path)

    def read(name: str):
        with safe_open(name, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata() or {}  # noqa: SIM118

    shapes, meta = _readable(path, read)
    if meta.get("format") != FORMAT or "tuners" not in meta:
        raise ValueError(f"{path}: a safetensors file without restune-diffusion tuner metadata "
                         f"(format={meta.get('format')!r}); expected one written by save_tuners")
    return shapes, meta


def read_tuner_file(path: str | os.PathLike,
                    allow_nonfinite: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a tuner file, or an error that says what the file is not. NaN/Inf values are an error
    naming the file and tensors (a diverged run's weights give black images), or a warning with allow_nonfinite."""
    path = Path(path)
    _, meta = read_tuner_header(path)
    tensors = _readable(path, load_file)
    bad = {k: int((~torch.isfinite(t)).sum()) for k, t in tensors.items() if t.is_floating_point()}
    bad = {k: n for k, n in bad.items() if n}
    if bad:
        named = ", ".join(f"{k} ({n} of {tensors[k].numel()})" for k, n in list(bad.items())[:5])
        message = f"{path}: {len(bad)} tensor(s) hold NaN/Inf values: {named}"
        if not allow_nonfinite:
            raise ValueError(f"{message}. The weights are broken (e.g. saved after a diverged step); use an earlier "
                             "checkpoint, or pass allow_nonfinite=True to load them anyway")
        log.warning("%s (loaded anyway: allow_nonfinite)", message)
    return tensors, meta


def base_mismatch(meta: dict[str, str], unet, path) -> str | None:
    """One line naming the base the file was made for and the one it met, or None when they agree."""
    if meta.get("base_fingerprint") == unet_fingerprint(unet):
        return None
    made = f"cross_attention_dim={meta.get('cross_attention_dim')}, block_out_channels={meta.get('block_out_channels')}"
    cfg = unet.config
    met = f"cross_attention_dim={cfg.cross_attention_dim}, block_out_channels={list(cfg.block_out_channels)}"
    return (f"{path}: tuners made for another UNet architecture (fingerprint {meta.get('base_fingerprint')}: "
                     f"{made}); this UNet has fingerprint {unet_fingerprint(unet)}: {met}")


def safe_file_pattern(pattern: str) -> bool:
    """A regex read from a file runs only without groups, braces or lookarounds, with at most two quantifiers and
    MAX_FILE_PATTERN characters: on ~60-character block names it then cannot backtrack catastrophically."""
    if len(pattern) > MAX_FILE_PATTERN or any(c in pattern for c in "(){}"):
        return False
    if sum(pattern.count(c) for c in "*+?") > 2:
        return False
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def _file_blocks(blocks: Any, unet, field: str) -> Any:
    """A file's `blocks`: exact block names (turned into positions), positions, a keyword, or a safe pattern."""
    if isinstance(blocks, list) and blocks and all(isinstance(b, str) for b in blocks):
        position = {name: i for i, (name, _) in enumerate(transformer_blocks(unet))}
        unknown = [b for b in blocks if b not in position]
        if unknown or len(set(blocks)) != len(blocks):
            raise ValueError(f"{field}: expected distinct names of this UNet's transformer blocks (e.g. "
                             f"{next(iter(position))}), got {unknown[:3] or 'a repeated name'}")
        return [position[b] for b in blocks]
    if isinstance(blocks, str) and blocks not in BLOCK_KEYWORDS and not safe_file_pattern(blocks):
        raise ValueError(f"{field}: {blocks[:80]!r} is not a pattern a file may carry (regexes from files must have no "
                         f"groups or braces, at most 2 quantifiers, <= {MAX_FILE_PATTERN} characters); files written "
                         "by save_tuners store exact block names")
    return blocks


def file_configs(meta: dict[str, str], unet, path) -> list:
    """The validated tuner configs of a file's header, blocks resolved on `unet`; every error names the file."""
    try:
        try:
            entries = json.loads(meta["tuners"])
        except json.JSONDecodeError as err:
            raise ValueError(f"the 'tuners' metadata is not valid JSON ({err})") from None
        if not isinstance(entries, list):
            raise ValueError(f"the 'tuners' metadata must be a JSON list of configs, got {type(entries).__name__}")
        for i, entry in enumerate(entries):
            if isinstance(entry, dict) and "blocks" in entry:
                entry["blocks"] = _file_blocks(entry["blocks"], unet, f"tuners[{i}].blocks")
        return parse_tuner_configs(entries)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: tuner config in the file's metadata: {err}") from None


def check_shapes(unet, configs: list, shapes: dict[str, tuple[int, ...]], path) -> None:
    """Build the tuners on a meta-device copy of `unet` (no memory) and compare each tensor's shape with the file's,
    before anything is allocated: a header claiming `dim: 2**40` fails here in milliseconds."""
    with torch.device("meta"):
        ghost = type(unet).from_config(unet.config)
        try:
            handle = attach(ghost, configs, name="shape-check")
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: tuner config in the file's metadata does not fit this UNet: {err}") from None
        stored = {k: torch.empty(s) for k, s in shapes.items()}  # meta tensors of the file's shapes
        handle.load_state_dict(stored, strict=True, source=str(path))


def load_tuners(unet, path: str | os.PathLike, name: str | None = None, device=None, allow_nonfinite: bool = False):
    """Rebuild the tuner set stored in `path` on `unet` (attach + strict load). Returns the handle. Configs and shapes
    are checked before any tensor is read or module built; non-finite tensors refused unless allow_nonfinite."""
    shapes, meta = read_tuner_header(path)
    try:
        configs = file_configs(meta, unet, path)
        check_shapes(unet, configs, shapes, path)
    except ValueError as err:
        reason = base_mismatch(meta, unet, path)  # the base first, then what did not fit
        raise ValueError(f"{reason}\n{err}" if reason else str(err)) from None
    tensors, meta = read_tuner_file(path, allow_nonfinite)
    handle = attach(unet, configs, name=name or meta.get("name", "default"))
    handle.keep_base_weights()  # a full fine-tuning file overwrites the UNet: detach() puts the base back
    try:
        count = handle.load_state_dict(tensors, strict=True, source=str(path))
    except Exception:
        handle.detach()
        raise
    log.info("%s: loaded %d tuner tensors (%s) into set '%s'", path, count, meta.get("num_tensors"), handle.name)
    if device is not None:
        handle.to(device)
    return handle


def load_tuners_into(handle, path: str | os.PathLike, allow_nonfinite: bool = False) -> int:
    """Load a file's tensors into an already attached handle (same config); returns the tensor count."""
    tensors, _ = read_tuner_file(path, allow_nonfinite)
    return handle.load_state_dict(tensors, strict=True, source=str(path))
