"""bench/data_scale.py --quick on a small folder: every figure is measured and written (the full run is the
integrator's)."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "data_scale.py"


def test_quick_run_writes_every_figure(tmp_path):
    out = tmp_path / "data_scale.json"
    subprocess.run([sys.executable, str(BENCH), "--quick", "--num_quick", "24", "--resolution", "64", "--batches",
                    "2", "--batch_size", "4", "--workers", "0", "1", "--latent_counts", "8", "24",
                    "--latent_resolution", "16", "--output", str(out)], check=True, capture_output=True, text=True,
                   timeout=300)
    result = json.loads(out.read_text())
    assert result["num_samples"] == 24 and result["scan_mode"] == "decode"
    assert result["cold_scan_s"] > 0 and result["warm_scan_s"] >= 0 and "dataset_rss_mb" in result
    assert isinstance(result["cold_page_cache_dropped"], bool)
    assert set(result["images_per_s"]) == {"0", "1"} and all(v > 0 for v in result["images_per_s"].values())
    small, large = result["latent_cache"]
    assert (small["images"], large["images"]) == (8, 24)
    assert large["cache_file_bytes"] == 3 * small["cache_file_bytes"] > 0 and large["build_s"] > 0
    assert all(isinstance(r[k], float) for r in (small, large) for k in ("build_rss_growth_mb", "read_rss_growth_mb"))
