"""Training data: COCO 2017 captions, fine-grained class folders, image folders with metadata.jsonl, a synthetic demo.

Every format becomes a list of `Sample(path, captions)` and one `CaptionDataset`. Before any model is loaded,
`load_dataset` scans the data (PITFALLS "silent caption loss", diffusers #3674/#6445): it says which metadata file and
columns it used and stops with an error naming the file when a caption or an image is bad. All randomness of a sample
(caption choice, crop, flip, latent noise) is a function of (seed, epoch, index), so a resumed run sees the same data.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset, Sampler

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_TEMPLATE = "a photo of a {class}, a type of {category}"
KINDS = ("auto", "coco2017", "finegrained", "imagefolder", "demo")
CAPTION_MODES = ("random", "all", "first")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
SKIP_HINT = "Fix or remove it, or pass --skip_bad_images"
# what PIL raises for missing, corrupt or truncated files (UnidentifiedImageError is an OSError)
PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, Image.DecompressionBombError)

# independent random streams of one sample, so e.g. the flip does not depend on how many captions an image has
_CAPTION, _CROP, _FLIP, _NOISE, _ORDER = range(5)


def _rng(seed: int, epoch: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index, stream])


def _torch_seed(seed: int, epoch: int, index: int, stream: int) -> int:
    return int(_rng(seed, epoch, index, stream).integers(2**62))


@dataclass
class Sample:
    path: Path
    captions: list[str]  # one caption is drawn per (seed, epoch, index) when there are several


# ---------------------------------------------------------------------------------------------------------------------
# scan report
@dataclass
class ScanReport:
    """What the start-up scan found: where captions came from, how many samples, what was dropped and why."""

    kind: str
    data_dir: str
    source: str = ""  # the metadata / annotations file, or "class folder names"
    columns: str = ""  # which fields gave image and caption
    num_samples: int = 0
    num_images: int = 0
    num_without_caption: int = 0
    num_unreadable: int = 0
    skip_bad_images: bool = False
    dropped: list[str] = field(default_factory=list)  # the first few messages of dropped samples

    def flag(self, problem: str, message: str) -> None:
        """Raise `message`, or with skip_bad_images count the problem ("caption" or "image") and go on."""
        if not self.skip_bad_images:
            raise ValueError(message)
        if problem == "caption":
            self.num_without_caption += 1
        else:
            self.num_unreadable += 1
        if len(self.dropped) < 5:
            self.dropped.append(message)

    def summary(self) -> str:
        """A few lines for the log: source, columns, counts, and what was dropped."""
        lines = [
            f"dataset {self.kind} at {self.data_dir}",
            f"  captions from {self.source} ({self.columns})",
            f"  {self.num_samples} samples, {self.num_images} images",
            f"  {self.num_without_caption} without caption, {self.num_unreadable} unreadable images"
            + (" (dropped: --skip_bad_images)" if self.num_without_caption + self.num_unreadable else ""),
        ]
        return "\n".join(lines + [f"  dropped: {m}" for m in self.dropped])


# ---------------------------------------------------------------------------------------------------------------------
# formats -> list[Sample]
def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _read_json(path: Path, expected: str):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found. Expected {expected}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}). Expected {expected}") from err


def _coco_samples(root: Path, split: str, report: ScanReport) -> list[Sample]:
    ann_path = root / "annotations" / f"captions_{split}2017.json"
    expected = ("the COCO 2017 captions file: {'images': [{'id', 'file_name'}], "
                "'annotations': [{'image_id', 'caption'}]}")
    data = _read_json(ann_path, expected)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{ann_path}: missing 'images' or 'annotations' list. Expected {expected}")  # noqa: TRY004
    report.source, report.columns = str(ann_path), "images[].file_name, annotations[].caption"
    image_dir = root / f"{split}2017"
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir}: image folder not found. Expected the COCO {split}2017 images there")
    present = set(os.listdir(image_dir))  # one listing instead of 118k stat calls
    captions: dict[int, list[str]] = {}
    try:
        for k, ann in enumerate(sorted(data["annotations"], key=lambda a: a.get("id", 0))):
            text = ann.get("caption")
            if not isinstance(text, str) or not text.strip():
                report.flag("caption", f"{ann_path}: annotations[{k}] (id {ann.get('id')}, image_id "
                            f"{ann.get('image_id')}) has an empty caption. Fix it or pass --skip_bad_images")
                continue
            captions.setdefault(ann["image_id"], []).append(text.strip())
        images = sorted(data["images"], key=lambda im: im["id"])
        samples = []
        for img in images:
            path = image_dir / img["file_name"]
            if not captions.get(img["id"]):
                report.flag("caption", f"{ann_path}: image id {img['id']} ({img['file_name']}) has no caption")
            elif img["file_name"] not in present:
                report.flag("image", f"{path}: cannot read image (file missing). {SKIP_HINT}")
            else:
                samples.append(Sample(path, captions[img["id"]]))
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{ann_path}: malformed entry ({err!r}). Expected {expected}") from err
    return samples


def clean_class_name(name: str) -> str:
    """`001.Black_footed_Albatross` -> `black footed albatross`: drop numeric prefixes, _/- to spaces, lower case."""
    name = re.sub(r"^\d+[.\-_\s]*", "", name)
    return " ".join(re.sub(r"[_\-]+", " ", name).lower().split())


def _finegrained_samples(root: Path, template: str, category: str | None, report: ScanReport) -> list[Sample]:
    if "{category}" in template and not category:
        raise ValueError(f"template {template!r} uses {{category}}: pass category= (e.g. 'bird', 'flower')")
    report.source, report.columns = "class folder names", f"template {template!r}"
    samples = []
    for folder in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        name = clean_class_name(folder.name)
        if not name:
            raise ValueError(f"{folder}: no class name left after removing the numeric prefix; rename the folder")
        try:
            caption = template.format(**{"class": name, "category": category})
        except (KeyError, IndexError) as err:
            raise ValueError(
                f"template {template!r}: unknown placeholder {err}; use {{class}} and {{category}}"
            ) from err
        samples += [Sample(p, [caption]) for p in _image_files(folder)]
    if not samples:
        raise ValueError(f"{root}: no images in class sub-folders. Expected <data_dir>/<class_name>/*"
                         f" with extensions {', '.join(IMAGE_EXTENSIONS)}")
    return samples


def _find_metadata(root: Path) -> Path:
    for name in METADATA_FILES:
        if (root / name).is_file():
            return root / name
    near = sorted(p.name for p in root.iterdir() if p.suffix.lower() in (".json", ".jsonl", ".csv", ".txt"))
    raise ValueError(f"{root}: no metadata.jsonl or metadata.csv, so the images have no captions"
                     f" (found {near or 'no metadata-like file'}). Expected {root / 'metadata.jsonl'} with lines like"
                     ' {"file_name": "0001.png", "text": "a caption"}')


def _metadata_rows(meta: Path) -> list[tuple[int, dict]]:
    """(line number, row) pairs of metadata.jsonl or metadata.csv."""
    expected = 'one JSON object per line like {"file_name": "0001.png", "text": "a caption"}'
    if meta.suffix == ".csv":
        with open(meta, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            return [(reader.line_num, row) for row in reader]
    rows = []
    for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{meta}: line {n} is not valid JSON ({err}). Expected {expected}") from err
        if not isinstance(row, dict):
            raise ValueError(f"{meta}: line {n} is a {type(row).__name__}. Expected {expected}")  # noqa: TRY004
        rows.append((n, row))
    if not rows:
        raise ValueError(f"{meta}: no rows. Expected {expected}")
    return rows


def _as_captions(value) -> list[str]:
    values = value if isinstance(value, list) else [value]  # HF imagefolder allows a list of captions per image
    return [v.strip() for v in values if isinstance(v, str) and v.strip()]


def _imagefolder_samples(root: Path, caption_column: str, image_column: str, report: ScanReport) -> list[Sample]:
    meta = _find_metadata(root)
    report.source, report.columns = str(meta), f"image={image_column!r}, caption={caption_column!r}"
    samples, listed = [], set()
    for n, row in _metadata_rows(meta):
        for what, col in (("caption_column", caption_column), ("image_column", image_column)):
            if col not in row:
                raise ValueError(f"{meta}: line {n} has no column {col!r}; columns present: {sorted(row)}. "
                                 f"Pass {what}= (--{what}) naming the right one")
        path = root / str(row[image_column])
        listed.add(os.path.normpath(path))
        captions = _as_captions(row[caption_column])
        if not captions:
            report.flag("caption", f"{meta}: line {n} ({row[image_column]}) has an empty {caption_column!r}. "
                        "Write a caption or pass --skip_bad_images to drop it")
        elif not path.is_file():
            report.flag("image", f"{path}: cannot read image (listed in {meta} line {n}, file missing). {SKIP_HINT}")
        else:
            samples.append(Sample(path, captions))
    for path in _image_files(root):  # images the metadata forgot would silently train on nothing
        if os.path.normpath(path) not in listed:
            report.flag("caption", f"{path}: image has no caption ({meta.name} does not list it). "
                        "Add a line for it or pass --skip_bad_images")
    return samples


def detect_kind(data_dir: str | os.PathLike) -> str:
    """coco2017 if annotations/ exists, imagefolder if metadata or loose images, finegrained if class sub-folders."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset folder not found")
    if (root / "annotations").is_dir():
        return "coco2017"
    if any((root / m).is_file() for m in METADATA_FILES) or any(
            p.suffix.lower() in IMAGE_EXTENSIONS for p in root.iterdir() if p.is_file()):
        return "imagefolder"  # loose images without metadata get the "no metadata.jsonl" error there
    if any(_image_files(d) for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        return "finegrained"
    raise ValueError(f"{root}: no images found. Expected COCO 2017 (annotations/captions_train2017.json + train2017/), "
                     "an image folder with metadata.jsonl/metadata.csv, or class sub-folders of images "
                     f"({', '.join(IMAGE_EXTENSIONS)})")


# ---------------------------------------------------------------------------------------------------------------------
# scan
def _image_error(path: Path, decode: bool) -> str | None:
    try:
        with Image.open(path) as im:
            if decode:
                im.draft("RGB", (64, 64))  # JPEG decodes at 1/8 scale: fast, still reads the whole stream
                im.load()
            else:
                im.verify()  # header and PNG checksums, no decode
                if im.format == "JPEG" and not _jpeg_complete(path):
                    return "truncated JPEG: no end-of-image marker"
    except PIL_ERRORS as err:
        return f"{type(err).__name__}: {err}"
    return None


def _jpeg_complete(path: Path) -> bool:
    """A whole JPEG ends with the EOI marker FF D9 (some writers pad after it): verify() alone misses truncation."""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 4096))
        return b"\xff\xd9" in f.read()


