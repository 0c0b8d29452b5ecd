"""Files as our outputs write them: atomically (a reader never sees half a file) and with the modes ordinary tools
give (0644 files, 0755 folders under the usual umask), and the temp files of writers killed mid-write cleaned up.

The bottom layer: it imports nothing of ours, so data, training, evaluation and the tools all write through it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from pathlib import Path

TEMP_RE = re.compile(r"\.(.+)\.tmp(\d+)")  # atomic_write's temporary name: .NAME.tmpPID
log = logging.getLogger(__name__)


def current_umask() -> int:
    """The process umask, read from /proc where it can be (os.umask alone must change it to read it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ordinary_mode(path: str | os.PathLike, folder: bool = False) -> None:
    """Give `path` the mode open() / mkdir() would (0644 / 0755 under umask 022): safetensors and mkstemp leave 0600,
    mkdtemp 0700."""
    os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call write(tmp_path), then rename over `path`: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        ordinary_mode(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file (JSON, YAML, logs) through atomic_write."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False  # kill(0) would signal our own process group
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def clean_stale_temps(folder: str | os.PathLike, max_age_minutes: float = 60.0) -> list[Path]:
    """Remove the `.NAME.tmpPID` files atomic_write leaves when killed mid-write, under `folder`: those whose process
    is gone, or older than `max_age_minutes` (PIDs are reused). Call at start-up; returns the removed paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed, now = [], time.time()
    for path in folder.rglob(".*.tmp*"):
        match = TEMP_RE.fullmatch(path.name)
        if match is None or path.is_symlink() or not path.is_file():
            continue
        try:
            age_s = now - path.stat().st_mtime
        except FileNotFoundError:  # its writer just renamed it
            continue
        if _pid_alive(int(match.group(2))) and age_s <= max_age_minutes * 60:
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
        log.info("%s: removed a stale temporary file (its writer was killed mid-write)", path)
    return removed


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file (hex), read in 1 MiB chunks: what a result records of the weights it used."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
