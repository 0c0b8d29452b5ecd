"""KID from features: the unbiased polynomial-kernel MMD^2 of torchmetrics' KernelInceptionDistance, in float64.

One implementation for every feature space: over random subsets for COCO and image folders (`kid_from_features`,
subsets drawn as torchmetrics draws them), over the whole sets in the tiny world's bootstrap intervals (`mmd2`).
Unbiased at small N where FID is not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .metric import Metric


def mmd2(real: np.ndarray, fake: np.ndarray) -> float:
    """The unbiased MMD^2 of two feature sets (N_r, D), (N_f, D) with torchmetrics' kernel (x.y / D + 1)^3, float64;
    the sets may differ in size."""
    r, f = real.astype(np.float64), fake.astype(np.float64)
    d, m, n = r.shape[1], len(r), len(f)
    k_rr, k_ff, k_rf = ((r @ r.T) / d + 1) ** 3, ((f @ f.T) / d + 1) ** 3, ((r @ f.T) / d + 1) ** 3
    return float((k_rr.sum() - np.trace(k_rr)) / (m * (m - 1)) + (k_ff.sum() - np.trace(k_ff)) / (n * (n - 1))
                 - 2 * k_rf.mean())


def kid_from_features(real: np.ndarray, fake: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                      seed: int = 0) -> tuple[float, float, int]:
    """KID -> (mean, std, subset_size): `mmd2` over `subsets` random subsets of each side, as torchmetrics computes
    it (population std). The subset size is min(subset_size, N real, N fake); the subsets are torch.randperm draws
    from a generator seeded with `seed` (torchmetrics' draws under torch.manual_seed(seed)), so the value repeats."""
    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise ValueError(f"KID needs at least 2 real and 2 fake images, got {len(real)} and {len(fake)}")
    if not isinstance(subsets, int) or subsets < 1:
        raise ValueError(f"--kid_subsets: expected a positive integer, got {subsets!r}")
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        r = real[torch.randperm(len(real), generator=generator)[:size].numpy()]
        f = fake[torch.randperm(len(fake), generator=generator)[:size].numpy()]
        values.append(mmd2(r, f))
    return float(np.mean(values)), float(np.std(values)), size


def _compute(real: np.ndarray, fake: np.ndarray, context: Mapping[str, Any]) -> dict[str, float | int]:
    mean, std, size = kid_from_features(real, fake, context.get("kid_subsets", 100),
                                        context.get("kid_subset_size", 1000), context.get("seed", 0))
    return {"kid_mean": mean, "kid_std": std, "kid_subset_size": size}


KID = Metric("kid", "features", _compute)