def _apply_caption_mode(samples: list[Sample], mode: str) -> list[Sample]:
    if mode not in CAPTION_MODES:
        raise ValueError(f"caption_mode: expected one of {CAPTION_MODES}, got {mode!r}")
    if mode == "all":
        return [Sample(s.path, [c]) for s in samples for c in s.captions]
    if mode == "first":
        return [Sample(s.path, s.captions[:1]) for s in samples]
    return samples


def _scan(kind: str, data_dir: str | os.PathLike, *, split: str = "train", caption_mode: str = "random",
          caption_column: str = "text", image_column: str = "file_name", template: str = DEFAULT_TEMPLATE,
          category: str | None = None, skip_bad_images: bool = False, decode_images: bool = False,
          demo_num_images: int = 64, demo_resolution: int = 64, demo_seed: int = 0) -> tuple[list[Sample], ScanReport]:
    root = Path(data_dir)
    if kind not in KINDS:
        raise ValueError(f"dataset kind: expected one of {KINDS}, got {kind!r}")
    if kind == "demo":
        make_demo_dataset(root, demo_num_images, demo_resolution, demo_seed)
    elif kind == "auto":
        kind = detect_kind(root)
    elif not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset folder not found")
    report = ScanReport(kind, str(root), skip_bad_images=skip_bad_images)
    if kind == "coco2017":
        samples = _coco_samples(root, split, report)
    elif kind == "finegrained":
        samples = _finegrained_samples(root, template, category, report)
    else:
        samples = _imagefolder_samples(root, caption_column, image_column, report)
    bad = set()
    for path in dict.fromkeys(s.path for s in samples):
        err = _image_error(path, decode_images)
        if err:
            report.flag("image", f"{path}: cannot read image ({err}). {SKIP_HINT}")
            bad.add(path)
    samples = _apply_caption_mode([s for s in samples if s.path not in bad], caption_mode)
    report.num_samples, report.num_images = len(samples), len({s.path for s in samples})
    if not samples:
        raise ValueError(f"{root}: no usable samples.\n{report.summary()}")
    return samples, report


