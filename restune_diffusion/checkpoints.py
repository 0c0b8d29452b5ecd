"""Checkpoints of a training run: what makes one complete, which one `latest` is, and what a resume may change.

A checkpoint is `checkpoint-<step>/` holding accelerate's state, the tuners and `train_state.json`, written last, with
the size of every other file (so a truncated `optimizer.bin` is caught by name), the resolved run config and the
fingerprints of the base model and the data set. `latest` is the newest checkpoint that passes these checks; a
resume from checkpoint-k moves newer ones (an abandoned run's) aside, so `latest` is always the current run's.

What a resume may change (PITFALLS "resume must not print one setting and use another"): every setting is in
exactly one of APPLIED (takes effect from the resumed step, and the log says so) or REFUSED (with the reason).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from restune_diffusion.files import atomic_write_text

STATE_FILE = "train_state.json"  # written last into a checkpoint: its presence means the checkpoint is complete
CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
ABANDONED_DIR = "abandoned"  # newer checkpoints of a run resumed from an older one go here

# a new value on resume: applied from the resumed step on (how)
APPLIED = {
    "learning_rate": "the optimizer's base LR is set to it; the schedule continues from the resumed step",
    "scale_lr": "the base LR is recomputed with it",
    "lr_scheduler": "the schedule is rebuilt with it at the resumed step",
    "lr_warmup_steps": "the schedule is rebuilt with it at the resumed step",
    "max_train_steps": "the run and its schedule end at the new step",
    "num_train_epochs": "the run and its schedule end at the new length",
    "adam_beta1": "set on the optimizer", "adam_beta2": "set on the optimizer",
    "adam_weight_decay": "set on the optimizer", "adam_epsilon": "set on the optimizer",
    "max_grad_norm": "clipping uses it", "snr_gamma": "the loss weighting uses it",
    "noise_offset": "the noise uses it", "mixed_precision": "the frozen weights and autocast use it",
    "gradient_checkpointing": "same numbers, other memory", "enable_xformers_memory_efficient_attention": "same math",
    "checkpointing_steps": "bookkeeping", "checkpoints_total_limit": "bookkeeping", "validation_prompt": "bookkeeping",
    "num_validation_images": "bookkeeping", "validation_steps": "bookkeeping", "report_to": "bookkeeping",
    "output_dir": "bookkeeping", "dataloader_num_workers": "same samples", "cache_latents": "same images",
    "latent_cache_dir": "same images", "dataset_name": "checked by the data set's fingerprint instead",
    "dataset_config_name": "checked by the data set's fingerprint instead",
    "split": "checked by the data set's fingerprint instead", "max_train_samples": "checked by the data set's "
    "fingerprint instead", "caption_template": "checked by the data set's fingerprint (it holds the captions)",
    "class_names": "checked by the data set's fingerprint (it holds the captions)",
    "scan_mode": "checked by the data set's fingerprint (the images it keeps)",
    "data_dir": "checked by the data set's fingerprint instead (a moved folder is fine)",
    "dataset": "checked by the data set's fingerprint instead",
    "skip_bad_images": "checked by the data set's fingerprint instead",
    "pretrained_model_name_or_path": "checked by the base model's fingerprint instead (a moved folder is fine)",
    "world_report": "checked by the data set's fingerprint (it picks the tiny world's concept data)",
    "revision": "checked by the base model's fingerprint instead",
    "variant": "checked by the base model's fingerprint instead",
    "allow_tf32": "matmuls and convolutions use it", "ema_decay": "the average continues with it",
    "validation_epochs": "bookkeeping",
}
_DATA = "each sample would change: the tuners would continue on other data"
_POSITION = ("the data position of the checkpoint is counted in steps of the old batch: samples would be skipped or "
             "repeated")
REFUSED = {
    "seed": "the data order and the noise of every step derive from it",
    "train_batch_size": _POSITION, "gradient_accumulation_steps": _POSITION, "num_processes": _POSITION,
    "use_8bit_adam": "the optimizer state has another format",
    "prediction_type": "the tuners learned the other target",
    "resolution": _DATA, "center_crop": _DATA, "random_flip": _DATA, "caption_mode": _DATA,
    "caption_column": _DATA, "image_column": _DATA, "category": _DATA,
    "image_interpolation_mode": _DATA, "caption_dropout_rate": _DATA,
    "tuners": "the checkpoint's tuners are other modules (same shapes or not)",
    "tasks": "a joint run's bypasses (names, tuners, per-task settings) are fixed by its checkpoints",
    "use_ema": "the EMA of the tuner weights runs from step 0: turned on at a resume it would average from there, "
               "turned off it would be dropped",
    "validation_split": "the held-out images, and so the training images, would change",
    "validation_seed": "the held-out images, and so the training images, would change",
}
FINGERPRINTS = {"base_model": "another base model", "data": "another data set (other images or captions)"}


class DiskWriteError(OSError):
    """A checkpoint or log could not be written (disk full, file-size limit); the complete checkpoints are intact."""


# ---------------------------------------------------------------------------------------------------------------------
# complete or not
def checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT_RE.fullmatch(path.name)
    return int(match.group(1)) if match else None


def read_state(path: Path) -> dict:
    """The checkpoint's state file, or an error naming it."""
    file = path / STATE_FILE
    try:
        state = json.loads(file.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: not a complete checkpoint (no {STATE_FILE}); it may be half-written. "
                         "Pass another checkpoint or 'latest'") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file}: unreadable ({err}); the checkpoint is damaged. Pass another checkpoint "
                         "or 'latest'") from None
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise ValueError(f"{file}: expected a JSON object with global_step, got {str(state)[:80]!r}")
    return state


