"""bench/data_scale.py --quick on a small folder: every figure is measured and written (the full run is the
integrator's)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "data_scale.py"


def is_time(value) -> bool:
    """A measured duration or rate as the bench writes it: a non-negative number (never judged by its size here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


@pytest.mark.slow  # over 8 s on 2 cores: the default suite stays under 5 minutes
def test_quick_run_writes_every_figure(tmp_path):
    out = tmp_path / "data_scale.json"
    subprocess.run([sys.executable, str(BENCH), "--quick", "--num_quick", "24", "--resolution", "64", "--batches",
                    "2", "--batch_size", "4", "--workers", "0", "1", "--latent_counts", "8", "24",
                    "--latent_resolution", "16", "--output", str(out)], check=True, capture_output=True, text=True,
                   timeout=300)
    result = json.loads(out.read_text())
    assert result["num_samples"] == 24 and result["scan_mode"] == "decode"
    # times are figures of the bench, not of the test: structure only (a fast machine rounds them to 0.0)
    assert all(is_time(result[k]) for k in ("cold_scan_s", "warm_scan_s")) and "dataset_rss_mb" in result
    assert isinstance(result["cold_page_cache_dropped"], bool)
    assert set(result["images_per_s"]) == {"0", "1"} and all(is_time(v) for v in result["images_per_s"].values())
    small, large = result["latent_cache"]
    assert (small["images"], large["images"]) == (8, 24)
    assert large["cache_file_bytes"] == 3 * small["cache_file_bytes"] > 0 and is_time(large["build_s"])
    assert all(isinstance(r[k], float) for r in (small, large) for k in ("build_rss_growth_mb", "read_rss_growth_mb"))
