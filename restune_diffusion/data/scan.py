"""The start-up scan: every caption and image checked before any model is loaded (PITFALLS "silent caption loss").

Two modes (issue 13 item 10, issue 16 part 3):
- `scan_mode="decode"` (default): every image is decoded once here (JPEGs at 1/8 scale, which still reads every
  byte), so a corrupt PNG body or a JPEG cut short with an end marker appended stops the run (or is dropped and counted
  under --skip_bad_images) before the models load. Results are cached per file in `<data_dir>/.restune_cache/
  scan.json`, keyed by (relative name, size, mtime), so a second run decodes nothing and a changed file is read
  again. A cold decode of COCO's 118k images takes minutes on 2 cores, once.
- `scan_mode="header"`: headers, PNG checksums and JPEG end markers only (seconds for 118k files); the pixels are
  decoded at load time, where a bad image raises its named error, or under --skip_bad_images is skipped (the next
  good item is used) and counted (`CaptionDataset.skipped`).
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import multiprocessing as mp
import os
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..files import atomic_write_text
from .demo import make_demo_dataset
from .finegrained import NAMES as FINEGRAINED_SETS
from .finegrained import finegrained_samples
from .formats import METADATA_FILES, Sample, ScanReport, coco_samples, image_files, imagefolder_samples
from .hf import export_images
from .images import IMAGE_EXTENSIONS, SKIP_HINT, image_problem
from .kohya import is_kohya_layout, kohya_samples

# "hf": a Hugging Face datasets data set (data_dir = its folder or hub id); the fine-grained sets by name
KINDS = ("auto", "coco2017", "finegrained", "imagefolder", "kohya", "demo", "hf", *FINEGRAINED_SETS)
FINEGRAINED_KINDS = ("finegrained", *FINEGRAINED_SETS)
CAPTION_MODES = ("random", "all", "first")
SCAN_MODES = ("decode", "header")
CACHE_DIR = ".restune_cache"
CACHE_VERSION = 2  # 2: entries [file size, mtime, problem, width, height] (the sizes buckets need)
log = logging.getLogger(__name__)


def _apply_caption_mode(samples: list[Sample], mode: str) -> list[Sample]:
    if mode not in CAPTION_MODES:
        raise ValueError(f"caption_mode: expected one of {CAPTION_MODES}, got {mode!r}")
    if mode == "all":
        return [Sample(s.path, [c]) for s in samples for c in s.captions]
    if mode == "first":
        return [Sample(s.path, s.captions[:1]) for s in samples]
    return samples


def _cache_file(root: Path, scan_cache) -> Path | None:
    if scan_cache is False or scan_cache is None:
        return None
    folder = root / CACHE_DIR if scan_cache is True else Path(scan_cache)
    return folder / "scan.json"


def _read_cache(path: Path | None, mode: str) -> dict:
    try:
        data = json.loads(path.read_text()) if path is not None else {}
    except (OSError, ValueError):
        return {}  # absent, unreadable or torn: scan again
    ok = isinstance(data, dict) and data.get("version") == CACHE_VERSION and isinstance(data.get(mode), dict)
    return data[mode] if ok else {}


def _write_cache(path: Path | None, mode: str, entries: dict) -> None:
    if path is None:
        return
    try:
        old = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        old = {}
    data = {"version": CACHE_VERSION, **{m: old.get(m, {}) for m in SCAN_MODES if isinstance(old.get(m), dict)}}
    data[mode] = entries
    try:
        atomic_write_text(path, json.dumps(data, separators=(",", ":")))
    except OSError as err:  # a read-only data set: every run scans again
        log.warning("%s: cannot write the scan cache (%s); the next run scans again", path, err)


def detect_kind(data_dir: str | os.PathLike, caption_extension: str | None = None) -> str:
    """coco2017 if annotations/ exists, imagefolder if metadata.jsonl/.csv, kohya if caption files sit beside the images
    or sub-folders are named N_name (10_mydog), imagefolder for other loose images, finegrained for class folders."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset folder not found")
    if (root / "annotations").is_dir():
        return "coco2017"
    if any((root / m).is_file() for m in METADATA_FILES):
        return "imagefolder"
    if is_kohya_layout(root, caption_extension):
        return "kohya"
    if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in root.iterdir() if p.is_file()):
        return "imagefolder"  # loose images without metadata get the "no metadata.jsonl" error there
    if any(image_files(d) for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        return "finegrained"
    raise ValueError(f"{root}: no images found. Expected COCO 2017 (annotations/captions_train2017.json + train2017/), "
                     "an image folder with metadata.jsonl/metadata.csv or a .txt caption beside each image (kohya: "
                     "loose or in N_name folders), or class sub-folders of images "
                     f"({', '.join(IMAGE_EXTENSIONS)})")


def check_images(paths: list[Path], root: Path, mode: str, scan_cache=True, progress: bool = True,
                 workers: int | None = None) -> tuple[dict[Path, str], int]:
    """({path: problem} for unusable images, how many were read now): scan_images without the sizes."""
    problems, num_read, _ = scan_images(paths, root, mode, scan_cache, progress, workers)
    return problems, num_read


def scan_images(paths: list[Path], root: Path, mode: str, scan_cache=True, progress: bool = True,
                workers: int | None = None) -> tuple[dict[Path, str], int, list[tuple[int, int] | None]]:
    """({path: problem} for unusable images, how many were read now, each path's (w, h) with EXIF orientation
    applied or None); the rest come from the scan cache, whose entries are keyed by name relative to `root`, size
    and mtime. The images to read are shared by `workers` processes (default: up to 8 of this machine's cores when
    there are more than PARALLEL_FROM of them)."""
    cache_path = _cache_file(root, scan_cache)
    cached = _read_cache(cache_path, mode)
    prefix = os.path.join(os.path.abspath(root), "")
    entries, todo = dict(cached), []  # other splits' entries stay (train and val share one root)
    verdicts: list[str | None] = [None] * len(paths)  # problem per path
    sizes: list[tuple[int, int] | None] = [None] * len(paths)
    for i, path in enumerate(paths):
        try:
            st = os.stat(path)
        except OSError as err:
            verdicts[i] = f"{type(err).__name__}: {err}"
            continue
        key = _relative(path, prefix)
        hit = cached.get(key)
        if type(hit) is list and len(hit) == 5 and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            verdicts[i], sizes[i] = hit[2], (hit[3], hit[4]) if hit[3] else None
        else:
            entries[key] = [st.st_size, st.st_mtime_ns]
            todo.append((i, key))
    read = _read_images([paths[i] for i, _ in todo], mode == "decode", workers, progress and len(todo) >= 1000)
    for (i, key), (problem, size) in zip(todo, read):
        entries[key] = [*entries[key][:2], problem, *(size or (0, 0))]
        verdicts[i], sizes[i] = problem, size
    problems = {path: problem for path, problem in zip(paths, verdicts) if problem}
    if todo:
        _write_cache(cache_path, mode, entries)
    return problems, len(todo), sizes


def _relative(path: Path, prefix: str) -> str:
    """os.path.relpath(path, root) for a path under root (prefix: root's absolute path with a trailing separator),
    without relpath's cost (a third of a warm scan of 118k names)."""
    name = str(path)
    if not name.startswith(prefix):
        name = os.path.abspath(name)
    return name[len(prefix):] if name.startswith(prefix) else os.path.relpath(name, prefix)


PARALLEL_FROM = 256  # fewer images are read in this process (a pool's start-up would cost more than it saves)


def _read_images(paths: list[Path], decode: bool, workers: int | None,
                 progress: bool) -> list[tuple[str | None, tuple[int, int] | None]]:
    """image_problem of each path, in order, by `workers` processes (forked: they inherit this process's modules
    without re-importing the training script; where fork is missing, or for few images, this process reads all)."""
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if len(paths) > PARALLEL_FROM else 1
    if workers < 1:
        raise ValueError(f"scan workers: expected a positive integer, got {workers!r}")
    bar = dict(total=len(paths), desc=f"scan ({'decode' if decode else 'header'})", unit="img",
               disable=not progress, mininterval=2.0)
    read = functools.partial(image_problem, decode=decode)
    if workers == 1 or "fork" not in mp.get_all_start_methods():
        return list(tqdm(map(read, paths), **bar))
    with mp.get_context("fork").Pool(workers) as pool:
        return list(tqdm(pool.imap(read, paths, chunksize=64), **bar))


def subset(samples: list[Sample], count: int | None, seed: int) -> list[Sample]:
    """--max_train_samples: the first `count` after a shuffle seeded by `seed` (diffusers), kept in data set order."""
    if count is None:
        return samples
    if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
        raise ValueError(f"max_train_samples must be a positive integer, got {count!r}")
    if count >= len(samples):
        return samples
    keep = np.random.default_rng(seed).permutation(len(samples))[:count]
    return [samples[i] for i in sorted(keep.tolist())]


def _gc_paused(fn):
    """Runs fn with Python's cyclic garbage collector off: a scan builds ~10^6 objects without cycles, and each
    collection walks them all (COCO train: 0.7 s of a 5 s warm scan)."""

    @functools.wraps(fn)
    def paused(*args, **kwargs):
        was = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was:
                gc.enable()

    return paused


@_gc_paused
def scan_samples(kind: str, data_dir: str | os.PathLike, *, split: str = "train", caption_mode: str = "random",
                 caption_column: str = "text", image_column: str = "file_name", template: str | None = None,
                 category: str | None = None, class_names: str | os.PathLike | None = None,
                 dataset_config_name: str | None = None, caption_extension: str | None = None,
                 max_train_samples: int | None = None, seed: int = 0,
                 skip_bad_images: bool = False, scan_mode: str = "decode",
                 scan_cache: bool | str | os.PathLike = True, progress: bool = True, demo_num_images: int = 64,
                 demo_resolution: int = 64, demo_seed: int = 0) -> tuple[list[Sample], ScanReport]:
    """(usable samples, report) of a data set; see `load_dataset` for the options, the module doc for scan_mode."""
    root = Path(data_dir)
    if kind not in KINDS:
        raise ValueError(f"dataset kind: expected one of {KINDS}, got {kind!r}")
    if scan_mode not in SCAN_MODES:
        raise ValueError(f"scan_mode: expected one of {SCAN_MODES}, got {scan_mode!r}")
    source = None
    if kind == "demo":
        make_demo_dataset(root, demo_num_images, demo_resolution, demo_seed)
    elif kind == "hf":  # rows written out once as an image folder (hf.py)
        root, rows = export_images(str(data_dir), split, dataset_config_name, image_column, caption_column)
        source, image_column, caption_column = f"{data_dir} (split {split}, {rows} rows, exported to {root})", \
            "file_name", "text"
    elif kind == "auto":
        kind = detect_kind(root, caption_extension)
    elif not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset folder not found")
    if split != "train" and kind in ("imagefolder", "kohya", "demo"):
        raise ValueError(f"--split {split}: an image folder has no splits ({root}); drop --split")
    report = ScanReport(kind, str(root), skip_bad_images=skip_bad_images, scan_mode=scan_mode)
    if kind == "coco2017":
        samples = coco_samples(root, split, report)
    elif kind in FINEGRAINED_KINDS:
        samples = finegrained_samples(root, split, kind, template, category, class_names, report)
    elif kind == "kohya":
        samples = kohya_samples(root, caption_extension, report)
    else:
        samples = imagefolder_samples(root, caption_column, image_column, report)
    if source:
        report.source = f"{source}: {report.source}"
    samples = _apply_caption_mode(samples, caption_mode)
    report.num_listed, report.max_train_samples = len(samples), max_train_samples
    samples = subset(samples, max_train_samples, seed)  # before the image check: a subset reads only its images
    images = list({str(s.path): s.path for s in samples}.values())  # each image once
    problems, report.num_decoded, sizes = scan_images(images, root, scan_mode, scan_cache, progress)
    size_of = {str(path): size for path, size in zip(images, sizes)}
    for s in samples:  # kohya's repeats share one Sample: set once
        s.size = size_of.get(str(s.path))
    for path, problem in problems.items():
        report.flag("image", f"{path}: cannot read image ({problem}). {SKIP_HINT}")
    bad = {str(path) for path in problems}  # str keys: hashing 118k Path objects costs ~0.5 s
    samples = [s for s in samples if str(s.path) not in bad]
    report.num_samples, report.num_images = len(samples), len({str(s.path) for s in samples})
    if kind in FINEGRAINED_KINDS:
        report.derived_captions = dict(Counter(c for s in samples for c in s.captions))
    if not samples:
        raise ValueError(f"{root}: no usable samples.\n{report.summary()}")
    return samples, report


def scan_dataset(kind: str, data_dir: str | os.PathLike, **options) -> ScanReport:
    """Check every caption and image of a dataset before any model is loaded; see `load_dataset` for options."""
    return scan_samples(kind, data_dir, **options)[1]


def write_caption_set(report: ScanReport, out_dir: str | os.PathLike) -> Path | None:
    """Write `captions.json` ({caption: number of samples}, most frequent first) into `out_dir` when the captions
    were derived from folder names (fine-grained sets); returns its path, or None for given captions."""
    if not report.derived_captions:
        return None
    ordered = dict(sorted(report.derived_captions.items(), key=lambda kv: (-kv[1], kv[0])))
    body = {"dataset": report.data_dir, "source": report.source, "template": report.columns, "captions": ordered}
    return atomic_write_text(Path(out_dir) / "captions.json", json.dumps(body, indent=1) + "\n")
