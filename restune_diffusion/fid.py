"""FID on COCO2017 for Stable Diffusion v1.5 (the paper's Table: FID SD 15.48 ... Res-Tuning 13.96).

Three parts (k-diffusion's split): the TF-ported FID Inception-v3 extractor, feature collection, and the statistic,
which is torchmetrics' `FrechetInceptionDistance` fed by our extractor (float64 statistics, TF32 off).

Protocol (PROTOCOL below; it is written into every result JSON):
- Data: COCO2017 val, by default all 5,000 val2017 images, one caption per image drawn with a fixed seed.
- Real: center crop to a square, bicubic PIL resize to the evaluation resolution (default 512).
- Fake: generated at that resolution from the caption, with a fixed seed per image index (`seed * 1e6 + index`), so
  an interrupted run resumes by skipping the `fake/{index:05d}.png` already written.
- Both: the same bicubic PIL resize of uint8 images to 299x299, then the FID Inception-v3 of the TF graph
  (pt_inception-2015-12-05 weights) on uint8 values mapped with `(x - 128) / 128` as the graph does; pool3 (2048-d).
- Fewer than 5,000 images: FID is biased upward and only comparable at equal N; under 2,048 the covariance is
  rank-deficient (pytorch-fid #13). Both are warned about and N is recorded.
- Real statistics are cached in an .npz named by a hash of the protocol parameters (data dir, split, N, seed,
  resolution, Inception weights hash) and recomputed when any of them changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .data import coco_caption_pairs, load_rgb
from .weights import atomic_write, atomic_write_text

PROTOCOL_VERSION = "restune-fid-v1"
PROTOCOL = (
    "COCO2017 {split}: N images (default all 5,000 val2017), one caption each drawn with a fixed seed. "
    "Real: center crop to square, bicubic PIL resize to the evaluation resolution (default 512). "
    "Fake: generated at that resolution, fixed seed per image index. Both: bicubic PIL resize of uint8 images to "
    "299x299, TF-ported FID Inception-v3 (pt_inception-2015-12-05-6726825d.pth) on (x - 128) / 128, pool3 2048-d "
    "features, float64 statistics and Frechet distance by torchmetrics, TF32 off. FID at N < 5,000 is biased upward "
    "and comparable only at equal N; N < 2,048 gives a rank-deficient covariance."
)
FOLDER_PROTOCOL = (
    "Two image folders: each image center-cropped to square and bicubic PIL resized to 299x299 uint8, TF-ported FID "
    "Inception-v3 (pt_inception-2015-12-05-6726825d.pth) on (x - 128) / 128, pool3 2048-d features, float64 "
    "statistics and Frechet distance by torchmetrics, TF32 off. Comparable only at equal N."
)
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
WEIGHTS_ENV = "RESTUNE_FID_INCEPTION"
INCEPTION_SIZE = 299
NUM_FEATURES = 2048
COCO_FULL_N = 5000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# ---------------------------------------------------------------------------------------------------------------------
# The FID Inception-v3: torchvision's Inception3 layout (aux_logits=False, 1008-way fc) with the TF graph's pooling.
class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)  # TF's epsilon, not torch's 1e-5

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x):
    # TF's average pool does not count padded zeros; torch's default does
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # Mixed_5b-5d
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool(x))], 1)


class InceptionB(nn.Module):  # Mixed_6a: grid reduction 35 -> 17
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):  # Mixed_6b-6e: factorised 7x7
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):  # Mixed_7a: grid reduction 17 -> 8
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):  # Mixed_7b (pool="avg", FIDInceptionE_1) and Mixed_7c (pool="max", FIDInceptionE_2)
    def __init__(self, cin: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"InceptionE pool: expected 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        # the TF graph's last block max-pools here (pytorch-fid's FIDInceptionE_2); the one before average-pools
        pooled = _avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """The TF FID Inception-v3 (TTUR / pytorch-fid weights layout): uint8-valued (B, 3, H, W) -> pool3 (B, 2048).

    Input of any dtype holding 0..255 values; not 299x299 -> bilinear resize (align_corners=False, as pytorch-fid).
    The protocol resizes with PIL bicubic beforehand, so this resize does not run there.
    """

    num_features = NUM_FEATURES  # read by torchmetrics instead of probing with a dummy image

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)  # in the weights file; FID does not use the logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"FIDInceptionV3: expected images (B, 3, H, W) with values 0..255, got {tuple(x.shape)}")
        dtype = self.fc.weight.dtype
        x = x.to(dtype)
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        x = (x - 128.0) / 128.0  # the TF graph's Sub/Mul on uint8 (PITFALLS "FID"), not pytorch-fid's 2x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)  # ... (B, 2048, 8, 8)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 2048) pool3
        return x.float() if dtype != torch.float64 else x


# ---------------------------------------------------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The weights file from the argument, else $RESTUNE_FID_INCEPTION; a named error saying where to get it."""
    given = path if path is not None else os.environ.get(WEIGHTS_ENV)
    if given and Path(given).is_file():
        return Path(given)
    where = (f"{given}: no such file. " if given
             else f"No FID Inception weights given (--inception_weights, ${WEIGHTS_ENV}). ")
    raise FileNotFoundError(
        f"{where}FID needs {WEIGHTS_FILE}, the TF FID Inception-v3 ported by pytorch-fid (GitHub release of "
        f"pytorch-fid v0.1.0, tag fid_weights): download {WEIGHTS_URL} on a machine with network access, then pass "
        f"--inception_weights PATH or set {WEIGHTS_ENV}=PATH. Nothing is downloaded here."
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a pickle with objects, a truncated file, ...
            raise ValueError(f"{path}: could not read as a weights-only torch state dict ({err}). "
                             f"Expected {WEIGHTS_FILE} or a .safetensors copy of it.") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict (name -> tensor) in the FID Inception layout, "
                         f"got {type(state).__name__}")
    return state


