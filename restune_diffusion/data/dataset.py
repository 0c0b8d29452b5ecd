"""Images with captions as a torch Dataset: diffusers' transform, per-sample randomness fixed by (seed, epoch, index),
the epoch-ordered loader, and the dataset of cached VAE posteriors (the cache on disk: latent_cache.py)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from .buckets import BucketBatchSampler, BucketSpec, BucketTable, cover_size
from .captions import CaptionOptions, process_caption
from .formats import Sample, ScanReport, coco_samples
from .images import BadImageError, load_rgb, size_problem
from .scan import scan_samples

# independent random streams of one sample, so e.g. the flip does not depend on how many captions an image has
_CAPTION, _CROP, _FLIP, _ORDER, _DROP, _TAGS = 0, 1, 2, 4, 5, 6  # (3 was the cached latents' noise, now per batch)
# --image_interpolation_mode: diffusers' choices (torchvision InterpolationMode names) as PIL resampling filters, the
# mapping torchvision applies to PIL images (nearest_exact is PIL's nearest, which samples pixel centres)
INTERPOLATION_MODES = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                       "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
                       "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST,
                       "nearest_exact": Image.Resampling.NEAREST}
MAX_SKIPS = 100  # consecutive bad images one item may step over under skip_bad_images
log = logging.getLogger(__name__)


def sample_rng(seed: int, epoch: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index, stream])


def torch_seed(seed: int, epoch: int, index: int, stream: int) -> int:
    return int(sample_rng(seed, epoch, index, stream).integers(2**62))


@dataclass
class ImageTransform:
    """diffusers train_text_to_image: resize short side (bicubic unless `interpolation` says otherwise), center or
    random crop, optional flip, to [-1, 1]."""

    resolution: int = 512
    center_crop: bool = True
    random_flip: bool = False
    interpolation: str = "bicubic"

    def __post_init__(self):
        if not isinstance(self.resolution, int) or self.resolution <= 0:
            raise ValueError(f"resolution must be a positive int, got {self.resolution!r}")
        if self.interpolation not in INTERPOLATION_MODES:
            raise ValueError(f"image_interpolation_mode: expected one of {sorted(INTERPOLATION_MODES)}, got "
                             f"{self.interpolation!r}")

    def __call__(self, image: Image.Image, crop_rng: np.random.Generator | None = None,
                 flip: bool = False, target: tuple[int, int] | None = None) -> torch.Tensor:
        """(3, H, W) float in [-1, 1], (W, H) = `target` (a bucket) or (R, R); `crop_rng` places a random crop,
        `flip` mirrors left-right."""
        tw, th = target or (self.resolution, self.resolution)
        problem = size_problem(image.size)
        if problem:
            raise BadImageError(f"{problem} (ImageTransform)")
        # covers the target with the aspect kept; for a square one torchvision's Resize(int): the short side becomes
        # r, the long side int(r * long / short)
        size = cover_size(image.size, (tw, th))
        image = image.convert("RGB").resize(size, INTERPOLATION_MODES[self.interpolation])
        if self.center_crop or crop_rng is None:
            left, top = round((size[0] - tw) / 2.0), round((size[1] - th) / 2.0)
        else:
            left, top = int(crop_rng.integers(size[0] - tw + 1)), int(crop_rng.integers(size[1] - th + 1))
        x = torch.from_numpy(np.asarray(image.crop((left, top, left + tw, top + th)), dtype=np.float32))
        x = x.permute(2, 0, 1) / 127.5 - 1.0  # (3, H, W), ToTensor + Normalize([0.5], [0.5])
        return x.flip(-1) if flip else x


class CaptionDataset(Dataset):
    """Images with captions; caption, crop and flip of item i depend only on (seed, epoch, i). With skip_bad_images an
    image that fails to decode here (scan_mode="header") is counted in `skipped` and the next good item is used.
    With caption_dropout_rate p the caption is "" with probability p (classifier-free guidance learns the empty
    prompt), drawn from its own stream of (seed, epoch, i); `caption_options` shuffle and thin tag-list captions
    (kohya's flags, captions.py) from another. With `buckets` each item is resized to its image's bucket
    (buckets.py; `target_size`), its size from the scan."""

    def __init__(self, samples: list[Sample], transform: ImageTransform, seed: int = 0,
                 report: ScanReport | None = None, skip_bad_images: bool = False, caption_dropout_rate: float = 0.0,
                 caption_options: CaptionOptions | None = None, buckets: BucketTable | None = None):
        if not 0.0 <= caption_dropout_rate <= 1.0:
            raise ValueError(f"caption_dropout_rate must be in [0, 1], got {caption_dropout_rate!r}")
        self.samples, self.transform, self.seed, self.report = samples, transform, seed, report
        self.skip_bad_images, self.caption_dropout_rate = skip_bad_images, caption_dropout_rate
        self.caption_options = caption_options or CaptionOptions()
        self.buckets = buckets
        self.skipped: dict[str, str] = {}  # path -> problem, images skipped at load time (in this process)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def caption(self, index: int) -> str:
        rate = self.caption_dropout_rate
        if rate and sample_rng(self.seed, self.epoch, index, _DROP).random() < rate:
            return ""
        captions = self.samples[index].captions
        text = captions[0] if len(captions) == 1 else \
            captions[int(sample_rng(self.seed, self.epoch, index, _CAPTION).integers(len(captions)))]
        if not self.caption_options.active:
            return text
        return process_caption(text, self.caption_options, sample_rng(self.seed, self.epoch, index, _TAGS))

    def target_size(self, index: int) -> tuple[int, int]:
        """(w, h) item `index` is made at: its image's bucket, or (resolution, resolution)."""
        if self.buckets is None:
            return self.transform.resolution, self.transform.resolution
        size = self.samples[index].size
        if size is None:
            raise ValueError(f"{self.samples[index].path}: no image size from the scan; buckets need one (scan the "
                             "data set with load_dataset)")
        return self.buckets.select(size)

    def flip(self, index: int) -> bool:
        return self.transform.random_flip and bool(sample_rng(self.seed, self.epoch, index, _FLIP).random() < 0.5)

    def item(self, index: int) -> dict:
        """Item `index` exactly, or its image's named error."""
        path = self.samples[index].path
        crop_rng = sample_rng(self.seed, self.epoch, index, _CROP)
        try:
            pixels = self.transform(load_rgb(path), crop_rng, self.flip(index), self.target_size(index))
        except BadImageError as err:
            raise BadImageError(f"{path}: {err}" if not str(err).startswith(str(path)) else str(err)) from None
        return {"pixel_values": pixels, "caption": self.caption(index), "path": str(path)}

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")  # ends `for item in dataset`
        index %= len(self)
        if not self.skip_bad_images:
            return self.item(index)
        for step in range(min(MAX_SKIPS, len(self))):
            if step and self.buckets is not None and self.target_size((index + step) % len(self)) != \
                    self.target_size(index):
                continue  # its batch holds one bucket: the next good item of the same one
            try:
                return self.item((index + step) % len(self))
            except BadImageError as err:
                path = str(self.samples[(index + step) % len(self)].path)
                if path not in self.skipped:
                    self.skipped[path] = str(err)
                    log.warning("skipped at load time (--skip_bad_images, %d so far): %s", len(self.skipped), err)
        raise BadImageError(f"{MAX_SKIPS} images in a row from item {index} cannot be read; the data set looks broken "
                            f"(e.g. {next(reversed(self.skipped.values()), '')})")


def load_dataset(kind: str, data_dir: str | os.PathLike, *, resolution: int = 512, center_crop: bool = True,
                 random_flip: bool = False, seed: int = 0, interpolation: str = "bicubic",
                 caption_dropout_rate: float = 0.0, shuffle_caption: bool = False, keep_tokens: int = 0,
                 caption_tag_dropout_rate: float = 0.0, keep_tokens_separator: str | None = None,
                 enable_bucket: bool = False, min_bucket_reso: int | None = None, max_bucket_reso: int | None = None,
                 bucket_reso_steps: int | None = None, **options) -> CaptionDataset:
    """Scan then build a dataset; kind in KINDS ("hf": data_dir is a `datasets` folder or cached hub id). Options:
    split, caption_mode ("random"|"all"|"first"), caption_column, image_column, template (fine-grained: "{}" or
    "{class}" is the class name), category, class_names (a file), dataset_config_name (hf), max_train_samples (the
    first N after a shuffle seeded by `seed`), caption_extension (kohya layout: default .txt then .caption),
    shuffle_caption/keep_tokens/caption_tag_dropout_rate/keep_tokens_separator (captions.py),
    enable_bucket/min_bucket_reso/max_bucket_reso/bucket_reso_steps (buckets.py), skip_bad_images,
    scan_mode ("decode"|"header", see scan.py),
    scan_cache (True: <data_dir>/.restune_cache, a folder, or False), progress, demo_num_images/resolution/seed.
    The scan result is `dataset.report` (print `dataset.report.summary()`; `write_caption_set(dataset.report, out)`
    writes the derived captions with their counts)."""
    transform = ImageTransform(resolution, center_crop, random_flip, interpolation)  # its errors before the scan
    tags = CaptionOptions(shuffle_caption, keep_tokens, caption_tag_dropout_rate, keep_tokens_separator)
    spec = BucketSpec(resolution, min_bucket_reso, max_bucket_reso, bucket_reso_steps) if enable_bucket else None
    samples, report = scan_samples(kind, data_dir, seed=seed, **options)
    return CaptionDataset(samples, transform, seed, report, skip_bad_images=report.skip_bad_images,
                          caption_dropout_rate=caption_dropout_rate, caption_options=tags,
                          buckets=BucketTable(spec) if spec else None)


def coco_caption_pairs(data_dir: str | os.PathLike, split: str = "val", num_samples: int | None = None,
                       seed: int = 0) -> list[tuple[Path, str]]:
    """One caption per COCO image, fixed by `seed`, sorted by image id (FID protocol: val2017, 5000 images)."""
    samples = coco_samples(Path(data_dir), split, ScanReport("coco2017", str(data_dir)))
    indices = range(len(samples))
    if num_samples is not None:
        if not 0 < num_samples <= len(samples):
            raise ValueError(f"num_samples must be in 1..{len(samples)} ({data_dir} {split}2017), got {num_samples}")
        indices = sorted(np.random.default_rng(seed).choice(len(samples), num_samples, replace=False).tolist())
    # the caption of an image depends on its position only, not on which subset was drawn
    picks = [int(sample_rng(seed, 0, i, _CAPTION).integers(len(samples[i].captions))) for i in indices]
    return [(samples[i].path, samples[i].captions[k]) for i, k in zip(indices, picks)]


# latent caching (the cache itself: latent_cache.py)
class CachedLatentsDataset(Dataset):
    """Cached VAE posteriors: item i is the posterior (mean, logvar) of its image, or of its mirror when item i is
    flipped, as `latent_parameters` (2C, h, w). The training step samples it with the generator draws an encode would
    take (train.batch_inputs), so --cache_latents leaves the numbers of a run as they were. Captions and flips follow
    the source dataset."""

    def __init__(self, parameters, rows: list[int], source: CaptionDataset):
        self.parameters = parameters  # [row, flip] -> (2C, h, w): posterior mean and logvar
        self.rows, self.source = rows, source

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        self.source.set_epoch(epoch)

    def target_size(self, index: int) -> tuple[int, int]:
        return self.source.target_size(index)

    @property
    def buckets(self):
        return self.source.buckets

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        src = self.source
        params = self.parameters[self.rows[index], int(src.flip(index))].float()  # (2C, h, w)
        return {"latent_parameters": params, "caption": src.caption(index), "path": str(src.samples[index].path)}


# prior preservation (DreamBooth)
class PairedDataset(Dataset):
    """DreamBooth's prior preservation: item i is instance item i with class item (epoch·n + i) mod n_class (n the
    instance count), so each epoch is one pass over the instance images and every class image is used over the
    epochs; `paired_collate` makes a batch of B items the 2B rows [B instance; B class]. Either part may be cached
    latents. The order, captions and flips of both parts follow (seed, epoch, index), as their own datasets do."""

    def __init__(self, instance: Dataset, classes: Dataset):
        if getattr(instance, "buckets", None) is not None:
            raise ValueError("prior preservation: the class images are square; the instance data set must not use "
                             "aspect-ratio buckets")
        if len(classes) == 0:
            raise ValueError("prior preservation: no class images")
        self.instance, self.classes, self.epoch = instance, classes, 0
        self.buckets = None

    def __len__(self) -> int:
        return len(self.instance)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for part in (self.instance, self.classes):
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)

    def class_index(self, index: int) -> int:
        return (self.epoch * len(self.instance) + index) % len(self.classes)

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        return {"instance": self.instance[index], "class": self.classes[self.class_index(index)]}


