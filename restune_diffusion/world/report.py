"""Scoring a model in the tiny world, and the default job's before/after report (issues 14, 23).

`measure` generates the protocol's images for a model (a concept's prompts, the pretraining prompts, the held-out
combinations) and keeps, per image, what the judge saw: the unit every table, interval and test is built from.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..files import atomic_write, atomic_write_text
from ..models import TINY, TINY_ASSETS, load_model
from ..sampling import make_grid
from ..weights import load_tuners
from . import protocol
from .datasets import CONCEPT
from .judge import CHECK_FILE, JUDGE_FILE, JudgeNet, load_judge
from .scene import CONCEPTS, heldout_combo_grid, kept_grid, prompt_grid

JUDGE_FOLDER = TINY_ASSETS / "judge"


def judge_folder(pretrained_model_name_or_path: str = TINY) -> Path:
    """The judges beside a base made by tools/pretrain_tiny.py (its judge/ folder), else the shipped ones."""
    own = Path(pretrained_model_name_or_path) / "judge"
    return own if pretrained_model_name_or_path != TINY and own.is_dir() else JUDGE_FOLDER


def load_judges(pretrained_model_name_or_path: str = TINY) -> tuple[JudgeNet, JudgeNet]:
    """(the judge, the independent check) of a world."""
    folder = judge_folder(pretrained_model_name_or_path)
    return load_judge(folder / JUDGE_FILE), load_judge(folder / CHECK_FILE)


@dataclass
class Measurement:
    """What the judge saw in each generated image of one model, per prompt set (arrays aligned with the prompts)."""

    sets: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def accuracy(self, name: str, head: str = "all") -> float:
        return float(self.sets[name][head].mean())

    def save(self, path: str | os.PathLike) -> Path:
        """One .npz (no pickle): per set and key, the per-image array (features as float16)."""
        arrays = {f"{name}/{k}": (v.astype(np.float16) if k == "features" else v)
                  for name, h in self.sets.items() for k, v in h.items()}

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **arrays)

        return atomic_write(path, write)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Measurement:
        sets: dict[str, dict[str, np.ndarray]] = {}
        with np.load(path, allow_pickle=False) as data:
            for key in data.files:
                name, _, k = key.rpartition("/")
                sets.setdefault(name, {})[k] = data[key].astype(np.float32) if k == "features" else data[key]
        return cls(sets)


def prompt_sets(concepts: tuple[str, ...], concept_repeats: int, kept_repeats: int,
                combo_repeats: int) -> dict[str, list]:
    sets = {f"concept:{c}": prompt_grid((c,), concept_repeats) for c in concepts}
    if kept_repeats:
        sets["kept"] = kept_grid(kept_repeats)
    if combo_repeats:
        sets["heldout_combos"] = heldout_combo_grid(combo_repeats)
    return sets


def measure(sd, judge: JudgeNet, sets: dict[str, list], seed: int = 0, check: JudgeNet | None = None,
            keep_images: bool = False) -> tuple[Measurement, dict[str, torch.Tensor]]:
    """Generate every prompt set (image i of a set from noise seed image_seed(seed, i)) and judge it; with `check`,
    the independent judge's shape verdicts too (as 'check_shape', and 'agree')."""
    result, images = Measurement(), {}
    for name, asked in sets.items():
        generated = protocol.generate(sd, [a.caption for a in asked], seed=seed)
        h = protocol.hits(judge, generated, asked)
        if check is not None:
            c = protocol.hits(check, generated, asked)
            h["check_shape"], h["agree"] = c["shape"], c["seen"] == h["seen"]
        result.sets[name] = h
        if keep_images:
            images[name] = generated
    return result, images


# ---------------------------------------------------------------------------------------------------------------------
# the default job's report
REPORT_REPEATS = {"concept": 16, "kept": 4, "combos": 8}  # 192 concept images, 120 pretraining, 48 held-out combos