def load_fid_inception(path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> FIDInceptionV3:
    """Build FIDInceptionV3 and load pt_inception-2015-12-05 weights (.pth weights-only, or .safetensors), strictly."""
    path = resolve_inception_weights(path)
    state = _read_state_dict(path)
    model = FIDInceptionV3()
    expected = model.state_dict()
    # files with and without BatchNorm's num_batches_tracked both exist; nothing else may be missing
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"{path}: not the FID Inception-v3 key layout of {WEIGHTS_FILE}: {len(missing)} keys missing "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}."
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(f"{path}: {key}: shape {tuple(tensor.shape)} in file vs {tuple(expected[key].shape)} "
                             f"in FIDInceptionV3. Expected {WEIGHTS_FILE}.")
    model.load_state_dict(state, strict=False)
    model.requires_grad_(False)
    return model.to(device=device, dtype=dtype).eval()


@contextlib.contextmanager
def tf32_disabled() -> Iterator[None]:
    """Full fp32 matmuls/convs while features and statistics are computed; the previous settings come back after."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def fid_metric(inception: FIDInceptionV3):
    """torchmetrics' FID over our extractor; its accumulators are float64 whatever the feature dtype."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    device = next(inception.parameters()).device
    # normalize=False: images go to the extractor as given (uint8 0..255); reset() keeps the real statistics
    metric = FrechetInceptionDistance(feature=inception, normalize=False, reset_real_features=False)
    return metric.to(device)


def fid_value(metric) -> float:
    with tf32_disabled():
        return float(metric.compute())


# ---------------------------------------------------------------------------------------------------------------------
# Images: one resize path for real and fake.
def square_resize(image: Image.Image, size: int) -> Image.Image:
    """Center crop to a square, then bicubic PIL resize to size x size (uint8 in, uint8 out)."""
    image = image.convert("RGB")
    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    if (w, h) != (s, s):
        image = image.crop((left, top, left + s, top + s))
    return image if image.size == (size, size) else image.resize((size, size), Image.BICUBIC)


def inception_image(path: str | os.PathLike, resolution: int | None = None) -> Image.Image:
    """A file as the extractor sees it: [crop + bicubic to `resolution` (real COCO images)], then crop + bicubic 299."""
    image = load_rgb(path)
    if resolution is not None:
        image = square_resize(image, resolution)
    return square_resize(image, INCEPTION_SIZE)


def extract(metric, items: Sequence, prepare: Callable[[object], Image.Image], *, real: bool, batch_size: int,
            desc: str) -> None:
    """Feed `prepare(item)` (a 299x299 PIL image) for every item to the metric, in batches, with a progress bar."""
    from tqdm.auto import tqdm

    device = metric.real_features_sum.device
    with tf32_disabled(), tqdm(total=len(items), desc=desc, unit="img") as bar:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            pixels = np.stack([np.asarray(prepare(item), dtype=np.uint8) for item in chunk])  # (B, 299, 299, 3)
            metric.update(torch.from_numpy(pixels).permute(0, 3, 1, 2).to(device), real=real)
            bar.update(len(chunk))


