"""FID and KID from extracted features (torchmetrics' statistics), feature extraction, and the real-features cache.

Features are extracted once per image (float32, as the network gives them) and kept in index order; the statistics
are computed from them on one process, in a fixed order and batching, so the result does not depend on how many
processes extracted them. torchmetrics accumulates in float64 (PITFALLS "FID"); TF32 is off throughout.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..files import atomic_write
from .inception import NUM_FEATURES, tf32_disabled

COCO_FULL_N = 5000
STAT_BATCH = 256  # rows per torchmetrics update when features are fed back: fixed, so results never depend on it


class FeatureInput(nn.Module):
    """The identity, as torchmetrics' `feature` network: the metric is fed features already extracted. (B, D)."""

    def __init__(self, num_features: int = NUM_FEATURES):
        super().__init__()
        self.num_features = num_features  # read by torchmetrics instead of probing with a dummy image

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fid_metric(extractor: nn.Module):
    """torchmetrics' FID over an extractor (ours, or FeatureInput); its accumulators are float64."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    device = next(iter(extractor.parameters()), torch.empty(0)).device
    # normalize=False: images go to the extractor as given (uint8 0..255); reset() keeps the real statistics;
    # sync_on_compute=False: the statistics are computed on the main process alone, from gathered features
    metric = FrechetInceptionDistance(feature=extractor, normalize=False, reset_real_features=False,
                                      sync_on_compute=False)
    return metric.to(device)


def fid_value(metric) -> float:
    with tf32_disabled():
        return float(metric.compute())


def _feed(metric, features: np.ndarray, real: bool) -> None:
    for lo in range(0, len(features), STAT_BATCH):
        metric.update(torch.from_numpy(np.ascontiguousarray(features[lo:lo + STAT_BATCH])), real=real)


def fid_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    """FID between two feature sets (N, D): the Frechet distance of their float64 means and covariances.

    N >= D: torchmetrics (eigenvalues of the D x D product S_r S_f). N < D: the same number from an N_r x N_f
    matrix (`low_rank_fid`): a 2048 x 2048 eigensolve costs ~10 s on one CPU core, which small sets and sweeps of
    many rows should not pay for a rank-deficient product.
    """
    if min(len(real), len(fake)) < real.shape[1]:
        return low_rank_fid(real, fake)
    metric = fid_metric(FeatureInput(real.shape[1]))
    _feed(metric, real, True)
    _feed(metric, fake, False)
    return fid_value(metric)


def low_rank_fid(real: np.ndarray, fake: np.ndarray) -> float:
    """||mu_r - mu_f||^2 + tr S_r + tr S_f - 2 tr sqrtm(S_r S_f), with S = A^T A, A = centred features / sqrt(n - 1).

    S_r S_f = A_r^T (M A_f) with M = A_r A_f^T (N_r x N_f), so its non-zero eigenvalues are those of M M^T
    (XY and YX share them), which is symmetric PSD: tr sqrtm(S_r S_f) = sum sqrt(eigvalsh(M M^T)).
    """
    r, f = real.astype(np.float64), fake.astype(np.float64)
    mu_r, mu_f = r.mean(0), f.mean(0)
    a_r, a_f = (r - mu_r) / np.sqrt(len(r) - 1), (f - mu_f) / np.sqrt(len(f) - 1)
    m = a_r @ a_f.T  # (N_r, N_f)
    root_trace = np.sqrt(np.clip(np.linalg.eigvalsh(m @ m.T), 0, None)).sum()
    return float(((mu_r - mu_f) ** 2).sum() + (a_r**2).sum() + (a_f**2).sum() - 2 * root_trace)


def kid_from_features(real: np.ndarray, fake: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                      seed: int = 0) -> tuple[float, float, int]:
    """KID (torchmetrics: polynomial-kernel MMD^2 over random subsets, mean and std) -> (mean, std, subset_size).

    Unbiased at small N where FID is not. The subset size is min(subset_size, N real, N fake); the subsets are drawn
    from a torch generator seeded with `seed`, so the value repeats.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise ValueError(f"KID needs at least 2 real and 2 fake images, got {len(real)} and {len(fake)}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=FeatureInput(real.shape[1]), subsets=subsets, subset_size=size,
                                          sync_on_compute=False)
    _feed(metric, real, True)
    _feed(metric, fake, False)
    with torch.random.fork_rng(devices=[]), tf32_disabled():
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std), size


