"""FID from features: the Frechet distance of two feature sets' float64 Gaussians (torchmetrics' statistics).

One implementation for every feature space: Inception pool3 (COCO, image folders) and the tiny world's judge features
(its domain FID, also in its bootstrap intervals). N >= D: torchmetrics' formula on float64 statistics
(`frechet_distance`; a test holds it to torchmetrics' FrechetInceptionDistance fed the same features:
tests/torchmetrics_bridge.py); N < D: the same number from an N_r x N_f eigenproblem (`low_rank_fid`). TF32 is off while
features are extracted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .metric import Metric


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


@dataclass(frozen=True)
class Gaussian:
    """A feature set's float64 mean and covariance (N - 1), with the features: computed once for a set compared many
    times (the tiny world's reference in its bootstrap intervals)."""

    features: np.ndarray
    mean: np.ndarray
    cov: np.ndarray

    @classmethod
    def of(cls, features: np.ndarray | Gaussian) -> Gaussian:
        if isinstance(features, Gaussian):
            return features
        x = np.asarray(features, dtype=np.float64)
        return cls(x, x.mean(0), np.cov(x, rowvar=False))


def frechet_distance(a: Gaussian, b: Gaussian) -> float:
    """||mu_a - mu_b||^2 + tr S_a + tr S_b - 2 sum sqrt(eig(S_a S_b)): torchmetrics' formula, in numpy float64."""
    root_trace = np.sqrt(np.linalg.eigvals(a.cov @ b.cov).astype(np.complex128)).real.sum()
    return float(((a.mean - b.mean) ** 2).sum() + np.trace(a.cov) + np.trace(b.cov) - 2 * root_trace)


def fid_from_features(real: np.ndarray | Gaussian, fake: np.ndarray) -> float:
    """FID between two feature sets (N, D): the Frechet distance of their float64 means and covariances (`real` may
    be its `Gaussian`, computed once).

    N >= D: torchmetrics' statistics and formula (`frechet_distance`; equal to its FrechetInceptionDistance fed the
    features, a test checks). N < D: the same number from an N_r x N_f matrix (`low_rank_fid`): a 2048 x 2048
    eigensolve costs ~10 s on one CPU core, which small sets and sweeps of many rows should not pay for a
    rank-deficient product.
    """
    features = real.features if isinstance(real, Gaussian) else real
    if min(len(features), len(fake)) < features.shape[1]:
        return low_rank_fid(features, fake)
    return frechet_distance(Gaussian.of(real), Gaussian.of(fake))


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


def _compute(real: np.ndarray, fake: np.ndarray, context: Mapping[str, Any]) -> dict[str, float]:
    return {"fid": fid_from_features(real, fake)}


FID = Metric("fid", "features", _compute)
