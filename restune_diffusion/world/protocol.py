"""The tiny world's measuring protocol: which prompts, which noise seeds, which judge, and the statistics (issue 23).

Every number states its judge, N, noise seeds and a 95 % interval, beside its ceiling (real held-out images of the
concept through the autoencoder: what a perfect generator would score) and floor (the untuned base).

- **concept drawn**: the judge names the asked shape; **all right**: shape, colour and background all as asked.
- **domain FID / KID**: the judge's penultimate features of generated images against real held-out renders of the
  same prompts, N images each side: `frechet` and `kid` are restune_diffusion.metrics' FID (torchmetrics' float64
  statistics) and KID's unbiased MMD^2 (over the whole sets), the implementations every protocol uses.
- **kept**: all-right accuracy on the pretraining prompts (what tuning may forget); **held-out combinations**:
  all-right accuracy on colour x shape x background triples the base never saw (prompt following, not lookup).
- **intervals**: a bootstrap over the clusters of a measurement (training seeds, then images within a seed); a
  difference between two rows is called significant when the 95 % interval of the paired difference excludes 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..metrics.fid import fid_from_features as frechet  # noqa: F401  (the world's FID: evaluation's, one implementation)
from ..metrics.kid import mmd2 as kid  # noqa: F401  (KID over the whole sets: the registry KID's MMD^2)
from ..models import build_pipeline
from ..sampling import PROTOCOL_STRIDE, SamplingSettings
from ..sampling import generate as sample_images
from .judge import HEADS, SHAPE_CLASSES, JudgeNet, predict, round_trip
from .scene import (
    CONCEPTS,
    Attributes,
    concept_examples,
    heldout_combo_grid,
    kept_grid,
    prompt_grid,
    render_batch,
)

SAMPLING_STEPS, GUIDANCE_SCALE = 20, 4.0  # DDIM steps and classifier-free guidance of every world measurement
PROTOCOL_VERSION = "world-v2"  # what generate() does; cached generations are keyed by it
BATCH = 128


def settings(seed: int = 0, steps: int = SAMPLING_STEPS, guidance_scale: float = GUIDANCE_SCALE,
             batch_size: int = BATCH) -> SamplingSettings:
    """The world's sampling: DDIM, image i of a measurement from seed·10⁶ + i."""
    return SamplingSettings(scheduler="ddim", steps=steps, guidance_scale=guidance_scale, seed=seed,
                            seed_stride=PROTOCOL_STRIDE, batch_size=batch_size)


@torch.no_grad()
def generate(sd, prompts: Sequence[str], seed: int = 0, steps: int = SAMPLING_STEPS,
             guidance_scale: float = GUIDANCE_SCALE, batch_size: int = BATCH, first_index: int = 0) -> torch.Tensor:
    """uint8 (N, 3, 32, 32) images, image i from the noise of seed·10⁶ + first_index + i (any batch size)."""
    pipe = build_pipeline(sd)
    images = sample_images(pipe, list(prompts), settings(seed, steps, guidance_scale, batch_size),
                           start=first_index, output_type="np")[0]  # (N, H, W, 3) floats in [0, 1]
    return torch.from_numpy((images * 255).round().astype(np.uint8)).permute(0, 3, 1, 2)


def hits(judge: JudgeNet, images: torch.Tensor, asked: Sequence[Attributes]) -> dict[str, np.ndarray]:
    """Per image: did the judge see the asked shape / colour / background / all three? (N,) bool each, plus the
    judge's features (N, D) under 'features' and its shape names under 'seen'."""
    if len(images) != len(asked):
        raise ValueError(f"hits: expected one image per prompt, got {len(images)} images for {len(asked)} prompts")
    pred = predict(judge, images)
    out = {}
    for head, names in HEADS.items():
        want = torch.tensor([names.index(getattr(a, head)) for a in asked])
        out[head] = (pred[head] == want).numpy()
    out["all"] = out["shape"] & out["colour"] & out["background"]
    out["features"] = pred["features"].numpy()
    out["seen"] = np.array([SHAPE_CLASSES[k] for k in pred["shape"].tolist()])
    return out


def accuracy(judge: JudgeNet, images: torch.Tensor, asked: Sequence[Attributes]) -> dict[str, float]:
    """Mean of `hits` per head and for all three."""
    h = hits(judge, images, asked)
    return {k: float(h[k].mean()) for k in ("shape", "colour", "background", "all")}


