"""Every CLI fails alike on a named error: one line `prog: error: ...` on stderr, exit status 2, no traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from restune_diffusion.cli import DEBUG_ENV, EXIT_NAMED_ERROR, run_cli
from restune_diffusion.weights import base_metadata

ROOT = Path(__file__).resolve().parents[1]


def _foreign_file(path: Path) -> Path:
    save_file({"w": torch.zeros(2)}, str(path))  # a safetensors file, but not ours
    return path


def _unknown_type_file(path: Path) -> Path:
    import restune_diffusion as rd

    meta = base_metadata(rd.build_tiny_sd(0).unet)
    meta.update(name="x", tuners=json.dumps([{"type": "no_such_tuner"}]), num_tensors="0")
    save_file({"w": torch.zeros(2)}, str(path), metadata=meta)
    return path


CASES = {  # case -> (file maker, what the line must name)
    "missing tuner file": (lambda tmp: tmp / "nope.safetensors", "nope.safetensors"),
    "foreign tuner file": (lambda tmp: _foreign_file(tmp / "foreign.safetensors"), "foreign.safetensors"),
    "unknown tuner type": (lambda tmp: _unknown_type_file(tmp / "unknown.safetensors"), "no_such_tuner"),
}


def _generate_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_cli", ROOT / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("case", CASES)
def test_generate_named_errors_are_one_line_and_exit_2(case, tmp_path, capsys, monkeypatch):
    """generate.py's main under cli.run_cli, in this process (the script itself: the subprocess test below)."""
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    make, named = CASES[case]
    argv = ["--pretrained_model_name_or_path", "tiny-random", "--tuners", str(make(tmp_path)), "--prompt", "x",
            "--steps", "1", "--out", str(tmp_path / "out")]
    assert run_cli(_generate_main(), "generate.py", argv) == EXIT_NAMED_ERROR
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("generate.py: error: ")]
    assert len(errors) == 1 and named in errors[0] and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_the_generate_script_says_a_named_error_in_one_line_and_exits_2(tmp_path):
    cmd = [sys.executable, str(ROOT / "generate.py"), "--pretrained_model_name_or_path", "tiny-random", "--tuners",
           str(tmp_path / "nope.safetensors"), "--prompt", "x", "--steps", "1", "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**_env(), DEBUG_ENV: ""})
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == EXIT_NAMED_ERROR, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in lines if line.startswith("generate.py: error: ")]
    assert len(errors) == 1 and "nope.safetensors" in errors[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_eval_fid_named_error_is_one_line_and_exit_2(tmp_path):
    cmd = [sys.executable, str(ROOT / "eval_fid.py"), "--real_dir", str(tmp_path / "a"), "--fake_dir",
           str(tmp_path / "b"), "--inception_weights", str(tmp_path / "missing.pth")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == EXIT_NAMED_ERROR and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("eval_fid.py: error: ") and "missing.pth" in proc.stderr


def _env():
    import os

    return {k: v for k, v in os.environ.items() if k != DEBUG_ENV}


def _fails(argv):
    raise FileNotFoundError("a.safetensors: not found\nsecond line")


def test_run_cli_prints_one_line_and_debug_env_reraises(capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    assert run_cli(_fails, "x.py") == 2
    assert capsys.readouterr().err == "x.py: error: a.safetensors: not found second line\n"
    assert run_cli(lambda argv: None, "x.py") == 0
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(FileNotFoundError):
        run_cli(_fails, "x.py")


def test_run_cli_keeps_the_traceback_of_a_bug(monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    with pytest.raises(ZeroDivisionError):
        run_cli(lambda argv: 1 / 0, "x.py")
