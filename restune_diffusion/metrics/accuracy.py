"""Prompt accuracy: per check of the judge (the tiny world: shape, colour, background, and all three), the fraction
of generated images in which the judge saw what the prompt asked."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .metric import Metric


def _compute(real: None, fake: Mapping[str, np.ndarray], context: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    return {"accuracy": {k: float(v.mean()) for k, v in fake.items() if v.dtype == bool}}  # boolean arrays only


ACCURACY = Metric("accuracy", "hits", _compute)