def checkpoint_problem(path: Path) -> str | None:
    """None for a complete checkpoint, else one line naming the file that is missing, truncated or unreadable."""
    try:
        state = read_state(path)
    except ValueError as err:
        return str(err)
    for name, size in (state.get("files") or {}).items():
        file = path / name
        if not file.is_file():
            return f"{file}: missing; the checkpoint is damaged"
        if file.stat().st_size != size:
            return (f"{file}: {file.stat().st_size} bytes where the checkpoint recorded {size} (truncated?); the "
                    "checkpoint is damaged")
    return None


def file_sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def write_state(folder: Path, state: dict) -> Path:
    """The state file, last, with the sizes of everything already in the folder."""
    state = {**state, "files": file_sizes(folder)}
    return atomic_write_text(folder / STATE_FILE, json.dumps(state, indent=1))


def checkpoint_folders(output_dir: str | os.PathLike) -> list[Path]:
    """Every `checkpoint-<step>/` folder, complete or not, oldest first by integer step."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (state file present, every recorded file at its recorded size), oldest first by step."""
    return [p for p in checkpoint_folders(output_dir) if checkpoint_problem(p) is None]


def find_checkpoint(output_dir: str | os.PathLike, resume: str | None,
                    say: Callable[[str], Any] = print) -> Path | None:
    """The checkpoint to resume from: None (fresh), the newest complete one for "latest" (None if there is none,
    damaged newer ones named through `say`), or a path. A path that is not a complete checkpoint is an error naming
    the damaged file, never a silent fresh start."""
    if resume is None:
        return None
    if resume == "latest":
        for path in reversed(checkpoint_folders(output_dir)):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            say(f"warning: --resume_from_checkpoint latest skips {path.name}: {problem}")
        return None
    path = Path(resume)
    if not path.is_dir() and (Path(output_dir) / resume).is_dir():
        path = Path(output_dir) / resume  # diffusers also accepts the folder name inside output_dir
    if not path.is_dir():
        have = [p.name for p in list_checkpoints(output_dir)]
        raise FileNotFoundError(f"--resume_from_checkpoint {resume}: no such folder (nor in {output_dir}); "
                                f"checkpoints there: {', '.join(have) or 'none'}. Pass one of them or 'latest'")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(problem if problem.startswith(str(path)) else f"{path}: {problem}")
    return path


