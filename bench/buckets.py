"""Aspect-ratio buckets at COCO scale (issue 27): one epoch of the loader over a mixed-aspect folder with buckets
(--enable_bucket; kohya's default steps, and finer ones) and with square centre crops, images per second of each,
and the fraction of every image's pixels that reaches training. Target: buckets keep >= 0.95 of the pixels (a centre
crop keeps short side / long side). The synthetic folder's aspect ratios spread evenly over 1:2 .. 2:1, which is
harder on a bucket table than real photos (mostly 4:3 and 3:4).

    python tools/make_coco_scale.py /data/coco_scale      # once: 118,287 train images, aspect ratios 1:2 .. 2:1
    python bench/buckets.py --coco_dir /data/coco_scale --limit 10000        # -> bench/results/buckets-cpu.{md,json}
    python bench/buckets.py --quick --out /tmp/buckets    # a 48-image folder in a temp dir, 64 px: seconds (CI)

One caption per image (--caption_mode first), so an epoch is one pass over the images; the same images, batch size,
workers and resize filter for both modes, one process. The loader decodes, resizes, crops and collates; no model
runs. The pixels kept come from the image sizes in the scan (cover-resize, then crop to the square or the bucket).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.harness import machine  # noqa: E402
from restune_diffusion import data  # noqa: E402
from restune_diffusion.files import atomic_write_text  # noqa: E402
from tools.make_coco_scale import main as make_coco  # noqa: E402

TARGET_KEPT = 0.95


def load(coco: Path, resolution: int, limit: int | None, steps: int | None = None, buckets: bool = True):
    return data.load_dataset("coco2017", coco, resolution=resolution, center_crop=True, caption_mode="first",
                             max_train_samples=limit, enable_bucket=buckets, bucket_reso_steps=steps,
                             scan_mode="header", progress=False)


def epoch(ds, batch_size: int, workers: int) -> dict:
    """One epoch of the loader: images, batches, seconds, images per second."""
    loader = data.build_dataloader(ds, batch_size, seed=0, num_workers=workers)
    loader.batch_sampler.sampler.set_epoch(0)
    images = batches = 0
    start = time.perf_counter()
    for batch in loader:
        images += len(batch["captions"])
        batches += 1
    seconds = time.perf_counter() - start
    return {"images": images, "batches": batches, "seconds": round(seconds, 3),
            "images_per_s": round(images / seconds, 1)}


def kept(ds) -> dict:
    """The fraction of each image's pixels that survives its crop: mean, 5th percentile, minimum."""
    fractions = np.array([data.kept_fraction(s.size, ds.target_size(i)) for i, s in enumerate(ds.samples)])
    return {"mean": round(float(fractions.mean()), 4), "p5": round(float(np.percentile(fractions, 5)), 4),
            "min": round(float(fractions.min()), 4)}


def measure(coco: Path, resolution: int, limit: int | None, batch_size: int, workers: int, steps: list[int]) -> dict:
    square = load(coco, resolution, limit, buckets=False)
    rows = {"square": {**epoch(square, batch_size, workers), "pixels_kept": kept(square)}}
    tables = {}
    for k, step in enumerate(steps):
        ds = load(coco, resolution, limit, step)
        mode = f"buckets, steps {ds.buckets.spec.steps}" + (" (default)" if k == 0 else "")
        rows[mode] = {**epoch(ds, batch_size, workers), "pixels_kept": kept(ds), "spec": ds.buckets.spec.as_dict()}
        tables[mode] = data.bucket_rows(ds.buckets, [s.size for s in ds.samples])
    default = next(m for m in rows if m.endswith("(default)"))
    return {"rows": rows, "bucket_tables": tables,
            "speed_vs_square": {m: round(r["images_per_s"] / rows["square"]["images_per_s"], 3)
                                for m, r in rows.items() if m != "square"},
            "target": {f"pixels kept with buckets >= {TARGET_KEPT} ({m})": r["pixels_kept"]["mean"] >= TARGET_KEPT
                       for m, r in rows.items() if m != "square"},
            "default": default}


