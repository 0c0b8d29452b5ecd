"""What a metric is, and what it consumes (issue 24: evaluation as protocols x metrics).

A protocol (COCO captions, image folders, the tiny world) collects, from the images of one model at one guidance
scale, inputs of a few kinds; a metric names the kind it consumes and turns the real and generated sides of one such
input into fields of a result row. The kinds:

- "features": (N, D) float features of a feature network, real and generated (Inception pool3 for COCO and image
  folders; the tiny world's judge's penultimate layer: its "domain" features);
- "clip_scores": (N,) CLIP score of each generated image against its prompt (no real side; None: no CLIP model);
- "hits": {check: (N,) bool} per generated image, whether the judge saw what its prompt asked (no real side).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

KINDS = ("features", "clip_scores", "hits")

Compute = Callable[[Any, Any, Mapping[str, Any]], dict[str, Any]]  # (real, generated, context) -> row fields


@dataclass(frozen=True)
class Metric:
    """name: the registry key (and its fields' stem); consumes: one of KINDS; compute(real, fake, context) -> the
    fields it adds to a row. context: the protocol's parameters (seed, KID's subsets, ...), read with defaults."""

    name: str
    consumes: str
    compute: Compute

    def __post_init__(self):
        if self.consumes not in KINDS:
            raise ValueError(f"metric {self.name!r}: consumes must be one of {KINDS}, got {self.consumes!r}")


@dataclass(frozen=True)
class Source:
    """One input a protocol collects: its kind, and the prefix of the fields its metrics write ("domain_" makes the
    tiny world's FID on judge features `domain_fid`)."""

    kind: str
    prefix: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"source kind: expected one of {KINDS}, got {self.kind!r}")
