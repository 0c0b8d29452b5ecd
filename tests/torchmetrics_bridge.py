"""torchmetrics' FID and KID fed features we extracted: the independent reference our float64 statistics
(restune_diffusion.metrics.fid / kid) are held to. Test-only: the package computes its numbers without torchmetrics."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from restune_diffusion.metrics.fid import tf32_disabled

STAT_BATCH = 256  # rows per torchmetrics update when features are fed back: fixed, so results never depend on it


class FeatureInput(nn.Module):
    """The identity, as torchmetrics' `feature` network: the metric is fed features already extracted. (B, D)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features  # read by torchmetrics instead of probing with a dummy image

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fid_metric(extractor: nn.Module):
    """torchmetrics' FID over an extractor (ours, or FeatureInput); its accumulators are float64."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    device = next(iter(extractor.parameters()), torch.empty(0)).device
    # normalize=False: images go to the extractor as given (uint8 0..255); reset() keeps the real statistics
    metric = FrechetInceptionDistance(feature=extractor, normalize=False, reset_real_features=False,
                                      sync_on_compute=False)
    return metric.to(device)


def fid_value(metric) -> float:
    with tf32_disabled():
        return float(metric.compute())


def feed(metric, features: np.ndarray, real: bool) -> None:
    """(N, D) features into a torchmetrics FID/KID, STAT_BATCH rows at a time."""
    for lo in range(0, len(features), STAT_BATCH):
        metric.update(torch.from_numpy(np.ascontiguousarray(features[lo:lo + STAT_BATCH])), real=real)
