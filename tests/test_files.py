"""restune_diffusion/files.py: atomic writes leave no half file and ordinary modes; stale temp files of killed writers
are cleaned up, live writers' are not."""

import os
import stat
import time

import pytest

from restune_diffusion.files import atomic_write, atomic_write_text, clean_stale_temps


def test_a_failed_write_leaves_neither_the_file_nor_its_temp(tmp_path):
    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "a.json", broken)
    assert list(tmp_path.iterdir()) == []
    atomic_write_text(tmp_path / "a.json", "{}")
    assert (tmp_path / "a.json").read_text() == "{}" and len(list(tmp_path.iterdir())) == 1


def test_atomic_writes_get_the_mode_open_gives(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "x.bin", lambda tmp: (tmp.write_bytes(b"x"), os.chmod(tmp, 0o600)))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_clean_stale_temps_removes_only_dead_or_old_writers(tmp_path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = os.getpid()
    (tmp_path / "ckpt").mkdir()
    files = {
        f".loss.png.tmp{dead.pid}": False, f"ckpt/.state.json.tmp{dead.pid}": False,  # writer gone
        f".old.png.tmp{me}": False,  # writer alive but 2 h old: a reused PID
        f".fresh.png.tmp{me}": True, "loss.png": True, ".loss.png.tmpX": True, "notes.tmp123": True,
    }
    for name in files:
        (tmp_path / name).write_text("x")
    old = time.time() - 7200
    os.utime(tmp_path / f".old.png.tmp{me}", (old, old))
    removed = clean_stale_temps(tmp_path, max_age_minutes=60)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in removed) == sorted(k for k, v in files.items() if not v)
    assert all((tmp_path / name).exists() == keep for name, keep in files.items())
    assert clean_stale_temps(tmp_path / "missing") == []