def upscaled_grid(rows: list[torch.Tensor], scale: int = 2) -> Image.Image:
    """uint8 image rows (each (N, 3, H, W)) as one picture, every image enlarged `scale` x with nearest pixels."""
    images = [Image.fromarray(im.permute(1, 2, 0).numpy()).resize((im.shape[-1] * scale,) * 2, Image.NEAREST)
              for row in rows for im in row]
    return make_grid(images, cols=len(rows[0]))


def summary(m: Measurement, concept: str) -> dict:
    """Accuracies with 95 % intervals (bootstrap over images; one model, one noise seed)."""
    def ci(values):
        point, lo, hi = protocol.bootstrap([[values]], n_boot=1000)
        return {"mean": round(point, 4), "ci95": [round(lo, 4), round(hi, 4)], "n": len(values)}

    c = m.sets[f"concept:{concept}"]
    return {"concept_drawn": ci(c["shape"]), "all_right": ci(c["all"]), "kept": ci(m.sets["kept"]["all"]),
            "heldout_combos": ci(m.sets["heldout_combos"]["all"])}


def before_after_report(output_dir: str | os.PathLike, tuners_path: str | os.PathLike, base: str = TINY,
                        concept: str = CONCEPT, seed: int = 0) -> dict:
    """Base vs tuned on the concept, same prompts and seeds, with the ceiling (real held-out images through the
    autoencoder): `before_after.png` (top row the base, bottom row tuned) and `world_report.json`; prints them."""
    if concept not in CONCEPTS:
        raise ValueError(f"concept: expected one of {CONCEPTS}, got {concept!r}")
    out = Path(output_dir)
    sd = load_model(base)
    judge, _ = load_judges(base)
    sets = prompt_sets((concept,), REPORT_REPEATS["concept"], REPORT_REPEATS["kept"], REPORT_REPEATS["combos"])
    before, before_images = measure(sd, judge, sets, seed, keep_images=True)
    load_tuners(sd.unet, tuners_path)
    after, after_images = measure(sd, judge, sets, seed, keep_images=True)
    asked = sets[f"concept:{concept}"]
    top = protocol.ceiling(judge, sd.vae, concept, asked)
    n = len(prompt_grid((concept,)))
    key = f"concept:{concept}"
    grid = upscaled_grid([before_images[key][:n], after_images[key][:n]])
    atomic_write(out / "before_after.png", lambda tmp: grid.save(tmp, format="PNG"))
    ceiling = {"concept_drawn": round(float(top.hits["shape"].mean()), 4),
               "all_right": round(float(top.hits["all"].mean()), 4)}
    report = {"base": base, "tuners": str(tuners_path), "concept": concept, "seed": seed,
              "judge": str(judge_folder(base) / JUDGE_FILE), "sampling": {"steps": protocol.SAMPLING_STEPS,
                                                                         "guidance_scale": protocol.GUIDANCE_SCALE},
              "before": summary(before, concept), "after": summary(after, concept), "ceiling": ceiling,
              "grid": "before_after.png: top row the base, bottom row tuned; prompts " +
                      "; ".join(a.caption for a in asked[:n])}
    atomic_write_text(out / "world_report.json", json.dumps(report, indent=1))
    print(report_text(report))
    return report


def report_text(report: dict) -> str:
    def cell(m):
        return f"{m['mean']:.3f} [{m['ci95'][0]:.2f}, {m['ci95'][1]:.2f}]"

    n = report["before"]["concept_drawn"]["n"]
    rows = [f"held-out concept '{report['concept']}' ({n} images, same prompts and seeds; 95 % intervals; ceiling = "
            f"real images through the autoencoder):",
            f"{'':8}{'concept drawn':>22}{'all right':>22}{'pretraining prompts':>24}{'held-out combos':>22}"]
    for name in ("before", "after"):
        m = report[name]
        rows.append(f"{name:8}{cell(m['concept_drawn']):>22}{cell(m['all_right']):>22}{cell(m['kept']):>24}"
                    f"{cell(m['heldout_combos']):>22}")
    c = report["ceiling"]
    rows.append(f"{'ceiling':8}{c['concept_drawn']:>22.3f}{c['all_right']:>22.3f}")
    return "\n".join(rows)
