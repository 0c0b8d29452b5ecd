"""Aspect-ratio buckets (issue 27; kohya's `--enable_bucket`): each image is resized to cover the bucket nearest its
aspect ratio and cropped only by what the bucket's rounding leaves over, and a batch holds one bucket.

The table is kohya's: a pixel budget of resolution² (in units of `steps` px), the square bucket, and for every width
from `min_reso` to `max_reso` in `steps` the tallest height within the budget (capped at `max_reso`), both ways
round. At 512 px with kohya's defaults (256, 1024, 64): 256x1024, 320x768, 384x640, 448x576, 512x512 and their
transposes. An image goes to the bucket whose aspect ratio is nearest on a log scale (kohya compares w/h
differences; the log distance picks the bucket that keeps the most pixels, the same one except near the midpoint of
two buckets), is resized so that it covers the bucket, and the excess is cropped (centre, or random without
--center_crop).

Batches: `BucketBatchSampler` shuffles each bucket and the order of the batches with generators seeded by (seed,
epoch), so the order is a function of those two (a resumed run, or a run on N processes, sees the same batches).
With N processes a global batch of up to batch x N images of one bucket is cut into N per-process batches of equal
size, so every process trains on the same bucket at every step; a bucket's images are padded to a multiple of N by
repeating its first ones (at most N - 1 per bucket and epoch), as DistributedSampler pads a data set.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Sampler

from ..files import atomic_write_text

DEFAULT_STEPS = 64  # kohya's --bucket_reso_steps: SD v1.5's latents must be multiples of 8 (64 px)
VAE_FACTOR = 8  # a bucket side must split into whole latents: a multiple of SD's 8 (tiny's VAE downsamples by 4)
BUCKET_FILE = "bucket_table.json"
_BUCKET_ORDER = 7  # the rng stream of the batch order (dataset.py uses 0..6 per sample)


def cover_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(w, h) an image of `size` is resized to so that it covers `target` with its aspect ratio kept: the side that
    fits exactly is the target's, the other is floored (torchvision's Resize(int) for a square target)."""
    (w, h), (tw, th) = size, target
    if w * th >= h * tw:  # at least as wide as the target: the height fits, the width is cropped
        return int(th * w / h), th
    return tw, int(tw * h / w)


def kept_fraction(size: tuple[int, int], target: tuple[int, int]) -> float:
    """The fraction of an image's pixels that survive the crop to `target` (1.0: nothing cropped)."""
    cw, ch = cover_size(size, target)
    return target[0] * target[1] / (cw * ch)