# ---------------------------------------------------------------------------------------------------------------------
# Real statistics cache: mu, sigma, n and the protocol key in an .npz named by a hash of the key.
def _key_json(key: dict) -> str:
    return json.dumps(key, sort_keys=True)


def stats_cache_path(cache_dir: str | os.PathLike, key: dict) -> Path:
    return Path(cache_dir) / f"fid_real_{hashlib.sha256(_key_json(key).encode()).hexdigest()[:16]}.npz"


def cached_real_statistics(metric, key: dict, cache_dir: str | os.PathLike | None,
                           compute: Callable[[], None]) -> tuple[Path | None, bool]:
    """Load the real statistics for `key` into the metric, or run `compute()` (which fills them) and save them.

    Returns (cache file or None, reused?). The file stores mu, sigma, n; the metric's float64 accumulators are rebuilt
    from them (sum = n mu, cov_sum = (n - 1) sigma + n mu mu^T), the inverse of what torchmetrics' compute() does.
    """
    if cache_dir is None:
        compute()
        return None, False
    path = stats_cache_path(cache_dir, key)
    if path.is_file():
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["key"]) == _key_json(key):
                _set_real_statistics(metric, stored["mu"], stored["sigma"], int(stored["n"]))
                return path, True
        warnings.warn(f"{path}: cached real statistics were made for another protocol key; recomputing.", stacklevel=2)
    compute()
    mu, sigma, n = real_statistics(metric)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare temp name
            np.savez(f, mu=mu, sigma=sigma, n=np.int64(n), key=np.array(_key_json(key)))

    atomic_write(path, write)
    return path, False


def real_statistics(metric) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, n) of the real features, float64, from torchmetrics' accumulators."""
    n = int(metric.real_features_num_samples)
    total = metric.real_features_sum.double().cpu()
    mu = total / n
    sigma = (metric.real_features_cov_sum.double().cpu() - n * torch.outer(mu, mu)) / (n - 1)
    return mu.numpy(), sigma.numpy(), n


def _set_real_statistics(metric, mu: np.ndarray, sigma: np.ndarray, n: int) -> None:
    device = metric.real_features_sum.device
    mu64, sigma64 = torch.from_numpy(mu).double(), torch.from_numpy(sigma).double()
    metric.real_features_sum = (mu64 * n).to(device)
    metric.real_features_cov_sum = (sigma64 * (n - 1) + n * torch.outer(mu64, mu64)).to(device)
    metric.real_features_num_samples = torch.tensor(n, dtype=torch.long, device=device)


def sample_size_warnings(n: int, full_n: int | None = COCO_FULL_N) -> list[str]:
    """The loud warnings for small N (also written into the result JSON)."""
    messages = []
    if full_n is not None and n < full_n:
        messages.append(f"FID with N={n} < {full_n:,} images: FID is biased upward at small N and is comparable only "
                        f"with runs at the same N (recorded as 'n'); the paper's numbers use the full set.")
    if n < NUM_FEATURES:
        messages.append(f"N={n} < {NUM_FEATURES} (the feature dimension): the covariance is rank-deficient "
                        f"(pytorch-fid #13), the value is unstable; use N >= 2048 for numbers you report.")
    for message in messages:
        warnings.warn(message, UserWarning, stacklevel=2)
    return messages


