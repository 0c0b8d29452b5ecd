"""bench/efficiency.py: the --quick run measures every method on the tiny UNet and writes its JSON and table; the
targets are judged on ratios of one run."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "efficiency.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_efficiency", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imports no torch: the parent process only runs workers
    return module


def test_quick_run_reports_every_available_method(tmp_path):
    bench = load_bench()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "cpu-quick.json").read_text())
    expected = [m for m in bench.METHODS if bench.available(m) is None]
    assert {"floor", "full", "lora", "peft_lora", "res_tuning"} <= set(expected)
    for method in expected:
        row = report["methods"][method]
        assert row["status"] == "ok", (method, row.get("note"))
        assert row["step_s"] > 0 and row["peak_bytes"] > 0 and row["weights_bytes"] > 0, method
        assert (row["params"] > 0) == (method != "floor"), method
        assert row["loss_finite"], method
    assert report["methods"]["lora"]["params"] == report["methods"]["peft_lora"]["params"] == 9_964_800
    if bench.available(bench.MULTITASK) is None:
        assert [r["k"] for r in report["multitask"]["rows"]] == list(bench.MULTITASK_KS)
        assert all(r["one_pass_s"] > 0 and r["separate_s"] > 0 for r in report["multitask"]["rows"])
    table = (tmp_path / "cpu-quick.md").read_text()
    assert all(f"| `{m}` |" in table for m in expected)
    assert "## Targets" in table and "PASS  params full" in table


def test_targets_compare_ratios_of_one_run():
    bench = load_bench()
    gb = 1e9
    rows = {
        "floor": dict(status="ok", params=0, peak_bytes=4 * gb, above_weights_bytes=0.2 * gb, step_s=2.0),
        "full": dict(status="ok", params=859_520_964, peak_bytes=14 * gb, above_weights_bytes=10 * gb, step_s=13.0),
        "lora": dict(status="ok", params=9_964_800, peak_bytes=5 * gb, above_weights_bytes=1.5 * gb, step_s=4.0),
        "res_tuning": dict(status="ok", params=2_535_056, peak_bytes=5 * gb, above_weights_bytes=1.5 * gb,
                           step_s=4.8),
        "res_tuning_bypass": dict(status="ok", params=3_752_960, peak_bytes=4.2 * gb, above_weights_bytes=0.4 * gb,
                                  step_s=2.5),
    }
    found = {t["target"].split(" <=")[0].split(" >=")[0]: t["passed"]
             for t in bench.targets(rows, {"rows": [{"k": 4, "speedup": 3.0}]})}
    assert found["params full within 1 % of the paper's 862.0 M"] is True
    assert found["bypass peak memory"] is True  # 4.2 / 4 = 1.05
    assert found["bypass memory above weights"] is True  # 0.4 / 10
    assert found["Res-Tuning step time"] is False  # 4.8 / 4 = 1.2
    assert found["bypass step time"] is True  # 2.5 / 13
    assert found["K=4 bypasses in one pass"] is False  # 3.0 < 3.2


def test_quick_joint_training_row_measures_k_joint_vs_separate(tmp_path):
    bench = load_bench()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--methods", bench.JOINT, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "cpu-quick.json").read_text())
    joint = report[bench.JOINT]
    assert joint["status"] == "ok", joint.get("note")
    assert [r["k"] for r in joint["rows"]] == list(bench.MULTITASK_KS)
    for row in joint["rows"]:
        assert row["joint_s"] > 0 and row["separate_s"] > 0 and row["joint_peak_bytes"] > 0
    assert joint["rows"][0]["peak_vs_k1"] == 1.0
    table = (tmp_path / "cpu-quick.md").read_text()
    assert "## Joint bypass training" in table and "K=8 bypasses trained jointly" in table


def test_joint_training_targets():
    bench = load_bench()
    joint = {"rows": [{"k": 1, "speedup": 1.0, "peak_vs_k1": 1.0}, {"k": 4, "speedup": 3.5, "peak_vs_k1": 1.05},
                      {"k": 8, "speedup": 4.0, "peak_vs_k1": 1.1}]}
    found = {t["target"]: t["passed"] for t in bench.targets({}, None, joint)}
    assert found["K=4 bypasses trained jointly >= 3 x faster than 4 runs"] is True
    assert found["K=8 bypasses trained jointly >= 5 x faster than 8 runs"] is False
    assert found["K=8 joint training peak memory <= 1.2 x K=1's"] is True