@dataclass(frozen=True)
class BucketSpec:
    """kohya's bucket flags; min/max default to resolution/2 and 2 x resolution (kohya's 256/1024 at 512), steps to
    64 but at most resolution/4."""

    resolution: int
    min_reso: int | None = None
    max_reso: int | None = None
    steps: int | None = None

    def __post_init__(self):
        r = self.resolution
        object.__setattr__(self, "steps", self.steps or min(DEFAULT_STEPS, max(VAE_FACTOR, r // 4)))
        object.__setattr__(self, "min_reso", self.min_reso or r // 2)
        object.__setattr__(self, "max_reso", self.max_reso or 2 * r)
        s = self.steps
        if not isinstance(s, int) or s <= 0 or s % VAE_FACTOR:
            raise ValueError(f"--bucket_reso_steps must be a positive multiple of {VAE_FACTOR} (whole latents), got "
                             f"{s!r}; kohya's default is 64")
        for flag, value in (("--min_bucket_reso", self.min_reso), ("--max_bucket_reso", self.max_reso)):
            if not isinstance(value, int) or value <= 0 or value % s:
                raise ValueError(f"{flag} must be a positive multiple of --bucket_reso_steps {s}, got {value!r}")
        if not self.min_reso <= r <= self.max_reso or r < s:
            raise ValueError(f"--resolution {r} must lie within --min_bucket_reso {self.min_reso} .. "
                             f"--max_bucket_reso {self.max_reso} and be at least --bucket_reso_steps {s}")

    def as_dict(self) -> dict:
        return {"resolution": self.resolution, "min_bucket_reso": self.min_reso, "max_bucket_reso": self.max_reso,
                "bucket_reso_steps": self.steps}


class BucketTable:
    """The buckets of a spec (sorted (w, h) pairs, each within the pixel budget) and the choice of one per image."""

    def __init__(self, spec: BucketSpec):
        self.spec = spec
        s = spec.steps
        budget = (spec.resolution // s) ** 2  # the pixel budget in units of s x s
        sizes = {(math.isqrt(budget) * s,) * 2}
        for w in range(spec.min_reso, spec.max_reso + 1, s):
            h = min(spec.max_reso, budget // (w // s) * s)
            if h >= spec.min_reso:
                sizes |= {(w, h), (h, w)}
        self.sizes = sorted(sizes)
        self._log_ratios = np.log([w / h for w, h in self.sizes])

    @functools.lru_cache(maxsize=65536)  # noqa: B019 (one table per run; image sizes repeat a lot)
    def select(self, size: tuple[int, int]) -> tuple[int, int]:
        """The bucket (w, h) nearest to the aspect ratio of an image of `size`."""
        w, h = size
        return self.sizes[int(np.argmin(np.abs(self._log_ratios - math.log(w / h))))]


def bucket_rows(table: BucketTable, sizes: list[tuple[int, int]]) -> list[dict]:
    """One row per bucket in use: its size, aspect ratio, image count and mean fraction of pixels kept."""
    chosen = [table.select(size) for size in sizes]
    counts = Counter(chosen)
    kept: dict[tuple[int, int], float] = {}
    for size, bucket in zip(sizes, chosen):
        kept[bucket] = kept.get(bucket, 0.0) + kept_fraction(size, bucket)
    return [{"width": w, "height": h, "aspect": round(w / h, 3), "images": counts[(w, h)],
             "pixels_kept": round(kept[(w, h)] / counts[(w, h)], 4)} for w, h in table.sizes if (w, h) in counts]


def bucket_summary(rows: list[dict], spec: BucketSpec) -> str:
    """The table for the log: one line per bucket in use."""
    total = sum(r["images"] for r in rows)
    kept = sum(r["pixels_kept"] * r["images"] for r in rows) / max(total, 1)
    lines = [f"aspect-ratio buckets (pixel budget {spec.resolution}x{spec.resolution}, sides "
             f"{spec.min_reso}..{spec.max_reso} in steps of {spec.steps}): {len(rows)} in use, {total} samples, "
             f"{kept:.3f} of the pixels kept"]
    lines += [f"  {r['width']:>5} x {r['height']:<5} aspect {r['aspect']:<6} {r['images']:>7} samples, "
              f"{r['pixels_kept']:.3f} kept" for r in rows]
    return "\n".join(lines)


def write_bucket_table(rows: list[dict], spec: BucketSpec, out_dir: str | os.PathLike) -> Path:
    """`<out_dir>/bucket_table.json`: the spec and the rows of bucket_rows."""
    body = {**spec.as_dict(), "buckets": rows}
    return atomic_write_text(Path(out_dir) / BUCKET_FILE, json.dumps(body, indent=1) + "\n")


def report_buckets(dataset, out_dir: str | os.PathLike | None = None) -> str | None:
    """The bucket table of a bucketed dataset for the log (None without buckets), written to
    `<out_dir>/bucket_table.json` when `out_dir` is given (the main process)."""
    table = getattr(dataset, "buckets", None)
    if table is None:
        return None
    rows = bucket_rows(table, [s.size for s in dataset.samples])
    if out_dir is not None:
        write_bucket_table(rows, table.spec, out_dir)
    return bucket_summary(rows, table.spec)


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of one bucket each, in an order fixed by (seed, epoch) (module doc). `dataset.target_size(i)` gives
    item i's bucket; `self.sampler` holds the epoch (data.EpochSampler: accelerate and the training loop call its
    set_epoch, which also reaches the dataset)."""

    def __init__(self, dataset, batch_size: int, epoch_sampler, num_processes: int = 1):
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        # not `batch_size`: accelerate's BatchSamplerShard would then hold back every batch of another length
        self.dataset, self.per_process, self.num_processes = dataset, batch_size, num_processes
        self.sampler = epoch_sampler
        self._groups: dict[tuple[int, int], list[int]] | None = None

    def groups(self) -> dict[tuple[int, int], list[int]]:
        """{bucket: item indices}, buckets sorted."""
        if self._groups is None:
            found: dict[tuple[int, int], list[int]] = {}
            for i in range(len(self.dataset)):
                found.setdefault(self.dataset.target_size(i), []).append(i)
            self._groups = dict(sorted(found.items()))
        return self._groups

    def global_batches(self, epoch: int) -> list[list[int]]:
        """The epoch's global batches (each of one bucket, a multiple of num_processes long), in training order."""
        n, per = self.num_processes, self.per_process * self.num_processes
        shuffle = self.sampler.shuffle
        rng = np.random.default_rng([self.sampler.seed, epoch, 0, _BUCKET_ORDER])
        batches = []
        for indices in self.groups().values():
            order = [indices[k] for k in rng.permutation(len(indices))] if shuffle else list(indices)
            order += [order[k % len(order)] for k in range(-len(order) % n)]  # pad to a multiple of n
            batches += [order[k:k + per] for k in range(0, len(order), per)]
        return [batches[k] for k in rng.permutation(len(batches))] if shuffle else batches

    def __iter__(self):
        n = self.num_processes
        for batch in self.global_batches(self.sampler.epoch):
            part = len(batch) // n
            for p in range(n):  # accelerate gives process p every n-th batch: part p of each global batch
                yield batch[p * part:(p + 1) * part]

    def __len__(self) -> int:
        per, n = self.per_process * self.num_processes, self.num_processes
        return sum(math.ceil((len(g) + (-len(g) % n)) / per) * n for g in self.groups().values())


def eval_batches(dataset, batch_size: int) -> list[list[int]]:
    """Item indices in batches of at most `batch_size` that share a size (consecutive ranges without buckets), for
    scoring every item once (the held-out loss)."""
    sizes = [dataset.target_size(i) for i in range(len(dataset))] if hasattr(dataset, "target_size") else None
    if sizes is None or all(s == sizes[0] for s in sizes):
        return [list(range(k, min(k + batch_size, len(dataset)))) for k in range(0, len(dataset), batch_size)]
    groups: dict = {}
    for i, size in enumerate(sizes):
        groups.setdefault(size, []).append(i)
    return [g[k:k + batch_size] for _, g in sorted(groups.items()) for k in range(0, len(g), batch_size)]