def paired_collate(examples: list[dict]) -> dict:
    """B paired items -> one batch of 2B rows, the instance rows first (diffusers' DreamBooth collate), with
    `class_rows` = B: the loss splits the prediction into its two halves."""
    batch = collate_fn([e["instance"] for e in examples] + [e["class"] for e in examples])
    batch["class_rows"] = len(examples)
    return batch


class TaskDatasets(Dataset):
    """A joint run whose K tasks read their own data (train/joint.py, routed): item i holds, for each task k, item
    (epoch·n + i) mod n_k of its data set (n the longest one's length), so an epoch is one pass over the longest and
    a shorter one cycles over the epochs (as PairedDataset's class images); a task whose data set is the longest's
    length reads item i, the item an alone run reads at that place of its order. `task_collate` makes a batch of B
    items the K·B rows [task 0's B; task 1's B; ...]. Each part keeps its own captions, flips and cached latents."""

    def __init__(self, parts: list[Dataset], names: list[str]):
        for name, part in zip(names, parts):
            if getattr(part, "buckets", None) is not None:
                raise ValueError(f"task {name}: tasks on their own data share one backbone batch; their data sets "
                                 "must not use aspect-ratio buckets")
            if len(part) == 0:
                raise ValueError(f"task {name}: its data set has no samples")
        self.parts, self.names, self.epoch = list(parts), list(names), 0
        self.buckets = None

    def __len__(self) -> int:
        return max(len(p) for p in self.parts)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for part in self.parts:
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)

    def part_index(self, k: int, index: int) -> int:
        n, size = len(self), len(self.parts[k])
        return index if size == n else (self.epoch * n + index) % size

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        return {"tasks": [part[self.part_index(k, index)] for k, part in enumerate(self.parts)]}