def quick_eval(sd, judge: JudgeNet, repeats: int = 1, seed: int = 0) -> dict:
    """Accuracy on the pretraining prompts, the held-out combinations and every concept (pretraining progress)."""
    sets = {"kept": kept_grid(repeats), "heldout_combos": heldout_combo_grid(2 * repeats),
            "concepts": prompt_grid(CONCEPTS, repeats)}
    return {name: accuracy(judge, generate(sd, [a.caption for a in asked], seed=seed), asked)
            for name, asked in sets.items()}


# ---------------------------------------------------------------------------------------------------------------------
# the reference sets: real held-out images, and the ceiling (the same through the autoencoder)
def reference_images(concept: str, asked: Sequence[Attributes], split: str = "concept_heldout") -> torch.Tensor:
    """Real renders of the concept for each asked colour x background (poses from the concept's held-out stream)."""
    poses = concept_examples(split, concept, len(asked))
    return render_batch([Attributes(concept, a.colour, a.background, p.size, p.cx, p.cy, p.angle)
                         for a, p in zip(asked, poses)])


@dataclass
class Ceiling:
    """What a perfect generator of the concept scores: real held-out images through the autoencoder."""

    hits: dict[str, np.ndarray]
    images: torch.Tensor


def ceiling(judge: JudgeNet, vae, concept: str, asked: Sequence[Attributes]) -> Ceiling:
    images = round_trip(vae, reference_images(concept, asked), seed=CONCEPTS.index(concept))
    return Ceiling(hits(judge, images, asked), images)


# ---------------------------------------------------------------------------------------------------------------------
# statistics
def _resample(sizes: Sequence[int], rng: np.random.Generator) -> list[tuple[int, np.ndarray]]:
    """One bootstrap draw: clusters with replacement (when there are several), then items within each."""
    picks = rng.integers(len(sizes), size=len(sizes)) if len(sizes) > 1 else [0]
    return [(int(k), rng.integers(sizes[k], size=sizes[k])) for k in picks]


def _mean(_stratum: int, items: np.ndarray) -> float:
    return float(np.mean(items))


def bootstrap(strata: Sequence[Sequence[np.ndarray]], paired_with: Sequence[Sequence[np.ndarray]] | None = None,
              statistic=_mean, n_boot: int = 2000, seed: int = 0, debias: bool = False) -> tuple[float, float, float]:
    """A value and its 95 % interval. The value is the mean over strata (e.g. concepts) of statistic(stratum, pooled
    items of its clusters); a bootstrap draw resamples, within each stratum, clusters (e.g. training seeds) with
    replacement, then the items of each cluster.

    paired_with: the value is a difference, this minus that, where item i of cluster k of stratum s is the same
    prompt and noise in both (the same protocol), so one draw of indices serves both.
    debias: shift the interval by the bootstrap's own bias (mean of the replicates - the value). FID needs it: a
    resample with repeated images has a smaller spread, so its FID is biased upward, and the plain percentile
    interval would not even contain the value.
    """
    rng = np.random.default_rng(seed)
    a = [[np.asarray(c) for c in stratum] for stratum in strata]
    b = [[np.asarray(c) for c in stratum] for stratum in paired_with] if paired_with is not None else None
    if b is not None and [[len(c) for c in s] for s in a] != [[len(c) for c in s] for s in b]:
        raise ValueError("bootstrap: paired sets must have the same strata, clusters and items (one protocol)")

    def value(draws) -> float:
        total = 0.0
        for k, draw in enumerate(draws):
            total += statistic(k, np.concatenate([a[k][c][idx] for c, idx in draw]))
            if b is not None:
                total -= statistic(k, np.concatenate([b[k][c][idx] for c, idx in draw]))
        return total / len(a)

    point = value([[(c, np.arange(len(x))) for c, x in enumerate(stratum)] for stratum in a])
    stats = [value([_resample([len(c) for c in stratum], rng) for stratum in a]) for _ in range(n_boot)]
    lo, hi = np.percentile(stats, [2.5, 97.5]) - (np.mean(stats) - point if debias else 0.0)
    return point, float(lo), float(hi)
