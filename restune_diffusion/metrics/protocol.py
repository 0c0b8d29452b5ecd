"""What a measuring protocol hands to the evaluation's loop (evaluation/sweep.py), as plain data (issue 24).

The loop runs a protocol for every model x guidance scale: it generates each prompt set by image index (image i from
seed * 1e6 + i, resumable, split over processes), gives the image paths to `collect`, and computes every registered
metric on every collected input of the kind it consumes (restune_diffusion.metrics.measure). COCO's protocol is built
in evaluation/runner.py, the tiny world's in world/evaluation.py; neither imports the other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .metric import Source


@dataclass
class Protocol:
    """prompt_sets: folder under <model>/cfg<scale>/ ("" = that folder) -> prompts; the first set is the one measured
    (its size is the result's N). sources: name -> Source (kind, field prefix) of what `collect` returns; real: the
    real side of each source (what the metrics compare against; absent: none). collect(process state, {set: image
    paths}) -> {source: generated side}, on the main process (the others may return anything). record: what the images
    depend on besides the model, tuners and sampling (checked when a run resumes into a folder). context: the metrics'
    parameters. info: the protocol's fields of eval.json. warnings: said once by the main process and kept in
    eval.json. report(result, output folder): writes eval.json and the protocol's tables and plots."""

    prompt_sets: dict[str, list[str]]
    resolution: int
    sources: dict[str, Source]
    real: dict[str, Any]
    collect: Callable[[Any, dict[str, list[Path]]], dict[str, Any]]
    report: Callable[[dict, Path], None]
    record: dict[str, Any] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
