"""Write a synthetic data set in the exact COCO 2017 layout at full size (issue 16 part 3), for scan and loader
benchmarks: annotations/captions_{train,val}2017.json + train2017/ + val2017/ with small JPEGs of varied sizes and
aspect ratios (about 1 in 10 greyscale). Defaults match COCO 2017: 118,287 train images with 591,753 captions (5
each, 6 for the first 318), 5,000 val images with 25,014 captions.

Deterministic: image k of a split depends only on (seed, split, k). Safe to run in parallel or again: each image is
written to a temporary name and renamed, existing images are kept, the annotation files are written last.

    python tools/make_coco_scale.py /data/coco_scale --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from restune_diffusion.files import atomic_write, atomic_write_text  # noqa: E402

COLORS = ("red", "green", "blue", "yellow", "white", "black", "brown", "gray", "orange", "purple")
THINGS = ("dog", "cat", "bus", "train", "pizza", "clock", "horse", "kite", "bench", "giraffe", "boat", "umbrella")
PLACES = ("on a street", "in a field", "next to a building", "on a table", "near the water", "in a kitchen")
SPLITS = {"train": (118287, 591753), "val": (5000, 25014)}


def image_id(split: str, k: int) -> int:
    return (k + 1) * 3 + (1 if split == "train" else 2)  # sparse and distinct across splits, like COCO's ids


def make_image(seed: int, split: str, k: int) -> tuple[Image.Image, list[str]]:
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, k])
    w = int(rng.integers(48, 161))
    h = int(np.clip(w / rng.uniform(0.5, 2.0), 32, 200))  # aspect ratios 1:2 .. 2:1
    base = rng.integers(0, 256, size=3)
    y, x = np.mgrid[0:h, 0:w]
    array = (base + 40 * np.sin(x[..., None] / rng.uniform(3, 12)) + 40 * np.cos(y[..., None] / rng.uniform(3, 12)))
    image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.1:
        image = image.convert("L")
    color, thing, place = (COLORS[rng.integers(len(COLORS))], THINGS[rng.integers(len(THINGS))],
                           PLACES[rng.integers(len(PLACES))])
    captions = [f"a {color} {thing} {place}", f"the {thing} is {color}", f"a photo of a {thing} {place}",
                f"{color} {thing}, {place}", f"an image with a {thing}", f"a {thing} seen {place}"]
    return image, captions


def write_one(task: tuple[Path, int, str, int]) -> None:
    folder, seed, split, k = task
    path = folder / f"{image_id(split, k):012d}.jpg"
    if path.exists():
        return
    image, _ = make_image(seed, split, k)
    atomic_write(path, lambda tmp: image.save(tmp, format="JPEG", quality=70))


def write_split(out: Path, split: str, num_images: int, num_captions: int, seed: int, workers: int) -> None:
    folder = out / f"{split}2017"
    folder.mkdir(parents=True, exist_ok=True)
    tasks = [(folder, seed, split, k) for k in range(num_images)]
    if workers > 1:
        with Pool(workers) as pool:
            for _ in pool.imap_unordered(write_one, tasks, chunksize=256):
                pass
    else:
        for task in tasks:
            write_one(task)
    extra = num_captions - 5 * num_images  # COCO: most images have 5 captions, a few 6 or 7
    if not 0 <= extra <= num_images:
        raise ValueError(f"--{split}_captions must be in {5 * num_images}..{6 * num_images}, got {num_captions}")
    images, annotations = [], []
    for k in range(num_images):
        image, captions = make_image(seed, split, k)
        images.append({"id": image_id(split, k), "file_name": f"{image_id(split, k):012d}.jpg",
                       "width": image.width, "height": image.height})
        for text in captions[:6 if k < extra else 5]:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id(split, k), "caption": text})
    (out / "annotations").mkdir(exist_ok=True)
    atomic_write_text(out / "annotations" / f"captions_{split}2017.json",
                      json.dumps({"images": images, "annotations": annotations}))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--num_train", type=int, default=SPLITS["train"][0])
    p.add_argument("--train_captions", type=int, default=None, help="default: COCO's 591,753 at full size, else 5 each")
    p.add_argument("--num_val", type=int, default=SPLITS["val"][0])
    p.add_argument("--val_captions", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    asked = (("train", args.num_train, args.train_captions), ("val", args.num_val, args.val_captions))
    for split, n, captions in asked:
        full = SPLITS[split]
        captions = captions if captions is not None else (full[1] if n == full[0] else 5 * n)
        write_split(args.out_dir, split, n, captions, args.seed, args.workers)
        print(f"{args.out_dir}: {split}2017 with {n} images and {captions} captions")


if __name__ == "__main__":
    main()