def scan_dataset(kind: str, data_dir: str | os.PathLike, **options) -> ScanReport:
    """Check every caption and image header of a dataset before any model is loaded; see `load_dataset` for options."""
    return _scan(kind, data_dir, **options)[1]


# ---------------------------------------------------------------------------------------------------------------------
# transforms and datasets
def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image as RGB; an error names the file."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except PIL_ERRORS as err:
        raise ValueError(f"{path}: cannot read image ({type(err).__name__}: {err}). {SKIP_HINT}") from err


@dataclass
class ImageTransform:
    """diffusers train_text_to_image: resize short side (bicubic), center/random crop, optional flip, to [-1, 1]."""

    resolution: int = 512
    center_crop: bool = True
    random_flip: bool = False

    def __post_init__(self):
        if not isinstance(self.resolution, int) or self.resolution <= 0:
            raise ValueError(f"resolution must be a positive int, got {self.resolution!r}")

    def __call__(self, image: Image.Image, crop_rng: np.random.Generator | None = None,
                 flip: bool = False) -> torch.Tensor:
        """(3, R, R) float in [-1, 1]; `crop_rng` places a random crop, `flip` mirrors left-right."""
        r, (w, h) = self.resolution, image.size
        # torchvision Resize(int): the short side becomes r, the long side int(r * long / short)
        size = (r, int(r * h / w)) if w <= h else (int(r * w / h), r)
        image = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        if self.center_crop or crop_rng is None:
            left, top = round((size[0] - r) / 2.0), round((size[1] - r) / 2.0)
        else:
            left, top = int(crop_rng.integers(size[0] - r + 1)), int(crop_rng.integers(size[1] - r + 1))
        x = torch.from_numpy(np.asarray(image.crop((left, top, left + r, top + r)), dtype=np.float32))
        x = x.permute(2, 0, 1) / 127.5 - 1.0  # (3, R, R), ToTensor + Normalize([0.5], [0.5])
        return x.flip(-1) if flip else x