def markdown(result: dict) -> str:
    s, rows, m = result["settings"], result["rows"], result["machine"]
    lines = [f"# Aspect-ratio buckets: one loader epoch, {s['images']} images of {s['coco_dir']}", "",
             f"`{result['command']}`  ", f"{m['cpu']} x {m['cores']} cores, Python {m['python']}; resolution "
             f"{s['resolution']}, batch {s['batch_size']}, {s['workers']} loader workers, scan_mode header, one "
             "caption per image.", "",
             "| mode | images | batches | seconds | images/s | pixels kept (mean) | p5 | min |",
             "|---|---|---|---|---|---|---|---|"]
    for mode, r in rows.items():
        k = r["pixels_kept"]
        lines.append(f"| {mode} | {r['images']} | {r['batches']} | {r['seconds']:.2f} | {r['images_per_s']:.1f} | "
                     f"{k['mean']:.4f} | {k['p5']:.4f} | {k['min']:.4f} |")
    lines += ["", "Images per second, buckets / square crops: " + ", ".join(
        f"{m}: {v:.3f}" for m, v in result["speed_vs_square"].items())]
    for mode, table in result["bucket_tables"].items():
        lines += ["", f"## Buckets in use: {mode}", "", "| bucket | aspect | images | pixels kept |",
                  "|---|---|---|---|"]
        lines += [f"| {r['width']}x{r['height']} | {r['aspect']} | {r['images']} | {r['pixels_kept']:.4f} |"
                  for r in table]
    lines += ["", "## Target", ""]
    lines += [f"- {'PASS' if ok else 'MISS'}  {name}" for name, ok in result["target"].items()]
    lines.append(f"- square centre crops keep {rows['square']['pixels_kept']['mean']:.4f}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--coco_dir", type=Path, help="a COCO-layout folder (tools/make_coco_scale.py makes one)")
    p.add_argument("--limit", type=int, help="the first N images after a seeded shuffle (--max_train_samples)")
    p.add_argument("--quick", action="store_true", help="a 48-image folder in a temp dir at 64 px (a smoke test)")
    p.add_argument("--resolution", type=int, default=None, help="default 512 (quick: 64)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: this process)")
    p.add_argument("--steps", type=int, nargs="+", help="--bucket_reso_steps to measure (default: the default for "
                   "the resolution, and half of it)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="folder for buckets-cpu[-quick].*")
    args = p.parse_args(argv)
    if args.coco_dir is None and not args.quick:
        p.error("pass --coco_dir (made by tools/make_coco_scale.py) or --quick")
    resolution = args.resolution or (64 if args.quick else 512)
    with tempfile.TemporaryDirectory() as tmp:
        coco = args.coco_dir
        if coco is None:
            coco = Path(tmp) / "coco"
            make_coco([str(coco), "--num_train", "48", "--num_val", "2", "--workers", "1"])
        default = data.BucketSpec(resolution).steps
        steps = args.steps or [default] + ([default // 2] if default // 2 % 8 == 0 else [])
        result = measure(coco, resolution, args.limit, args.batch_size, args.workers, steps)
    result["settings"] = {"coco_dir": str(args.coco_dir or "a temporary 48-image folder"), "resolution": resolution,
                          "limit": args.limit, "batch_size": args.batch_size, "workers": args.workers,
                          "images": result["rows"]["square"]["images"], "quick": args.quick}
    result["command"] = "python bench/buckets.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    result["machine"] = machine()
    name = "buckets-cpu" + ("-quick" if args.quick else "")
    atomic_write_text(args.out / f"{name}.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(args.out / f"{name}.md", markdown(result))
    print(markdown(result))
    print(f"[bench] wrote {args.out / name}.md and .json")
    return result


if __name__ == "__main__":
    main()
