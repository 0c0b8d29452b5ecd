"""Metrics, one file each, and the ONE list of them (issue 24: evaluation as protocols x metrics).

Every protocol (COCO captions and image folders in evaluation/, the tiny world in world/) gets every metric below on
every input it collects of the kind the metric consumes (metric.py lists the kinds), through `measure`. Adding a
metric: its file here (a `Metric(name, consumes, compute)`) and its line in METRICS; it then appears in the rows of
eval.json, eval_fid.py's folder mode and the tiny world's evaluation alike.

Below evaluation/ and world/ (layer 1): both import it, neither imports the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import accuracy, clip_score, fid, kid
from .metric import KINDS, Metric, Source
from .protocol import Protocol

METRICS: dict[str, Metric] = {m.name: m for m in (
    fid.FID,  # Frechet distance of feature Gaussians
    kid.KID,  # unbiased polynomial-kernel MMD^2 over subsets
    clip_score.CLIP_SCORE,  # mean CLIP score of generated images against their prompts
    accuracy.ACCURACY,  # the judge's checks: fraction right
)}


def measure(sources: Mapping[str, Source], real: Mapping[str, Any], fake: Mapping[str, Any],
            context: Mapping[str, Any]) -> dict[str, Any]:
    """Every registered metric on every source of the kind it consumes -> {source prefix + field: value}, in source
    then registry order. real/fake: each source's real side (absent: none) and generated side."""
    row: dict[str, Any] = {}
    for name, source in sources.items():
        for metric in METRICS.values():
            if metric.consumes == source.kind:
                fields = metric.compute(real.get(name), fake[name], context)
                row.update({source.prefix + field: value for field, value in fields.items()})
    return row


__all__ = ["KINDS", "METRICS", "Metric", "Protocol", "Source", "measure"]