def prune_checkpoints(output_dir: Path, limit: int | None) -> None:
    """Keep the newest `limit` complete checkpoints by step, after the new one is complete; drop stale temp folders."""
    for tmp in output_dir.glob(".checkpoint-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    if limit:
        for old in list_checkpoints(output_dir)[:-limit]:
            shutil.rmtree(old)


def write_error(file: Path | str, what: str, err: BaseException, output_dir: Path) -> DiskWriteError:
    """One line naming the file and the errno (ENOSPC, EFBIG, ...) and what is still intact."""
    code = errno.errorcode.get(getattr(err, "errno", None) or 0)
    reason = f"{code}: {err.strerror}" if code and getattr(err, "strerror", None) else (
        f"{type(err).__name__}: {str(err).splitlines()[0][:160]}; a full disk (ENOSPC) or a file-size limit (EFBIG)?")
    kept = [p.name for p in list_checkpoints(output_dir)]
    error = DiskWriteError(f"{file}: could not write {what} ({reason}); the complete checkpoints are intact "
                           f"({', '.join(kept) or 'none yet'}). Free space (or raise the file-size limit) and resume "
                           "with --resume_from_checkpoint latest")
    error.errno = getattr(err, "errno", None) or errno.EIO
    return error


def newest_file(folder: Path) -> Path:
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
    return max(files, key=lambda p: p.stat().st_mtime_ns) if files else folder


def set_aside_newer(output_dir: Path, step: int) -> list[Path]:
    """Move the checkpoints after `step` (an abandoned run's, complete or not) into abandoned/<time>/; returns the
    new paths. Then `latest` can only be this run's."""
    newer = [p for p in checkpoint_folders(output_dir) if checkpoint_step(p) > step]
    if not newer:
        return []
    dest = output_dir / ABANDONED_DIR / f"after-step-{step}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    dest.mkdir(parents=True)
    moved = []
    for path in newer:
        os.rename(path, dest / path.name)
        moved.append(dest / path.name)
    return moved


# ---------------------------------------------------------------------------------------------------------------------
# what a resume may change
def data_fingerprint(dataset) -> str:
    """A hash of the samples (path relative to the data folder, captions): another data set differs, a moved one
    does not."""
    root = Path(dataset.report.data_dir) if getattr(dataset, "report", None) else None
    prefix = os.path.join(str(root), "") if root is not None else None
    digest = hashlib.sha256()
    for sample in dataset.samples:
        text = str(sample.path)
        if prefix is not None and text.startswith(prefix):  # what relative_to gives, without its cost at 118k samples
            name = text[len(prefix):]
        else:
            path = Path(text)
            name = str(path.relative_to(root)) if root is not None and path.is_relative_to(root) else path.name
        digest.update(json.dumps([name, sample.captions]).encode())
    return digest.hexdigest()[:16]


def weights_fingerprint(module) -> str:
    """A hash of every tensor's name, shape and first values (fp32): another base model differs, a moved folder
    does not. Call before casting to the weight dtype."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        head = tensor.detach().flatten()[:16].float().cpu()
        digest.update(f"{name}{tuple(tensor.shape)}".encode() + head.numpy().tobytes())
    return digest.hexdigest()[:16]


def compare_settings(path: Path, saved: dict, now: dict) -> list[str]:
    """Settings that differ between the checkpoint and this run: an error for a REFUSED one (all of them named, with
    the reason), else one line per APPLIED change for the log. `saved`/`now`: flat {setting: value}."""
    changed = {k: (saved[k], now.get(k)) for k in saved if k in now and saved[k] != now[k]}
    refused = [f"{k} {a!r} -> {b!r} ({REFUSED[k]})" for k, (a, b) in changed.items() if k in REFUSED]
    refused += [f"{k}: {FINGERPRINTS[k]}" for k in FINGERPRINTS if k in changed]
    if refused:
        raise ValueError(f"{path}: cannot resume with changed settings: {'; '.join(refused)}. Resume with the "
                         "checkpoint's values (its train_state.json lists them), or start a new run in another "
                         "--output_dir")
    unknown = [k for k in changed if k not in APPLIED and k not in FINGERPRINTS]
    if unknown:
        raise ValueError(f"{path}: cannot resume with changed settings {unknown}: no resume rule for them")
    return [f"{k}: {a!r} -> {b!r} (applied from the resumed step: {APPLIED[k]})" for k, (a, b) in changed.items()
            if k in APPLIED and APPLIED[k] != "bookkeeping" and not APPLIED[k].startswith("checked")]
