"""bench/generation.py: the --quick run measures rows of every kind (eager, fused, bypass tasks; compiled rows
slow-marked) on the tiny UNet and writes its JSON and table; ratios are to rows of the same run and the targets are
judged on them."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "generation.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_generation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imports no torch: the parent process only runs workers
    return module


def quick_run(tmp_path, *args) -> dict:
    cmd = [sys.executable, str(SCRIPT), "--quick", "--configs", "base", "lora", "res_tuning_bypass", "--tasks", "1",
           "4", "--out", str(tmp_path), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / "generation-cpu-quick.json").read_text())


@pytest.mark.slow  # over 8 s on 2 cores: the default suite stays under 5 minutes
def test_quick_run_measures_eager_fused_and_task_rows(tmp_path):
    report = quick_run(tmp_path, "--variants", "eager", "fused")
    rows = report["methods"]
    assert list(rows) == ["base", "lora", "lora:fused", "res_tuning_bypass", "res_tuning_bypass:fused", "tasks_k1",
                          "tasks_k4"]
    refused = rows.pop("res_tuning_bypass:fused")
    assert refused["status"] == "skipped" and "cannot be fused: bypass is a side network" in refused["note"]
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row.get("note"))
        assert row["step_s"] > 0 and row["peak_bytes"] > 0 and row["step_vs_base"] > 0, name
    assert rows["base"]["step_vs_base"] == 1.0 and "paired_vs_base" not in rows["base"]
    for name in ("lora", "lora:fused"):  # timed in alternation with the pure base built in the same process
        assert rows[name]["paired_vs_base"] > 0 and len(rows[name]["paired_vs_base_all"]) == 1, name
        assert "paired_vs_eager" not in rows[name]
    assert rows["lora:fused"]["fuse"] == {"lora": "folded into 56 projection weights"}
    assert rows["lora:fused"]["step_vs_eager"] == pytest.approx(rows["lora:fused"]["step_s"] / rows["lora"]["step_s"])
    k4 = rows["tasks_k4"]
    assert k4["first_step_s"] > 0 and k4["later_step_s"] > 0 and rows["tasks_k1"]["step_vs_one_task"] == 1.0
    assert k4["step_s"] == pytest.approx((k4["first_step_s"] + 49 * k4["later_step_s"]) / 50)
    found = {t["target"]: t for t in report["targets"]}
    assert found["K=4 bypass tasks: step (mean of 50) <= 1.5x one task's"]["measured"] == k4["step_vs_one_task"]
    table = (tmp_path / "generation-cpu-quick.md").read_text()
    assert "| `lora:fused` | lora | fused |" in table and "| `tasks_k4` | 4 |" in table and "## Targets" in table


@pytest.mark.slow  # dynamo traces each compiled row (its eager backend in --quick): about a minute on 2 cores
def test_quick_run_measures_compiled_rows_beside_their_eager_ones(tmp_path):
    report = quick_run(tmp_path, "--variants", "eager", "compiled")
    rows = report["methods"]
    assert list(rows) == ["base", "base:compiled", "lora", "lora:compiled", "res_tuning_bypass",
                          "res_tuning_bypass:compiled", "tasks_k1", "tasks_k1:compiled", "tasks_k4",
                          "tasks_k4:compiled"]
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row.get("note"))
    assert rows["lora:compiled"]["step_vs_eager"] == pytest.approx(rows["lora:compiled"]["step_s"] /
                                                                   rows["lora"]["step_s"])
    found = {t["target"]: t for t in report["targets"]}
    assert "tasks_k4:compiled step <= tasks_k4's" in found
    compiled = rows["lora:compiled"]  # also paired with itself run eagerly (set_stance force_eager)
    assert compiled["paired_vs_eager"] > 0 and compiled["paired_vs_base"] > 0
    assert rows["base:compiled"]["paired_vs_eager"] > 0 and "paired_vs_base" not in rows["base"]  # its eager self
    assert found["lora:compiled step <= lora's"]["measured"] == compiled["paired_vs_eager"]


def test_targets_are_ratios_of_one_run_and_a_miss_says_its_cause():
    bench = load_bench()
    row = lambda config, variant, step, **kw: dict(status="ok", config=config, variant=variant, step_s=step,  # noqa: E731
                                                    peak_bytes=1e9, **kw)
    rows = {
        "base": row("base", "eager", 2.0), "lora:fused": row("lora", "fused", 2.01),
        "lora": row("lora", "eager", 2.4), "lora:compiled": row("lora", "compiled", 2.5),
        "res_tuning": row("res_tuning", "eager", 2.2), "res_tuning_bypass": row("res_tuning_bypass", "eager", 2.1),
        "tasks_k1": row("tasks_k1", "eager", 2.1, k=1, first_step_s=2.1),
        "tasks_k4": row("tasks_k4", "eager", 7.9, k=4, first_step_s=2.3),
    }
    bench.derive(rows)
    found = {t["target"]: t for t in bench.targets(rows)}
    assert found["lora fused step = base's (<= 1.02x: timing noise)"]["passed"] is True  # 1.005
    assert found["res_tuning step <= 1.05x base's"]["passed"] is False  # 1.1
    assert found["res_tuning fused step <= 1.05x base's"]["passed"] is None  # not measured
    assert found["res_tuning_bypass step <= 1.10x base's"]["passed"] is True  # 1.05
    assert found["lora:compiled step <= lora's"]["passed"] is False and found["lora:compiled step <= lora's"][
        "measured"] == pytest.approx(2.5 / 2.4)
    k4 = found["K=4 bypass tasks: step (mean of 50) <= 1.5x one task's"]
    assert k4["passed"] is False and k4["measured"] == pytest.approx(7.9 / 2.1)
    assert "backbone runs on K·2 rows" in k4["cause"] and "at step 1: 1.10x" in k4["cause"]
    assert found["res_tuning step <= 1.05x base's"]["cause"] is None  # no known structural cause: the lead says
    # a paired ratio (same process, alternating with the base) is what a target reads where the row has one
    rows["res_tuning"]["paired_vs_base"] = 1.03
    rows["lora:compiled"]["paired_vs_eager"] = 0.97
    found = {t["target"]: t for t in bench.targets(rows)}
    assert found["res_tuning step <= 1.05x base's"]["passed"] is True
    assert found["res_tuning step <= 1.05x base's"]["measured"] == 1.03
    assert found["lora:compiled step <= lora's"]["passed"] is True
    # a compiled miss inside its pairs' spread says so (with the base's own compiled ratio); outside it, no cause
    rows["lora:compiled"].update(paired_vs_eager=1.02, paired_vs_eager_all=[0.95, 1.02, 1.08])
    rows["base:compiled"] = row("base", "compiled", 1.9, paired_vs_eager=0.99, paired_vs_eager_all=[0.99, 1.01, 0.9])
    bench.derive(rows)
    found = {t["target"]: t for t in bench.targets(rows)}
    miss = found["lora:compiled step <= lora's"]
    assert miss["passed"] is False and "3 pairs with its eager self spread 0.950-1.080x" in miss["cause"]
    assert "the base itself compiled: 0.990x its eager step" in miss["cause"]
    rows["lora:compiled"].update(paired_vs_eager=1.1, paired_vs_eager_all=[1.05, 1.1, 1.2])
    assert {t["target"]: t for t in bench.targets(rows)}["lora:compiled step <= lora's"]["cause"] is None


def test_a_partial_run_adds_its_rows_to_a_file_of_the_same_settings(tmp_path):
    bench = load_bench()
    opts = bench.settings_from(bench.parse_args(["--configs", "base"]))
    assert bench.result_tag(opts) == "generation-cpu" and opts["latent_size"] == 64 and opts["dtype"] == "fp32"
    assert bench.result_tag(bench.settings_from(bench.parse_args(["--device", "cuda"]))) == "generation-cuda"
    path = tmp_path / "generation-cpu.json"
    path.write_text(json.dumps({"settings": opts, "methods": {"base": {"step_s": 1.0}, "lora": {"step_s": 2.0}},
                                "runs": [{"command": "first", "measured": ["base", "lora"]}]}))
    rows = {"lora": {"step_s": 3.0}}
    assert bench.bench.merge_earlier(path, opts, rows, {}) == [{"command": "first", "measured": ["base", "lora"]}]
    assert rows == {"lora": {"step_s": 3.0}, "base": {"step_s": 1.0}}  # measured now wins, the rest is kept
    rows = {}
    assert bench.bench.merge_earlier(path, dict(opts, steps=9), rows, {}) == [] and rows == {}  # other settings
    # a file written before rows were paired keeps its rows for a paired run (they lack only the paired columns)
    unpaired = {k: v for k, v in opts.items() if k != "paired"}
    path.write_text(json.dumps({"settings": unpaired, "methods": {"base": {"step_s": 1.0}},
                                "runs": [{"command": "old", "measured": ["base"]}]}))
    rows = {"lora": {"step_s": 3.0}}
    assert bench.bench.merge_earlier(path, opts, rows, {}, ignore=("paired",)) == [{"command": "old",
                                                                                   "measured": ["base"]}]
    assert rows == {"lora": {"step_s": 3.0}, "base": {"step_s": 1.0}}