def task_collate(examples: list[dict]) -> dict:
    """B items of TaskDatasets -> one batch of K·B rows, task k's in rows k·B..(k+1)·B, with `task_rows` = B."""
    blocks = [collate_fn([e["tasks"][k] for e in examples]) for k in range(len(examples[0]["tasks"]))]
    key = "latent_parameters" if "latent_parameters" in blocks[0] else "pixel_values"
    if any(key not in b for b in blocks):
        raise ValueError("tasks on their own data: either every task's latents are cached or none")
    return {key: torch.cat([b[key] for b in blocks]), "captions": [c for b in blocks for c in b["captions"]],
            "paths": [p for b in blocks for p in b["paths"]], "task_rows": len(examples)}


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
        gen = torch.Generator().manual_seed(torch_seed(self.seed, self.epoch, 0, _ORDER))
        return iter(torch.randperm(len(self.dataset), generator=gen).tolist())


def collate_fn(examples: list[dict]) -> dict:
    """Stack `pixel_values` (B, 3, R, R) or cached `latent_parameters` (B, 2C, h, w); captions and paths as lists."""
    key = "latent_parameters" if "latent_parameters" in examples[0] else "pixel_values"
    batch = torch.stack([e[key] for e in examples]).to(memory_format=torch.contiguous_format).float()
    return {key: batch, "captions": [e["caption"] for e in examples], "paths": [e["path"] for e in examples]}