def sample_size_warnings(n: int, full_n: int | None = COCO_FULL_N) -> list[str]:
    """The loud warnings for small N (also written into the results)."""
    messages = []
    if full_n is not None and n < full_n:
        messages.append(f"FID with N={n} < {full_n:,} images: FID is biased upward at small N and is comparable only "
                        f"with runs at the same N (recorded as 'n'); the paper's numbers use the full set. KID is "
                        f"unbiased: prefer it for small sets.")
    if n < NUM_FEATURES:
        messages.append(f"N={n} < {NUM_FEATURES} (the feature dimension): the covariance is rank-deficient "
                        f"(pytorch-fid #13), the value is unstable; use N >= 2048 for numbers you report.")
    for message in messages:
        warnings.warn(message, UserWarning, stacklevel=2)
    return messages


# ---------------------------------------------------------------------------------------------------------------------
# extraction
def extract_features(extractor: nn.Module, items: Sequence, prepare: Callable[[object], Image.Image],
                     batch_size: int, skip_bad_images: bool = False) -> tuple[np.ndarray, list[int]]:
    """(len(items), D) float32 features of `prepare(item)` (a 299x299 PIL image), and the rows skipped.

    An unreadable item raises its named error, or with skip_bad_images is counted and its row left NaN.
    """
    device = next(extractor.parameters()).device
    out = np.full((len(items), extractor.num_features), np.nan, dtype=np.float32)
    skipped = []
    with tf32_disabled(), torch.no_grad():
        for lo in range(0, len(items), batch_size):
            rows, pixels = [], []
            for i in range(lo, min(lo + batch_size, len(items))):
                try:
                    pixels.append(np.asarray(prepare(items[i]), dtype=np.uint8))  # (299, 299, 3)
                except ValueError:
                    if not skip_bad_images:
                        raise
                    skipped.append(i)
                    continue
                rows.append(i)
            if rows:
                batch = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).to(device)  # (B, 3, 299, 299)
                out[rows] = extractor(batch).float().cpu().numpy()
    return out, skipped


# ---------------------------------------------------------------------------------------------------------------------
# the real-features cache: an .npz named by a hash of the protocol key, the key inside
def _key_json(key: dict) -> str:
    return json.dumps(key, sort_keys=True)


def features_cache_path(cache_dir: str | os.PathLike, key: dict) -> Path:
    return Path(cache_dir) / f"real_features_{hashlib.sha256(_key_json(key).encode()).hexdigest()[:16]}.npz"


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "restune_diffusion" / "fid_stats"


def load_cached_features(path: Path, key: dict) -> np.ndarray | None:
    """The cached real features for `key`, or None (with a warning) when the file is another key's or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["key"]) != _key_json(key):
                warnings.warn(f"{path}: cached real features were made for another protocol key; recomputing.",
                              stacklevel=2)
                return None
            features = stored["features"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        warnings.warn(f"{path}: unreadable real-features cache ({type(err).__name__}: {err}); recomputing.",
                      stacklevel=2)
        return None
    if features.ndim != 2 or not np.isfinite(features).all():
        warnings.warn(f"{path}: cached real features of shape {features.shape} hold non-finite values or are not "
                      f"(N, D); recomputing.", stacklevel=2)
        return None
    return features


def save_cached_features(path: Path, key: dict, features: np.ndarray) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare temp name
            np.savez(f, features=features, key=np.array(_key_json(key)))

    return atomic_write(path, write)
