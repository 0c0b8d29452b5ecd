"""bench/buckets.py --quick: one loader epoch with buckets and with square crops over a small mixed-aspect COCO-layout
folder, the pixels kept, and the files it writes."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "buckets.py"


def test_quick_run_measures_both_modes_and_writes_its_files(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_buckets", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--quick", "--out", str(tmp_path)])
    rows = result["rows"]
    assert list(rows) == ["square", "buckets, steps 16 (default)", "buckets, steps 8"]
    assert all(r["images"] == 48 and r["images_per_s"] > 0 for r in rows.values())
    square = rows["square"]["pixels_kept"]["mean"]
    assert square < rows["buckets, steps 16 (default)"]["pixels_kept"]["mean"] < rows["buckets, steps 8"][
        "pixels_kept"]["mean"] <= 1
    saved = json.loads((tmp_path / "buckets-cpu-quick.json").read_text())
    assert saved["rows"] == rows and saved["settings"]["resolution"] == 64
    table = (tmp_path / "buckets-cpu-quick.md").read_text()
    assert "| square | 48 |" in table and "## Target" in table and "pixels kept with buckets >= 0.95" in table
