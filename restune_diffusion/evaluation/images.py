"""Images on disk: generation by image index (split over processes, resumable) and image folders to measure.

Image i of a prompt list is `{i:05d}.png`, from the seed of image i (sampling.py's seed rule; the protocols use
seed * 1,000,000 + i): the same image on any device, at any batch size and with any number of processes. Batches are
fixed blocks of indices [k * batch_size, (k + 1) * batch_size); block k goes to process k mod N. A rerun skips the
files already written (each is written atomically, so a killed run never leaves half an image).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from ..files import atomic_write, atomic_write_text
from ..sampling import SamplingSettings, batches, sample

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
GRID = re.compile(r"^grid(_\d+)?\.png$")  # generate.py's contact sheets (grid.png, grid_00004.png): not samples


def generate_by_index(pipe, prompts: Sequence[str], out_dir: str | os.PathLike, settings: SamplingSettings, *,
                      resolution: int, rank: int = 0, world: int = 1, progress: bool = True) -> list[Path]:
    """Write this process's missing `out_dir/{i:05d}.png` (sampling.sample, image i from the seed of image i; blocks
    of settings.batch_size, block k on process k mod world); return every image's path (all processes')."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{i:05d}.png" for i in range(len(prompts))]
    mine = batches(len(prompts), settings.batch_size, rank, world)
    total = sum(len(b) for b in mine)
    done = sum(paths[i].is_file() for b in mine for i in b)
    with tqdm(total=total, initial=done, desc=f"generating ({out.name})", unit="img",
              disable=not progress) as bar:
        for block in mine:
            todo = [i for i in block if not paths[i].is_file()]
            if not todo:
                continue
            images = pipe.numpy_to_pil(sample(pipe, [prompts[i] for i in todo], todo, settings, height=resolution,
                                              width=resolution)[0])
            for i, image in zip(todo, images):
                atomic_write(paths[i], lambda tmp: image.save(tmp, format="PNG"))  # noqa: B023
            bar.update(len(todo))
    return paths


def check_generation_record(out: Path, record: dict) -> None:
    """Refuse to resume into a folder written with other generation settings; write the record the first time."""
    path = out / "generation.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in record.items() if old.get(k) != v}
        if diff:
            raise ValueError(f"{path}: {out} holds images generated with other settings "
                             f"({', '.join(f'{k}: {a!r} there vs {b!r} now' for k, (a, b) in diff.items())}). "
                             f"Use another --output_dir or delete {out}.")
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def list_images(folder: str | os.PathLike, flag: str) -> list[Path]:
    """The per-image files of a folder, sorted: generate.py's grid.png and non-images left out."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{flag} {root}: not a folder")
    paths = sorted(p for p in root.iterdir()
                   if p.suffix.lower() in IMAGE_SUFFIXES and not GRID.match(p.name) and p.is_file())
    if len(paths) < 2:
        raise ValueError(f"{flag} {root}: found {len(paths)} images ({'/'.join(IMAGE_SUFFIXES)}); FID needs at least 2")
    return paths
