"""The evaluation runner: models x guidance scales on one caption draw -> eval.json, eval.md, fid_vs_clip.png
(+ fid_vs_step.png in per-checkpoint mode).

Every model (the base and each tuner file, or each checkpoint of a run) is measured on the same captions, seeds and
real features (extracted once, cached). Generation and feature extraction are split over processes by image index
(`accelerate launch` / `torchrun`); the statistics are computed once, on the main process, from the gathered
features in index order, so N processes give the numbers one process gives.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..files import atomic_write_text
from ..generate import task_names
from ..models import TINY_NAMES, build_pipeline, load_model, native_resolution
from ..samplers import make_scheduler, sampler_key
from ..sampling import DEFAULT_GUIDANCE, PROTOCOL_STRIDE, SamplingSettings, batches
from ..weights import load_tuners
from . import coco
from .clip_score import CLIPScorer, resolve_clip_folder
from .images import check_generation_record, generate_by_index, list_images
from .inception import (
    file_sha256,
    inception_image,
    load_fid_inception,
    resolve_inception_weights,
    weights_hash_warning,
)
from .metrics import (
    COCO_FULL_N,
    default_cache_dir,
    extract_features,
    features_cache_path,
    fid_from_features,
    kid_from_features,
    load_cached_features,
    sample_size_warnings,
    save_cached_features,
)
from .plots import plot_sweep, plot_vs_step

TUNERS_FILE = "tuners.safetensors"  # what a training run and each of its checkpoints hold
TINY_NUM_SAMPLES = 64  # the tiny model's default N: a quick look, not a number to report
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)$")


@dataclass(frozen=True)
class ModelRow:
    name: str
    tuners: Path | None  # None: the untuned base
    step: int | None = None  # a checkpoint's training step


def model_rows(tuners: list[str] | None, base: bool = False) -> list[ModelRow]:
    """--tuners arguments (files, checkpoint folders, globs such as out/run/checkpoint-*) and --base -> rows.

    Checkpoints sort by step. Names: the file stems, or the run/checkpoint folders when stems collide."""
    paths: list[Path] = []
    for arg in tuners or []:
        matches = sorted(glob.glob(arg)) if glob.has_magic(arg) else [arg]
        if not matches:
            raise FileNotFoundError(f"--tuners {arg}: matches no file or folder")
        for match in matches:
            path = Path(match)
            if path.is_dir():
                path = path / TUNERS_FILE
            if not path.is_file():
                raise FileNotFoundError(f"--tuners {match}: expected a tuner .safetensors file or a checkpoint folder "
                                        f"holding {TUNERS_FILE}; not found")
            paths.append(path)

    def step(p: Path) -> int | None:
        found = CHECKPOINT_RE.search(p.parent.name)
        return int(found.group(1)) if found else None

    runs: list[Path] = []
    if paths and all(step(p) is not None for p in paths):  # per-checkpoint mode: rows in training order, run by run
        runs = list(dict.fromkeys(p.parent.parent.resolve() for p in paths))
        paths.sort(key=lambda p: (runs.index(p.parent.parent.resolve()), step(p)))
    if len(paths) == 1:
        names = [paths[0].resolve().parent.name if paths[0].name == TUNERS_FILE else paths[0].stem]
    elif len(runs) > 1:  # checkpoints of several runs: run/checkpoint-N
        names = [f"{p.parent.parent.resolve().name}/{p.parent.name}" for p in paths]
        if len(set(names)) < len(names):
            raise ValueError(f"--tuners: checkpoints of different runs share a run folder name "
                             f"({sorted({str(r) for r in runs})}); evaluate them in separate runs")
    else:
        names = task_names(paths)
    rows = [ModelRow(n, p, step(p)) for n, p in zip(names, paths)]
    if base or not rows:
        if "base" in names:
            raise ValueError("--tuners: a tuner file is named 'base', the name of the --base row; rename it")
        rows.insert(0, ModelRow("base", None))
    return rows


@contextlib.contextmanager
def tuners_on(unet, row: ModelRow, device) -> Iterator[str | None]:
    """Inside: the UNet with `row`'s tuner file loaded (the base row: as it is); yields the file's SHA-256 (None for
    the base). On exit every tensor of the file leaves the UNet, a full fine-tune's weights too (load_tuners/detach),
    so the next row starts from the base."""
    handle = load_tuners(unet, row.tuners, name=f"eval:{row.name}", device=device) if row.tuners else None
    try:
        yield file_sha256(row.tuners) if row.tuners else None
    finally:
        if handle is not None:
            handle.detach()


def process_state(device: str | None):
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu")
    if state.num_processes > 1:
        return state, str(state.device)
    return state, device or ("cuda" if torch.cuda.is_available() else "cpu")


def gather_all(state, payload):
    """[payload of every process] in rank order (a list of one payload without distributed processes)."""
    if state.num_processes == 1:
        return [payload]
    from accelerate.utils import gather_object

    return gather_object([payload])


def sharded_features(state, extractor, items: list, prepare, batch_size: int,
                     skip_bad_images: bool = False) -> tuple[np.ndarray, list[int]]:
    """Features of all items, each process extracting its blocks; every process gets the whole (N, D) array."""
    mine = [i for b in batches(len(items), batch_size, state.process_index, state.num_processes) for i in b]
    features, skipped = extract_features(extractor, [items[i] for i in mine], prepare, batch_size, skip_bad_images)
    out = np.full((len(items), extractor.num_features), np.nan, dtype=np.float32)
    bad: list[int] = []
    for index, part, part_skipped in gather_all(state, (mine, features, skipped)):
        out[index] = part
        bad += [index[j] for j in part_skipped]
    return out, sorted(bad)


def sharded_clip_scores(state, scorer: CLIPScorer, paths: list[Path], captions: list[str],
                        batch_size: int) -> np.ndarray:
    from PIL import Image

    out = np.zeros(len(paths))
    mine = batches(len(paths), batch_size, state.process_index, state.num_processes)
    parts = []
    for block in mine:
        images = []
        for i in block:
            with Image.open(paths[i]) as im:
                images.append(im.convert("RGB"))
        parts.append((list(block), scorer.scores(images, [captions[i] for i in block])))
    for gathered in gather_all(state, parts):
        for index, values in gathered:
            out[index] = values
    return out


def versions() -> dict:
    import accelerate
    import diffusers
    import torchmetrics
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "torchmetrics": torchmetrics.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__}


def _real_features(state, inception, draw: coco.CocoDraw, key: dict, cache_dir: Path, batch_size: int,
                   resolution: int, skip_bad_images: bool) -> tuple[np.ndarray, Path, bool, list[int]]:
    path = features_cache_path(cache_dir, key)
    cached = load_cached_features(path, key)
    if cached is not None:
        return cached, path, True, []
    features, skipped = sharded_features(state, inception, draw.real_images,
                                         partial(inception_image, resolution=resolution), batch_size, skip_bad_images)
    features = np.delete(features, skipped, axis=0)
    if state.is_main_process:
        save_cached_features(path, key, features)
    return features, path, False, skipped


def evaluate(pretrained_model_name_or_path: str, coco_dir: str | os.PathLike, output_dir: str | os.PathLike, *,
             tuners: list[str] | None = None, base: bool = False, guidance_scales: list[float] | None = None,
             num_samples: int | None = None, coco_year: str = "2017", split: str = "val", seed: int = 0,
             steps: int = 50, scheduler: str = "ddim", resolution: int | None = None, batch_size: int = 8,
             inception_weights: str | os.PathLike | None = None, clip_model: str | os.PathLike | None = None,
             stats_cache_dir: str | os.PathLike | None = None, device: str | None = None,
             mixed_precision: str = "no", kid_subsets: int = 100, kid_subset_size: int = 1000,
             skip_bad_images: bool = False, progress: bool = True, revision: str | None = None,
             variant: str | None = None) -> dict | None:
    """Every model x guidance scale on one COCO draw; writes eval.json / eval.md / fid_vs_clip.png (main process).
    `revision`/`variant`: of a hub id in the local Hugging Face cache (models.load_model).

    num_samples None: 5,000 (the val2017 protocol), or 64 for the tiny model; resolution None: the model's native
    size (512 for SD v1.5, 32 for tiny). Returns the eval.json content on the main process, None on the others.
    """
    started = time.perf_counter()
    scales = [float(s) for s in (guidance_scales or [DEFAULT_GUIDANCE])]
    if mixed_precision not in DTYPES:
        raise ValueError(f"--mixed_precision: expected one of {sorted(DTYPES)}, got {mixed_precision!r}")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name}: expected a positive integer, got {value!r}")
    sampler_key(scheduler)  # a bad sampler name fails before anything loads
    rows = model_rows(tuners, base)
    weights = resolve_inception_weights(inception_weights)
    clip_folder = resolve_clip_folder(clip_model)
    state, device = process_state(device)
    tiny = pretrained_model_name_or_path in TINY_NAMES
    n = num_samples if num_samples is not None else (TINY_NUM_SAMPLES if tiny else COCO_FULL_N)
    draw = coco.draw(coco_dir, n, seed, coco_year, split)
    sd = load_model(pretrained_model_name_or_path, dtype=DTYPES[mixed_precision], device=device, revision=revision,
                    variant=variant)
    pipe = build_pipeline(sd)
    pipe.scheduler = make_scheduler(scheduler, sd.noise_scheduler.config)
    resolution = resolution or native_resolution(pipe)
    if resolution % 8:
        raise ValueError(f"--resolution: expected a multiple of 8 (the VAE's downsampling), got {resolution}")
    messages = sample_size_warnings(n, COCO_FULL_N) if state.is_main_process else []

    inception_sha = file_sha256(weights)
    if state.is_main_process and (hash_warning := weights_hash_warning(inception_sha, weights)):
        messages.append(hash_warning)
    inception = load_fid_inception(weights, device=device)
    real_list = hashlib.sha256(json.dumps([str(p) for p in draw.real_images]).encode()).hexdigest()
    key = {"protocol": coco.PROTOCOL_VERSION, "coco_dir": str(Path(coco_dir).resolve()), "year": coco_year,
           "split": split, "real_images_sha256": real_list, "resolution": resolution, "inception_sha256": inception_sha}
    cache_dir = default_cache_dir() if stats_cache_dir is None else Path(stats_cache_dir)
    real, cache, reused, skipped = _real_features(state, inception, draw, key, cache_dir, batch_size, resolution,
                                                  skip_bad_images)
    if skipped:
        messages.append(f"{len(skipped)} unreadable real images skipped (--skip_bad_images): "
                        f"{[str(draw.real_images[i]) for i in skipped[:5]]}")
    scorer = CLIPScorer(clip_folder, device) if clip_folder is not None else None

    out, prompts = Path(output_dir), [caption for _, caption in draw.pairs]
    results = []
    for row in rows:
        with tuners_on(sd.unet, row, device) as tuners_sha:
            for scale in scales:
                folder = out / row.name / f"cfg{scale:g}"
                record = {"model": str(pretrained_model_name_or_path), "tuners_sha256": tuners_sha, "seed": seed,
                          "steps": steps, "guidance_scale": scale, "scheduler": scheduler, "resolution": resolution,
                          "mixed_precision": mixed_precision,
                          "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()}
                if state.is_main_process:
                    check_generation_record(folder, record)
                state.wait_for_everyone()
                settings = SamplingSettings(scheduler, steps=steps, guidance_scale=scale, seed=seed,
                                            batch_size=batch_size, seed_stride=PROTOCOL_STRIDE)
                paths = generate_by_index(pipe, prompts, folder, settings, resolution=resolution,
                                          rank=state.process_index, world=state.num_processes, progress=progress)
                state.wait_for_everyone()
                fake, _ = sharded_features(state, inception, paths, inception_image, batch_size)
                clip = sharded_clip_scores(state, scorer, paths, prompts, batch_size) if scorer else None
                if state.is_main_process:
                    kid = kid_from_features(real, fake, kid_subsets, kid_subset_size, seed)
                    results.append({
                        "model": row.name, "tuners": str(row.tuners) if row.tuners else None,
                        "tuners_sha256": tuners_sha, "step": row.step, "guidance_scale": scale,
                        "fid": fid_from_features(real, fake), "kid_mean": kid[0], "kid_std": kid[1],
                        "kid_subset_size": kid[2], "clip_score": float(clip.mean()) if clip is not None else None,
                        "n": len(paths), "images": str(folder)})
    if not state.is_main_process:
        return None
    result = {
        "rows": results, "n": n, "num_real": len(real), "seed": seed, "steps": steps, "scheduler": scheduler,
        "resolution": resolution, "batch_size": batch_size, "guidance_scales": scales,
        "model": str(pretrained_model_name_or_path), "mixed_precision": mixed_precision,
        "num_processes": state.num_processes, "device": device,
        "coco": {"dir": str(coco_dir), "year": coco_year, "split": split,
                 "num_images_in_split": draw.num_images_in_split, "drawn_with_replacement": draw.with_replacement},
        "inception_weights": str(weights), "inception_sha256": inception_sha,
        "clip_model": str(clip_folder) if clip_folder else None,
        "real_features_cache": str(cache), "real_features_reused": reused, "skipped_real_images": len(skipped),
        "warnings": messages, "versions": versions(), "protocol_version": coco.PROTOCOL_VERSION,
        "protocol": coco.PROTOCOL.format(year=coco_year, split=split),
        "elapsed_s": round(time.perf_counter() - started, 3),
    }
    write_reports(result, out)
    return result


def evaluate_folders(real_dir: str | os.PathLike, fake_dir: str | os.PathLike, output_dir: str | os.PathLike | None,
                     *, inception_weights: str | os.PathLike | None = None, batch_size: int = 8,
                     device: str | None = None, stats_cache_dir: str | os.PathLike | None = None,
                     skip_bad_images: bool = False, kid_subsets: int = 100, kid_subset_size: int = 1000) -> dict:
    """FID and KID between two image folders (per-image files only, generate.py's grid.png left out)."""
    started = time.perf_counter()
    weights = resolve_inception_weights(inception_weights)
    real_paths, fake_paths = list_images(real_dir, "--real_dir"), list_images(fake_dir, "--fake_dir")
    state, device = process_state(device)
    messages = sample_size_warnings(min(len(real_paths), len(fake_paths)), full_n=None)
    sha = file_sha256(weights)
    if hash_warning := weights_hash_warning(sha, weights):
        messages.append(hash_warning)
    inception = load_fid_inception(weights, device=device)
    listing = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in real_paths]
    key = {"protocol": coco.PROTOCOL_VERSION, "real_dir": str(Path(real_dir).resolve()), "inception_sha256": sha,
           "files_sha256": hashlib.sha256(json.dumps(listing).encode()).hexdigest()}
    path = features_cache_path(stats_cache_dir, key) if stats_cache_dir is not None else None
    real = load_cached_features(path, key) if path is not None else None
    reused, skipped = real is not None, []
    if real is None:
        real, skipped = sharded_features(state, inception, real_paths, inception_image, batch_size, skip_bad_images)
        real = np.delete(real, skipped, axis=0)
        if path is not None:
            save_cached_features(path, key, real)
    fake, fake_skipped = sharded_features(state, inception, fake_paths, inception_image, batch_size, skip_bad_images)
    fake = np.delete(fake, fake_skipped, axis=0)
    kid = kid_from_features(real, fake, kid_subsets, kid_subset_size)
    result = {
        "fid": fid_from_features(real, fake), "kid_mean": kid[0], "kid_std": kid[1], "kid_subset_size": kid[2],
        "n": len(fake), "n_real": len(real), "n_fake": len(fake), "mode": "folders", "real_dir": str(real_dir),
        "fake_dir": str(fake_dir), "skipped_images": len(skipped) + len(fake_skipped),
        "inception_weights": str(weights), "inception_sha256": sha, "batch_size": batch_size, "device": device,
        "real_stats_cache": str(path) if path else None, "real_stats_reused": reused,
        "elapsed_s": round(time.perf_counter() - started, 3), "warnings": messages, "versions": versions(),
        "protocol_version": coco.PROTOCOL_VERSION,
    }
    if output_dir is not None:
        atomic_write_text(Path(output_dir) / "eval.json", json.dumps(result, indent=2) + "\n")
    return result


