"""Feature extraction, the loud small-N warnings, and the real-features cache.

Features are extracted once per image (float32, as the network gives them) and kept in index order; the statistics
(restune_diffusion.metrics: FID, KID) are computed from them on one process, in a fixed order and batching, so the
result does not depend on how many processes extracted them. TF32 is off throughout.
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
from ..metrics.fid import tf32_disabled
from .inception import NUM_FEATURES

COCO_FULL_N = 5000


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