def build_dataloader(dataset: Dataset, batch_size: int, shuffle: bool = True, seed: int = 0, num_workers: int = 0,
                     drop_last: bool = False, num_processes: int = 1) -> DataLoader:
    """A DataLoader whose order depends only on (seed, epoch); call `loader.batch_sampler.sampler.set_epoch(e)` (the
    EpochSampler) each epoch. A dataset with aspect-ratio buckets is batched one bucket per batch, and per global
    batch of `num_processes` batches (buckets.BucketBatchSampler; drop_last does not apply). A PairedDataset's
    batches hold its instance rows, then its class rows (paired_collate); a TaskDatasets' each task's rows in turn
    (task_collate)."""
    # workers are not persistent: each epoch's workers get a fresh copy of the dataset with the new epoch
    epochs = EpochSampler(dataset, shuffle, seed)
    collate = {PairedDataset: paired_collate, TaskDatasets: task_collate}.get(type(dataset), collate_fn)
    if getattr(dataset, "buckets", None) is not None:
        return DataLoader(dataset, batch_sampler=BucketBatchSampler(dataset, batch_size, epochs, num_processes),
                          num_workers=num_workers, collate_fn=collate)
    return DataLoader(dataset, batch_size=batch_size, sampler=epochs, num_workers=num_workers, collate_fn=collate,
                      drop_last=drop_last)


def tokenize_captions(tokenizer, captions: list[str]) -> torch.Tensor:
    """input_ids (B, model_max_length), padded and truncated as in diffusers' train_text_to_image."""
    return tokenizer(list(captions), padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids


