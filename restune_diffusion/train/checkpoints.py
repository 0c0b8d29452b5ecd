"""Checkpoints of a training run: how one is written (accelerate's state, the tuners, then `train_state.json`, last,
with the size of every other file, so a truncated `optimizer.bin` is caught by name), which one `latest` is, and
which are pruned. A resume from checkpoint-k moves newer ones (an abandoned run's) aside, so `latest` is always the
current run's. What a resume may change: resume.py.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from restune_diffusion.files import atomic_write_text
from restune_diffusion.weights import load_tuners_into, save_tuners

STATE_FILE = "train_state.json"  # written last into a checkpoint: its presence means the checkpoint is complete
CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
ABANDONED_DIR = "abandoned"  # newer checkpoints of a run resumed from an older one go here


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
# writing one
def register_state_hooks(accelerator, model_class: type, handles: dict, emas: dict) -> None:
    """save_state/load_state carry the tuner tensors only (`tuners.safetensors`, self-describing, loadable by
    weights.load_tuners), never the frozen UNet, and load them strictly. Full fine-tuning: the UNet is in them.
    `handles`: file name inside the checkpoint -> handle (a joint run's: <task>/tuners.safetensors); `emas`: file
    name -> the TunerEMA of --use_ema (its average and update count, as a tuner file). `model_class`: the prepared
    module whose weights these files replace."""
    def ours(model) -> bool:
        return isinstance(accelerator.unwrap_model(model), model_class)

    def save_hook(models, weights, output_dir):
        for i in reversed(range(len(models))):
            if ours(models[i]):
                weights.pop(i)  # accelerate would write the whole UNet's state dict
        if accelerator.is_main_process:
            for name, handle in handles.items():
                save_tuners(Path(output_dir) / name, handle)
            for name, ema in emas.items():
                ema.save(Path(output_dir) / name)

    def load_hook(models, input_dir):
        for i in reversed(range(len(models))):
            if ours(models[i]):
                models.pop(i)
        count = sum(load_tuners_into(handle, Path(input_dir) / name) for name, handle in handles.items())
        for name, ema in emas.items():
            if not (Path(input_dir) / name).is_file():
                raise ValueError(f"{Path(input_dir) / name}: missing; --use_ema needs a checkpoint of a run with it")
            count += ema.load(Path(input_dir) / name)
        accelerator.print(f"{input_dir}: loaded {count} tuner tensors")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(run) -> Path:
    """accelerate state into `.checkpoint-<step>.tmp/` on every rank, then (main, after a barrier) the state file
    with every file's size, rename to `checkpoint-<step>/` and prune: `latest` never sees a half-written checkpoint.
    A full disk or a file-size limit: one line naming the file; the temp folder is removed, older ones stay."""
    a, step = run.accelerator, run.global_step
    final, tmp = run.output_dir / f"checkpoint-{step}", run.output_dir / f".checkpoint-{step}.tmp"
    if a.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    a.wait_for_everyone()
    try:
        a.save_state(str(tmp))
        a.wait_for_everyone()  # every rank's random_states_<rank>.pkl is in
        if a.is_main_process:
            write_state(tmp, {"global_step": step, "epoch": step // run.steps_per_epoch, "settings": run.settings})
    except (OSError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and not re.search(r"writ|unexpected pos", str(err)):
            raise  # not an I/O failure: a bug, keep its traceback
        file = Path(getattr(err, "filename", None) or newest_file(tmp))
        file = final / file.relative_to(tmp) if file.is_relative_to(tmp) else file  # the name it was to have
        shutil.rmtree(tmp, ignore_errors=True)  # frees the space it took
        raise write_error(file, f"checkpoint-{step}", err, run.output_dir) from err
    if a.is_main_process:
        if final.exists():  # the same step written again by a run resumed from an earlier checkpoint
            shutil.rmtree(final)
        os.rename(tmp, final)
        prune_checkpoints(run.output_dir, run.args.checkpoints_total_limit)
    a.wait_for_everyone()
    return final