# ---------------------------------------------------------------------------------------------------------------------
# reports
def markdown_table(result: dict) -> str:
    def num(value, fmt):
        return "–" if value is None else format(value, fmt)

    lines = [f"N = {result['n']} ({result['coco']['split']}{result['coco']['year']}, seed {result['seed']}, "
             f"{result['steps']} steps, {result['scheduler']}, {result['resolution']} px)", "",
             "| model | step | guidance | FID ↓ | KID ×10³ ↓ | CLIP score ↑ |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        kid = f"{1e3 * r['kid_mean']:.2f} ± {1e3 * r['kid_std']:.2f}"
        lines.append(f"| {r['model']} | {num(r['step'], 'd')} | {r['guidance_scale']:g} | {r['fid']:.2f} | {kid} | "
                     f"{num(r['clip_score'], '.2f')} |")
    notes = [f"- {w}" for w in result["warnings"]]
    return "\n".join(lines + ([""] + notes if notes else []) + ["", result["protocol"], ""])


def plot_fid_vs_clip(result: dict, path: Path) -> Path:
    """One curve per model over the guidance scales: FID against CLIP score (or against the scale without CLIP)."""
    with_clip = all(r["clip_score"] is not None for r in result["rows"])
    x = ("CLIP score", lambda r: r["clip_score"]) if with_clip else ("guidance scale", lambda r: r["guidance_scale"])
    return plot_sweep(result["rows"], path, x, ("FID", lambda r: r["fid"]),
                      f"FID vs {'CLIP score' if with_clip else 'guidance'} (N={result['n']})")


def plot_fid_vs_step(result: dict, path: Path) -> Path:
    """Per-checkpoint mode: FID (and CLIP score, when measured) against the training step, one curve per run."""
    metrics = [("FID", lambda r: r["fid"])]
    if all(r["clip_score"] is not None for r in result["rows"]):
        metrics.append(("CLIP score", lambda r: r["clip_score"]))
    return plot_vs_step(result["rows"], path, metrics, f"FID vs training step (N={result['n']})")


def write_reports(result: dict, out: Path) -> None:
    atomic_write_text(out / "eval.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "eval.md", markdown_table(result))
    plot_fid_vs_clip(result, out / "fid_vs_clip.png")
    if any(r["step"] is not None for r in result["rows"]):
        plot_fid_vs_step(result, out / "fid_vs_step.png")