# ---------------------------------------------------------------------------------------------------------------------
# Generation
def generate_fid_images(pipe, prompts: Sequence[str], out_dir: str | os.PathLike, *, seed: int, steps: int,
                        guidance_scale: float, resolution: int, batch_size: int) -> list[Path]:
    """Write `out_dir/{index:05d}.png` per prompt; image i uses seed `seed * 1e6 + i`, so existing files are kept."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{i:05d}.png" for i in range(len(prompts))]
    todo = [i for i, p in enumerate(paths) if not p.is_file()]
    with tqdm(total=len(paths), initial=len(paths) - len(todo), desc="generating", unit="img") as bar:
        for start in range(0, len(todo), batch_size):
            index = todo[start:start + batch_size]
            # CPU generators: the same image for a given index on any device and in any batch
            generators = [torch.Generator("cpu").manual_seed(seed * 1_000_000 + i) for i in index]
            with torch.no_grad():
                images = pipe(prompt=[prompts[i] for i in index], num_inference_steps=steps,
                              guidance_scale=guidance_scale, height=resolution, width=resolution,
                              generator=generators, output_type="pil").images
            for i, image in zip(index, images):
                # atomic: a killed run never leaves a half-written PNG that the resume would skip
                atomic_write(paths[i], lambda tmp: image.save(tmp, format="PNG"))  # noqa: B023
            bar.update(len(index))
    return paths


def _check_generation_record(out: Path, record: dict) -> None:
    """Refuse to resume into a fake/ folder written with other generation settings."""
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
    _write_json(path, record)


def _write_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _versions() -> dict:
    import diffusers
    import torchmetrics

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "torchmetrics": torchmetrics.__version__}


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"--{name}: expected a positive integer, got {value!r}")


DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_stats_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "restune_diffusion" / "fid_stats"


def fid_pipeline(pretrained_model_name_or_path: str, tuners: str | os.PathLike | None = None, *,
                 scheduler: str = "ddim", mixed_precision: str = "no", device: str = "cpu"):
    """The generating pipeline: SD v1.5 (or "tiny") with the tuner file loaded on its UNet. Returns (pipe, handle)."""
    from .models import build_pipeline, load_model

    sd = load_model(pretrained_model_name_or_path, dtype=DTYPES[mixed_precision], device=device)
    handle = None
    if tuners is not None:
        from .weights import load_tuners

        handle = load_tuners(sd.unet, tuners, device=device)
    return build_pipeline(sd, scheduler=scheduler), handle


def evaluate_coco_fid(pretrained_model_name_or_path: str, coco_dir: str | os.PathLike, output_dir: str | os.PathLike,
                      *, tuners: str | os.PathLike | None = None, split: str = "val", num_samples: int | None = 5000,
                      seed: int = 0, steps: int = 50, guidance_scale: float = 7.5, scheduler: str = "ddim",
                      resolution: int = 512, batch_size: int = 8, inception_weights: str | os.PathLike | None = None,
                      stats_cache_dir: str | os.PathLike | None = None, device: str = "cpu",
                      mixed_precision: str = "no", keep_images: bool = True) -> dict:
    """The paper's SD v1.5 / COCO2017 FID of the base model (tuners=None) or a tuned one; writes output_dir/fid.json."""
    started = time.perf_counter()
    for name, value in (("num_samples", num_samples if num_samples is not None else 1), ("steps", steps),
                        ("resolution", resolution), ("batch_size", batch_size)):
        _positive(name, value)
    if resolution % 8:
        raise ValueError(f"--resolution: expected a multiple of 8 (the VAE's downsampling), got {resolution}")
    if mixed_precision not in DTYPES:
        raise ValueError(f"--mixed_precision: expected one of {sorted(DTYPES)}, got {mixed_precision!r}")
    if tuners is not None and not Path(tuners).is_file():
        raise FileNotFoundError(f"--tuners {tuners}: no such file (expected a tuner .safetensors file)")
    weights = resolve_inception_weights(inception_weights)
    pairs = coco_caption_pairs(coco_dir, split, num_samples, seed)
    n = len(pairs)
    messages = sample_size_warnings(n, COCO_FULL_N if split == "val" else None)
    out = Path(output_dir)

    inception_sha = file_sha256(weights)
    metric = fid_metric(load_fid_inception(weights, device=device))
    key = {"protocol": PROTOCOL_VERSION, "coco_dir": str(Path(coco_dir).resolve()), "split": split, "n": n,
           "seed": seed, "resolution": resolution, "inception_sha256": inception_sha}
    cache_dir = default_stats_cache_dir() if stats_cache_dir is None else Path(stats_cache_dir)
    cache, reused = cached_real_statistics(metric, key, cache_dir, lambda: extract(
        metric, [p for p, _ in pairs], partial(inception_image, resolution=resolution), real=True,
        batch_size=batch_size, desc="FID features (real)"))

    fake_dir = out / "fake"
    tuners_sha = file_sha256(tuners) if tuners is not None else None
    prompts = [caption for _, caption in pairs]
    _check_generation_record(fake_dir, {
        "model": str(pretrained_model_name_or_path), "tuners_sha256": tuners_sha, "seed": seed, "steps": steps,
        "guidance_scale": guidance_scale, "scheduler": scheduler, "resolution": resolution,
        "mixed_precision": mixed_precision,
        "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()})
    pipe, handle = fid_pipeline(pretrained_model_name_or_path, tuners, scheduler=scheduler,
                                mixed_precision=mixed_precision, device=device)
    paths = generate_fid_images(pipe, prompts, fake_dir, seed=seed, steps=steps, guidance_scale=guidance_scale,
                                resolution=resolution, batch_size=batch_size)
    del pipe, handle
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    extract(metric, paths, inception_image, real=False, batch_size=batch_size, desc="FID features (fake)")
    fid = fid_value(metric)
    if not keep_images:
        shutil.rmtree(fake_dir)
    result = {
        "fid": fid, "n": n, "mode": "coco", "split": split, "coco_dir": str(coco_dir), "seed": seed, "steps": steps,
        "guidance_scale": guidance_scale, "scheduler": scheduler, "resolution": resolution,
        "model": str(pretrained_model_name_or_path), "tuners": str(tuners) if tuners is not None else None,
        "tuners_sha256": tuners_sha, "inception_weights": str(weights), "inception_sha256": inception_sha,
        "batch_size": batch_size, "device": str(device), "mixed_precision": mixed_precision,
        "real_stats_cache": str(cache) if cache else None, "real_stats_reused": reused,
        "fake_dir": str(fake_dir) if keep_images else None, "elapsed_s": round(time.perf_counter() - started, 3),
        "warnings": messages, "versions": _versions(), "protocol_version": PROTOCOL_VERSION,
        "protocol": PROTOCOL.format(split=f"{split}2017"),
    }
    _write_json(out / "fid.json", result)
    return result


def list_images(folder: str | os.PathLike, flag: str) -> list[Path]:
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{flag} {root}: not a folder")
    paths = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(paths) < 2:
        raise ValueError(f"{flag} {root}: found {len(paths)} images ({'/'.join(IMAGE_SUFFIXES)}); FID needs at least 2")
    return paths


def compute_fid_folders(real_dir: str | os.PathLike, fake_dir: str | os.PathLike, *,
                        inception_weights: str | os.PathLike | None = None, batch_size: int = 8, device: str = "cpu",
                        stats_cache_dir: str | os.PathLike | None = None,
                        output_dir: str | os.PathLike | None = None) -> dict:
    """FID between two image folders (same crop + bicubic 299 path for both); writes output_dir/fid.json if given."""
    started = time.perf_counter()
    _positive("batch_size", batch_size)
    weights = resolve_inception_weights(inception_weights)
    real, fake = list_images(real_dir, "--real_dir"), list_images(fake_dir, "--fake_dir")
    messages = sample_size_warnings(min(len(real), len(fake)), full_n=None)
    if len(real) != len(fake):
        messages.append(f"N differs between the folders ({len(real)} real vs {len(fake)} fake)")
        warnings.warn(messages[-1], UserWarning, stacklevel=2)

    inception_sha = file_sha256(weights)
    metric = fid_metric(load_fid_inception(weights, device=device))
    listing = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in real]
    key = {"protocol": PROTOCOL_VERSION, "real_dir": str(Path(real_dir).resolve()), "n": len(real),
           "files_sha256": hashlib.sha256(json.dumps(listing).encode()).hexdigest(), "inception_sha256": inception_sha}
    cache, reused = cached_real_statistics(metric, key, stats_cache_dir, lambda: extract(
        metric, real, inception_image, real=True, batch_size=batch_size, desc="FID features (real)"))
    extract(metric, fake, inception_image, real=False, batch_size=batch_size, desc="FID features (fake)")
    result = {
        "fid": fid_value(metric), "n": len(fake), "n_real": len(real), "n_fake": len(fake), "mode": "folders",
        "real_dir": str(real_dir), "fake_dir": str(fake_dir), "inception_weights": str(weights),
        "inception_sha256": inception_sha, "batch_size": batch_size, "device": str(device),
        "real_stats_cache": str(cache) if cache else None, "real_stats_reused": reused,
        "elapsed_s": round(time.perf_counter() - started, 3), "warnings": messages, "versions": _versions(),
        "protocol_version": PROTOCOL_VERSION, "protocol": FOLDER_PROTOCOL,
    }
    if output_dir is not None:
        _write_json(Path(output_dir) / "fid.json", result)
    return result
