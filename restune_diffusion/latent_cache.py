"""VAE latents cached on disk (issue 16 part 3): reused across runs, each process encodes its share, and resident
memory stays flat however large the data set (the in-memory cache this replaced held ~15.5 GB per process for COCO
train at 512 px with flips in fp16).

Layout of `<cache_dir>/<key>/`: `latents.bin` (raw array (num_images, flips, 2C, h, w) in `meta.json`'s dtype, the
layout `np.memmap` reads; with aspect-ratio buckets one `latents-<w>x<h>.bin` per bucket, holding that bucket's images
in order), `done.bin` (one byte per image, set once its row is written) and `meta.json`. The key is a hash of the
VAE's encoder weights and config, the resolution, crop, flips, resize filter, dtype, the list of images and the
bucket settings, so any change makes a new cache. Both mirrors are cached with random_flip (sd-scripts #214);
random crop is refused.

What training calls (train/setup.py; every process; then a barrier; then every process):
    folder = build_latent_cache(dataset, vae, cache_dir, rank=accelerator.process_index,
                                num_processes=accelerator.num_processes, device=accelerator.device, dtype=...)
    accelerator.wait_for_everyone()
    dataset = open_latent_cache(folder, dataset)
Items are posterior parameters, sampled in the training step with the draws an encode would take, so a run with the
cache gives the losses of a run without it (exactly, in fp32 with the cache stored in fp32).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from restune_diffusion.data import CachedLatentsDataset, CaptionDataset, load_rgb
from restune_diffusion.files import atomic_write_text

CACHE_VERSION = 1
_datasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync
DTYPES = {torch.float16: "float16", torch.float32: "float32", torch.bfloat16: "bfloat16"}


def vae_fingerprint(vae) -> str:
    """SHA-256 over the VAE config and its encoder-side weights (what the cached posteriors depend on)."""
    # private keys are diffusers' bookkeeping; `_use_default_values` is a list made from a set, so its order changes
    # with the process's hash seed and two processes of one run would key different caches
    config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        if name.startswith(("encoder.", "quant_conv.")):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_key(dataset: CaptionDataset, vae, dtype: torch.dtype) -> dict:
    t = dataset.transform
    images = list(dict.fromkeys(str(s.path) for s in dataset.samples))
    key = {"version": CACHE_VERSION, "vae": vae_fingerprint(vae), "resolution": t.resolution,
           "center_crop": t.center_crop, "flips": 2 if t.random_flip else 1, "interpolation": t.interpolation,
           "dtype": DTYPES[dtype],
           "images": hashlib.sha256("\n".join(images).encode()).hexdigest()[:16], "num_images": len(images)}
    if dataset.buckets is not None:  # (absent without buckets: the caches made before buckets stay valid)
        key["buckets"] = dataset.buckets.spec.as_dict()
    return key


def image_groups(dataset: CaptionDataset) -> list[tuple[str, list[int], tuple[int, int]]]:
    """(file name, the image numbers it holds in order, the images' (w, h)) per image size: one `latents.bin`
    without buckets, one `latents-<w>x<h>.bin` per bucket with them. Images are numbered in the order of their first
    sample."""
    first: dict[str, int] = {}
    for index, sample in enumerate(dataset.samples):
        first.setdefault(str(sample.path), index)
    groups: dict[tuple[int, int], list[int]] = {}
    for number, index in enumerate(first.values()):
        groups.setdefault(dataset.target_size(index), []).append(number)
    return [("latents.bin" if dataset.buckets is None else f"latents-{w}x{h}.bin", numbers, (w, h))
            for (w, h), numbers in sorted(groups.items())]


def _row_shape(vae, size: tuple[int, int], flips: int) -> tuple[int, ...]:
    """(F, 2C, h, w) of one image's posterior parameters."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    w, h = size
    if w % factor or h % factor:
        raise ValueError(f"--cache_latents: image size {w}x{h} is not a multiple of the VAE's factor {factor}; pick "
                         "a --resolution (and --bucket_reso_steps) that is")
    return flips, 2 * vae.config.latent_channels, h // factor, w // factor


def _create_once(path: Path, size: int) -> None:
    """Make `path` a zero-filled (sparse) file of `size` bytes, once, even with several processes racing."""
    if path.exists():
        return
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.truncate(size)
    try:
        os.link(tmp, path)  # atomic, and fails if another process made it first
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


@torch.no_grad()
def build_latent_cache(dataset: CaptionDataset, vae, cache_dir: str | os.PathLike, *, rank: int = 0,
                       num_processes: int = 1, batch_size: int = 8, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float16, extra_key: dict | None = None) -> Path:
    """Encode this process's share (images i with i % num_processes == rank) of the rows not yet done; returns the
    cache folder. Rows already written (an earlier or interrupted run) are not encoded again. `extra_key`: more of
    what the images depend on (prior preservation's class images: their folder and generation settings)."""
    if not isinstance(dataset, CaptionDataset):
        raise TypeError(f"build_latent_cache: expected a CaptionDataset, got {type(dataset).__name__}")
    if not dataset.transform.center_crop:
        raise ValueError("build_latent_cache: random crop cannot be cached (each epoch needs a new crop of the full "
                         "image); use --center_crop or drop --cache_latents")
    if dtype not in DTYPES:
        raise ValueError(f"build_latent_cache: dtype must be one of {list(DTYPES)}, got {dtype}")
    key = {**cache_key(dataset, vae, dtype), **(extra_key or {})}
    folder = Path(cache_dir) / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    folder.mkdir(parents=True, exist_ok=True)
    groups = image_groups(dataset)
    shapes = {name: _row_shape(vae, size, key["flips"]) for name, _, size in groups}
    atomic_write_text(folder / "meta.json", json.dumps({**key, "files": {name: [len(numbers), *shapes[name]]
                                                                         for name, numbers, _ in groups}}, indent=1))
    store_dtype = np.float32 if dtype == torch.float32 else np.float16  # bfloat16 is stored as float16
    for name, numbers, _ in groups:
        _create_once(folder / name, len(numbers) * int(np.prod(shapes[name])) * np.dtype(store_dtype).itemsize)
    _create_once(folder / "done.bin", key["num_images"])
    done = np.fromfile(folder / "done.bin", np.uint8)
    paths = list(dict.fromkeys(s.path for s in dataset.samples))
    # written with pwrite, never mapped: a mapped file's touched pages count in this process's resident set, which
    # would grow to the file's size (~15.5 GB for COCO train at 512 px with flips)
    done_fd = os.open(folder / "done.bin", os.O_WRONLY)
    try:
        for name, numbers, size in groups:
            todo = [(row, n) for row, n in enumerate(numbers) if n % num_processes == rank and not done[n]]
            latents_fd = os.open(folder / name, os.O_WRONLY)
            try:
                for start in range(0, len(todo), batch_size):
                    _encode(dataset, vae, paths, todo[start:start + batch_size], size if dataset.buckets else None,
                            shapes[name], store_dtype, (latents_fd, done_fd), device)
            finally:
                os.close(latents_fd)
    finally:
        os.close(done_fd)
    return folder


def _encode(dataset, vae, paths, chunk, target, shape, store_dtype, fds, device) -> None:
    """Encode the images of `chunk` ((row in the file, image number) pairs); their rows are on disk before they
    are marked done, so an interrupted run re-encodes only the images not marked."""
    latents_fd, done_fd = fds
    flips, row_bytes = shape[0], int(np.prod(shape)) * np.dtype(store_dtype).itemsize
    x = torch.stack([dataset.transform(load_rgb(paths[n]), target=target) for _, n in chunk])  # (B, 3, H, W)
    if flips == 2:
        x = torch.cat([x, x.flip(-1)])  # (2B, 3, H, W): originals, then mirrors
    params = vae.encode(x.to(device, vae.dtype)).latent_dist.parameters.float().cpu()  # (F*B, 2C, h, w)
    params = params.unflatten(0, (flips, -1)).transpose(0, 1)  # (B, F, 2C, h, w)
    block = params.numpy().astype(store_dtype)
    for (row, _), values in zip(chunk, block):
        os.pwrite(latents_fd, values.tobytes(), row * row_bytes)
    _datasync(latents_fd)
    for _, number in chunk:
        os.pwrite(done_fd, b"\x01", number)
    _datasync(done_fd)


class LatentFile:
    """Rows of one latents file read with pread (no mapping kept): resident memory does not grow with the file."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: str):
        self.path, self.shape = path, tuple(shape)  # (rows, F, 2C, h, w)
        self.dtype = np.dtype(np.float32 if dtype == "float32" else np.float16)
        self.row_items = int(np.prod(self.shape[2:]))
        self._fd: int | None = None
        self._pid = -1

    def __getstate__(self) -> dict:  # DataLoader workers open their own descriptor
        return {**self.__dict__, "_fd": None, "_pid": -1}

    def __getitem__(self, where: tuple[int, int]) -> torch.Tensor:
        row, flip = where
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        count = self.row_items * self.dtype.itemsize
        offset = (row * self.shape[1] + flip) * count
        buffer = os.pread(self._fd, count, offset)
        return torch.from_numpy(np.frombuffer(buffer, self.dtype).reshape(self.shape[2:]).copy())  # (2C, h, w)


class LatentFiles:
    """[image number, flip] -> (2C, h, w), whichever file (bucket) holds the image."""

    def __init__(self, files: list[LatentFile], where: list[tuple[int, int]]):
        self.files, self.where = files, where  # where[image number] = (file, row)

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        number, flip = key
        file, row = self.where[number]
        return self.files[file][row, flip]


def open_latent_cache(folder: str | os.PathLike, dataset: CaptionDataset) -> CachedLatentsDataset:
    """The dataset's items as cached latents (after every process ran build_latent_cache); an error names missing
    rows (a process that did not finish)."""
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    done = np.fromfile(folder / "done.bin", np.uint8)
    if len(done) != meta["num_images"] or not done.all():
        raise ValueError(f"{folder}: latent cache incomplete ({int(done.sum())} of {meta['num_images']} images "
                         "encoded); run build_latent_cache on every process before opening it")
    row_of = {p: i for i, p in enumerate(dict.fromkeys(s.path for s in dataset.samples))}
    if len(row_of) != meta["num_images"]:
        raise ValueError(f"{folder}: cache made for {meta['num_images']} images, the dataset has {len(row_of)}")
    files, where = [], [(0, 0)] * len(row_of)
    for k, (name, numbers, _) in enumerate(image_groups(dataset)):
        files.append(LatentFile(folder / name, meta["files"][name], meta["dtype"]))
        for row, number in enumerate(numbers):
            where[number] = (k, row)
    rows = [row_of[s.path] for s in dataset.samples]
    return CachedLatentsDataset(LatentFiles(files, where), rows, dataset)