class CaptionDataset(Dataset):
    """Images with captions; caption, crop and flip of item i depend only on (seed, epoch, i)."""

    def __init__(self, samples: list[Sample], transform: ImageTransform, seed: int = 0,
                 report: ScanReport | None = None):
        self.samples, self.transform, self.seed, self.report = samples, transform, seed, report
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def caption(self, index: int) -> str:
        captions = self.samples[index].captions
        if len(captions) == 1:
            return captions[0]
        return captions[int(_rng(self.seed, self.epoch, index, _CAPTION).integers(len(captions)))]

    def flip(self, index: int) -> bool:
        return self.transform.random_flip and bool(_rng(self.seed, self.epoch, index, _FLIP).random() < 0.5)

    def __getitem__(self, index: int) -> dict:
        path = self.samples[index].path
        crop_rng = _rng(self.seed, self.epoch, index, _CROP)
        pixels = self.transform(load_rgb(path), crop_rng, self.flip(index))
        return {"pixel_values": pixels, "caption": self.caption(index), "path": str(path)}


def load_dataset(kind: str, data_dir: str | os.PathLike, *, resolution: int = 512, center_crop: bool = True,
                 random_flip: bool = False, seed: int = 0, **options) -> CaptionDataset:
    """Scan then build a dataset; kind in KINDS. Options: split, caption_mode ("random"|"all"|"first"),
    caption_column, image_column, template, category, skip_bad_images, decode_images, demo_num_images/resolution/seed.
    The scan result is `dataset.report` (print `dataset.report.summary()`)."""
    samples, report = _scan(kind, data_dir, **options)
    return CaptionDataset(samples, ImageTransform(resolution, center_crop, random_flip), seed, report)


def coco_caption_pairs(data_dir: str | os.PathLike, split: str = "val", num_samples: int | None = None,
                       seed: int = 0) -> list[tuple[Path, str]]:
    """One caption per COCO image, fixed by `seed`, sorted by image id (FID protocol: val2017, 5000 images)."""
    samples = _coco_samples(Path(data_dir), split, ScanReport("coco2017", str(data_dir)))
    indices = range(len(samples))
    if num_samples is not None:
        if not 0 < num_samples <= len(samples):
            raise ValueError(f"num_samples must be in 1..{len(samples)} ({data_dir} {split}2017), got {num_samples}")
        indices = sorted(np.random.default_rng(seed).choice(len(samples), num_samples, replace=False).tolist())
    # the caption of an image depends on its position only, not on which subset was drawn
    return [(samples[i].path, samples[i].captions[int(_rng(seed, 0, i, _CAPTION).integers(len(samples[i].captions)))])
            for i in indices]


# ---------------------------------------------------------------------------------------------------------------------
# latent caching
class CachedLatentsDataset(Dataset):
    """VAE posteriors cached per image (and its mirror); each item samples latents anew and multiplies them by
    `vae.config.scaling_factor`, so items are ready to be noised. Captions and flips follow the source dataset."""

    def __init__(self, parameters: torch.Tensor, rows: list[int], source: CaptionDataset, scaling_factor: float):
        self.parameters = parameters  # (num_images, 1 or 2 flips, 2 * C, h, w): posterior mean and logvar
        self.rows, self.source, self.scaling_factor = rows, source, scaling_factor

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        self.source.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict:
        src = self.source
        params = self.parameters[self.rows[index], int(src.flip(index))].float()
        mean, logvar = params.chunk(2, dim=0)  # (C, h, w) each
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # diffusers DiagonalGaussianDistribution's clamp
        gen = torch.Generator().manual_seed(_torch_seed(src.seed, src.epoch, index, _NOISE))
        latents = (mean + std * torch.randn(mean.shape, generator=gen)) * self.scaling_factor
        return {"latents": latents, "caption": src.caption(index), "path": str(src.samples[index].path)}


@torch.no_grad()
def cache_latents(dataset: CaptionDataset, vae, batch_size: int = 8, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> CachedLatentsDataset:
    """Encode each distinct image once (twice with random_flip: both mirrors, sd-scripts #214); stored on the CPU."""
    if not isinstance(dataset, CaptionDataset):
        raise TypeError(f"cache_latents: expected a CaptionDataset, got {type(dataset).__name__}")
    if not dataset.transform.center_crop:
        raise ValueError("cache_latents: random crop cannot be cached (each epoch needs a new crop of the full image);"
                         " use --center_crop or drop --cache_latents")
    paths = list(dict.fromkeys(s.path for s in dataset.samples))
    flips = 2 if dataset.transform.random_flip else 1
    chunks = []
    for start in range(0, len(paths), batch_size):
        x = torch.stack([dataset.transform(load_rgb(p)) for p in paths[start:start + batch_size]])  # (B, 3, R, R)
        if flips == 2:
            x = torch.cat([x, x.flip(-1)])  # (2B, 3, R, R): originals, then mirrors
        params = vae.encode(x.to(device, dtype)).latent_dist.parameters.cpu()  # (F*B, 2C, h, w)
        chunks.append(params.unflatten(0, (flips, -1)).transpose(0, 1))  # (B, F, 2C, h, w)
    row_of = {p: i for i, p in enumerate(paths)}
    rows = [row_of[s.path] for s in dataset.samples]
    return CachedLatentsDataset(torch.cat(chunks), rows, dataset, float(vae.config.scaling_factor))


# ---------------------------------------------------------------------------------------------------------------------
# loading batches
class EpochSampler(Sampler[int]):
    """Order of epoch e fixed by (seed, e), as DistributedSampler; set_epoch also reaches the dataset, because
    accelerate calls the sampler's set_epoch instead of the dataset's when the sampler has one."""

    def __init__(self, dataset: Dataset, shuffle: bool = True, seed: int = 0):
        self.dataset, self.shuffle, self.seed, self.epoch = dataset, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        if not self.shuffle:
            return iter(range(len(self.dataset)))
        gen = torch.Generator().manual_seed(_torch_seed(self.seed, self.epoch, 0, _ORDER))
        return iter(torch.randperm(len(self.dataset), generator=gen).tolist())


def collate_fn(examples: list[dict]) -> dict:
    """Stack `pixel_values` (B, 3, R, R) or `latents` (B, 4, h, w); captions and paths as lists."""
    key = "latents" if "latents" in examples[0] else "pixel_values"
    batch = torch.stack([e[key] for e in examples]).to(memory_format=torch.contiguous_format).float()
    return {key: batch, "captions": [e["caption"] for e in examples], "paths": [e["path"] for e in examples]}


def build_dataloader(dataset: Dataset, batch_size: int, shuffle: bool = True, seed: int = 0, num_workers: int = 0,
                     drop_last: bool = False) -> DataLoader:
    """A DataLoader whose order depends only on (seed, epoch); call `loader.sampler.set_epoch(e)` each epoch."""
    # workers are not persistent: each epoch's workers get a fresh copy of the dataset with the new epoch
    return DataLoader(dataset, batch_size=batch_size, sampler=EpochSampler(dataset, shuffle, seed),
                      num_workers=num_workers, collate_fn=collate_fn, drop_last=drop_last)


def tokenize_captions(tokenizer, captions: list[str]) -> torch.Tensor:
    """input_ids (B, model_max_length), padded and truncated as in diffusers' train_text_to_image."""
    return tokenizer(list(captions), padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids


# ---------------------------------------------------------------------------------------------------------------------
# synthetic demo dataset
_DEMO_COLORS = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (40, 70, 220), "yellow": (240, 220, 40),
    "orange": (245, 140, 20), "purple": (130, 50, 170), "pink": (245, 150, 190), "white": (245, 245, 245),
    "black": (15, 15, 15), "gray": (128, 128, 128), "brown": (120, 75, 35), "cyan": (40, 210, 220),
}
_DEMO_SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
_DEMO_MARKER = "demo.json"


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], color: tuple) -> None:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=color)
    elif shape == "star":  # 5 points: outer and inner radius alternate
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.4 * r)
        draw.polygon([(cx + q * np.cos(a), cy - q * np.sin(a)) for a, q in zip(angles, radii)], fill=color)
    elif shape == "ring":
        draw.ellipse(box, outline=color, width=max(2, int(r / 3)))
    else:  # cross
        t = r / 3
        draw.rectangle((x0, cy - t, x1, cy + t), fill=color)
        draw.rectangle((cx - t, y0, cx + t, y1), fill=color)


