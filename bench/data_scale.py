"""Data at COCO scale (issue 16 part 3): start-up scan cold and warm (scan cache), resident memory of the dataset
object, and loader throughput with 0/1/2 workers at 512 px. Writes JSON (and prints it).

    python tools/make_coco_scale.py /data/coco_scale            # once: 118,287 train images
    python bench/data_scale.py --coco_dir /data/coco_scale --output bench/results/data_scale-cpu.json
    python bench/data_scale.py --quick                          # a 200-image folder in a temp dir (a smoke test)

Targets: cold scan <= 60 s (scan_mode header; decode reads every pixel once, minutes on 2 cores), warm <= 5 s,
dataset RSS <= 1 GB, a loader faster than one GPU's bypass training step, and --cache_latents whose resident memory
stays flat from 1k to 20k images (building and reading).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from restune_diffusion import data  # noqa: E402
from restune_diffusion.data.scan import CACHE_DIR  # noqa: E402
from restune_diffusion.files import atomic_write_text  # noqa: E402
from tools.make_coco_scale import main as make_coco  # noqa: E402


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def drop_page_cache() -> bool:
    """Empty the OS page cache (Linux, as root), so the cold scan reads from disk as on a first run after boot;
    False where not allowed (then the files may still be cached from making them)."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def timed_load(coco: Path, scan_mode: str, resolution: int) -> tuple[float, data.CaptionDataset]:
    start = time.perf_counter()
    ds = data.load_dataset("coco2017", coco, resolution=resolution, scan_mode=scan_mode, progress=False)
    return time.perf_counter() - start, ds


def throughput(ds, workers: int, batch_size: int, batches: int) -> float:
    loader = data.build_dataloader(ds, batch_size, shuffle=True, num_workers=workers)
    it, count = iter(loader), 0
    next(it)  # start-up of the workers is not throughput
    start = time.perf_counter()
    for _ in range(batches):
        count += len(next(it)["captions"])
    return count / (time.perf_counter() - start)


def run(coco: Path, scan_mode: str, resolution: int, batch_size: int, batches: int, workers: list[int]) -> dict:
    shutil.rmtree(coco / CACHE_DIR, ignore_errors=True)
    dropped = drop_page_cache()
    gc.collect()
    before = rss_mb()
    cold, ds = timed_load(coco, scan_mode, resolution)
    dataset_rss = rss_mb() - before
    warm, ds = timed_load(coco, scan_mode, resolution)
    result = {"coco_dir": str(coco), "scan_mode": scan_mode, "num_samples": len(ds), "cold_scan_s": round(cold, 2),
              "warm_scan_s": round(warm, 2), "cold_page_cache_dropped": dropped,
              "dataset_rss_mb": round(dataset_rss, 1), "resolution": resolution,
              "batch_size": batch_size, "images_per_s": {}}
    for w in workers:
        result["images_per_s"][str(w)] = round(throughput(ds, w, batch_size, batches), 1)
    return result


def latent_cache_rss(coco: Path, counts: list[int], resolution: int, scan_mode: str) -> list[dict]:
    """--cache_latents at growing data set sizes: resident-set growth while the on-disk cache is built and while every
    item is read back (the tiny VAE at `resolution`, random flips: both mirrors cached, fp16). Flat = the cache is
    on disk, not in this process."""
    import torch

    from restune_diffusion.latent_cache import build_latent_cache, open_latent_cache
    from restune_diffusion.memory import proc_status, reset_peak_memory
    from restune_diffusion.models import build_tiny_sd

    cpu, vae, rows = torch.device("cpu"), build_tiny_sd(0).vae, []
    with torch.no_grad():
        vae.encode(torch.zeros(64, 3, resolution, resolution))  # one-time allocations are not growth
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            ds = data.load_dataset("coco2017", coco, resolution=resolution, random_flip=True, scan_mode=scan_mode,
                                   max_train_samples=n, progress=False)
            reset_peak_memory(cpu)
            before, start = proc_status("VmRSS"), time.perf_counter()
            folder = build_latent_cache(ds, vae, tmp, batch_size=32, dtype=torch.float16)
            build_s, build_growth = time.perf_counter() - start, proc_status("VmHWM") - before
            cached = open_latent_cache(folder, ds)
            reset_peak_memory(cpu)
            before = proc_status("VmRSS")
            for i in range(len(cached)):
                cached[i]
            rows.append({"images": len(ds), "cache_file_bytes": (folder / "latents.bin").stat().st_size,
                         "build_s": round(build_s, 1), "build_rss_growth_mb": round(build_growth / 2**20, 1),
                         "read_rss_growth_mb": round((proc_status("VmHWM") - before) / 2**20, 1)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--coco_dir", type=Path)
    p.add_argument("--quick", action="store_true", help="make and measure a 200-image COCO folder in a temp dir")
    p.add_argument("--num_quick", type=int, default=200)
    p.add_argument("--scan_mode", choices=data.SCAN_MODES, default="decode")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--latent_counts", type=int, nargs="*", default=[1000, 20000],
                   help="data set sizes for the latent cache's resident-memory rows (none: skip them)")
    p.add_argument("--latent_resolution", type=int, default=32, help="image size for those rows (tiny VAE)")
    p.add_argument("--output", type=Path)
    args = p.parse_args(argv)
    if args.coco_dir is None and not args.quick:
        p.error("pass --coco_dir (made by tools/make_coco_scale.py) or --quick")
    with tempfile.TemporaryDirectory() as tmp:
        coco = args.coco_dir
        if coco is None:
            coco = Path(tmp) / "coco"
            make_coco([str(coco), "--num_train", str(args.num_quick), "--num_val", "2", "--workers", "1"])
        result = run(coco, args.scan_mode, args.resolution, args.batch_size, args.batches, args.workers)
        if args.latent_counts:
            result["latent_cache"] = latent_cache_rss(coco, args.latent_counts, args.latent_resolution, args.scan_mode)
    text = json.dumps(result, indent=1)
    print(text)
    if args.output:
        atomic_write_text(args.output, text + "\n")
    return result


if __name__ == "__main__":
    main()
