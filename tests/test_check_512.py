"""tools/check_512.py: every config trains (finite loss, finite gradients reaching every trainable tensor) and takes a
classifier-free-guidance denoising step with its tuners active, in fp32 and bf16; --quick on the tiny UNet, the real
512 px run on the SD v1.5 architecture is slow-marked."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "check_512.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("check_512", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(*args, timeout=600):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # over 8 s on 2 cores: the default suite stays under 5 minutes
def test_quick_run_trains_and_denoises_every_config_in_both_precisions(tmp_path):
    proc = run("--quick", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "check-64-cpu-quick.json").read_text())
    assert report["passed"] and set(report["results"]) == {"lora", "res_tuning_bypass"}
    for name, data in report["results"].items():
        assert set(data["precisions"]) == {"fp32", "bf16"}
        for precision, row in data["precisions"].items():
            assert row["status"] == "ok", (name, precision, row.get("note"))
            assert all(v is not False for v in row["checks"].values()), (name, precision, row["checks"])
            train, gen = row["train"], row["generate"]
            first, last = train["grads"][0], train["grads"][-1]
            # zero-initialised last layers: at step 1 only part of the tensors get a non-zero gradient
            assert 0 < first["tensors"] - first["zero"] < first["tensors"], (name, first)
            assert last["reached"] == last["tensors"] and not train["never_reached"]
            assert gen["noise_shape"] == [2, 4, 8, 8] and gen["latents_shape"] == [1, 4, 8, 8]
            assert gen["finite"] and gen["tuners_active"] is True
            assert row["train_peak_bytes"] > 0 and row["generate_peak_bytes"] > 0 and train["step_s"][0] >= 0
    lora = report["results"]["lora"]["precisions"]["fp32"]["train"]
    bypass = report["results"]["res_tuning_bypass"]["precisions"]["fp32"]["train"]
    assert len(lora["loss"]) == 2  # LoRA's A is reached once B has moved
    assert len(bypass["loss"]) == 5  # the bypass chain on the tiny UNet: 4 stems + the last adapter, one update each
    table = (tmp_path / "check-64-cpu-quick.md").read_text()
    assert "| `lora` | bf16 |" in table and "| `res_tuning_bypass` | fp32 |" in table and "**PASS**" in table


def test_checks_name_what_failed():
    tool = load_tool()
    grads = {"tensors": 3, "no_grad": 0, "nonfinite": 0, "zero": 1, "reached": 3}
    train = {"loss": [1.0, 0.9], "grads": [grads, dict(grads, zero=0)], "never_reached": [],
             "trainables_fp32": True}
    gen = {"noise_shape": [2, 4, 8, 8], "latents_shape": [1, 4, 8, 8], "finite": True, "tuners_active": True}
    assert all(tool.checks(train, gen, 8).values())
    failed = lambda **kw: [k for k, v in tool.checks(dict(train, **kw.get("t", {})),  # noqa: E731
                                                     dict(gen, **kw.get("g", {})), 8).items() if v is False]
    assert failed(t={"loss": [1.0, float("nan")]}) == ["loss finite"]
    assert failed(t={"never_reached": ["a.down.weight"]}) == ["every trainable tensor got a non-zero gradient"]
    assert failed(t={"grads": [dict(grads, nonfinite=1), grads]}) == ["step 1: every trainable has a finite gradient"]
    assert failed(t={"grads": [dict(grads, zero=3), grads]}) == ["step 1: some gradients non-zero"]
    assert failed(t={"grads": [grads, dict(grads, no_grad=1)]}) == ["every step: gradients finite"]
    assert failed(g={"finite": False}) == ["denoise output finite"]
    assert failed(g={"latents_shape": [2, 4, 8, 8]}) == ["denoise shapes"]
    assert failed(g={"tuners_active": False}) == ["tuners active in generation"]
    assert tool.checks(train, dict(gen, tuners_active=None), 8)["tuners active in generation"] is None  # full


def test_shipped_configs_leave_out_the_tiny_demo():
    tool = load_tool()
    names = tool.shipped_configs()
    assert {"full", "lora", "adapter", "prefix", "prompt", "res_tuning", "res_tuning_bypass"} <= set(names)
    assert "tiny_demo" not in names and all((ROOT / "configs" / f"{n}.yaml").is_file() for n in names)


def test_unknown_config_is_a_one_line_error(tmp_path):
    proc = run("--configs", "no_such_config", "--out", str(tmp_path), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--configs" in proc.stderr and "no_such_config" in proc.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_sd15_architecture_at_512_px_bypass_fp32(tmp_path):
    """The real check at 512 px (64x64 latents, 77x768 text) for one config: ~1-2 min and ~5 GB on CPU."""
    proc = run("--configs", "res_tuning_bypass", "--precisions", "fp32", "--out", str(tmp_path), timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "check-512-cpu.json").read_text())
    row = report["results"]["res_tuning_bypass"]["precisions"]["fp32"]
    assert row["status"] == "ok" and row["passed"], row.get("note") or row["checks"]
    assert row["params"] == 3_752_960 and row["text_width"] == 768
    assert row["generate"]["noise_shape"] == [2, 4, 64, 64] and row["generate"]["latents_shape"] == [1, 4, 64, 64]
    assert len(row["train"]["loss"]) == 6  # 5 stems + the last adapter: one update each until every tensor is reached