def _demo_image(index: int, resolution: int, seed: int) -> tuple[Image.Image, str]:
    rng = np.random.default_rng([seed, index])
    names = list(_DEMO_COLORS)
    color, background = rng.choice(len(names), 2, replace=False)
    shape, size = _DEMO_SHAPES[rng.integers(len(_DEMO_SHAPES))], ("small", "big")[rng.integers(2)]
    side = int(resolution * (rng.uniform(0.55, 0.85) if size == "big" else rng.uniform(0.25, 0.4)))
    x0, y0 = (int(v) for v in rng.integers(0, resolution - side + 1, size=2))
    image = Image.new("RGB", (resolution, resolution), _DEMO_COLORS[names[background]])
    _draw_shape(ImageDraw.Draw(image), shape, (x0, y0, x0 + side, y0 + side), _DEMO_COLORS[names[color]])
    return image, f"a {size} {names[color]} {shape} on a {names[background]} background"


def _demo_spec_in(folder: Path) -> dict | None:
    try:
        return json.loads((folder / _DEMO_MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def make_demo_dataset(out_dir: str | os.PathLike, num_images: int = 64, resolution: int = 64, seed: int = 0) -> Path:
    """Coloured shapes captioned "a big red circle on a blue background" (TINY_WORDS only), as an imagefolder with
    metadata.jsonl. Deterministic for a seed; written to a temp folder then renamed; a complete one is reused."""
    out = Path(out_dir)
    spec = {"format": "restune-demo", "version": 1, "num_images": num_images, "resolution": resolution, "seed": seed}
    if _demo_spec_in(out) == spec:
        return out
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: exists and is not a demo dataset with {spec} (found {_demo_spec_in(out)}). "
                         "Delete it or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        lines = []
        for i in range(num_images):
            image, caption = _demo_image(i, resolution, seed)
            image.save(tmp / f"{i:05d}.png")
            lines.append(json.dumps({"file_name": f"{i:05d}.png", "text": caption}))
        (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        (tmp / _DEMO_MARKER).write_text(json.dumps(spec))  # last: its presence means the folder is complete
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
    except OSError:
        if _demo_spec_in(out) != spec:  # another process finishing first is fine; anything else is not
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
