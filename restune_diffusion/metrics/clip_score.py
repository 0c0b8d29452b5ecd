"""CLIP score (Hessel et al. 2021, as torchmetrics defines it): the mean over generated images of each image's score
against its prompt (the scores themselves come from evaluation/clip_score.py's CLIPScorer)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .metric import Metric


def _compute(real: None, fake: np.ndarray | None, context: Mapping[str, Any]) -> dict[str, float | None]:
    return {"clip_score": float(np.mean(fake)) if fake is not None else None}  # None: no CLIP model given


CLIP_SCORE = Metric("clip_score", "clip_scores", _compute)
