"""COCO and image-folder evaluation: models x guidance scales on one caption draw -> eval.json, eval.md,
fid_vs_clip.png (+ fid_vs_step.png in per-checkpoint mode), through the one loop (sweep.py); or FID/KID between two
image folders. The metrics are the registry's (restune_diffusion.metrics): FID, KID and CLIP score here.

The real features are extracted once (cached); generated images' Inception features and CLIP scores are extracted
split over processes by image index and gathered in index order, so N processes give the numbers one process gives.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from functools import partial
from pathlib import Path

import numpy as np

from ..files import atomic_write_text, file_sha256
from ..metrics import Protocol, Source, measure
from ..metrics.plots import plot_sweep, plot_vs_step
from ..models import TINY_NAMES, load_model, native_resolution
from ..sampling import DEFAULT_GUIDANCE, PROTOCOL_STRIDE, SamplingSettings, batches
from . import coco
from .clip_score import CLIPScorer, resolve_clip_folder
from .features import (
    COCO_FULL_N,
    default_cache_dir,
    extract_features,
    features_cache_path,
    load_cached_features,
    sample_size_warnings,
    save_cached_features,
)
from .images import list_images
from .inception import inception_image, load_fid_inception, resolve_inception_weights, weights_hash_warning
from .sweep import check_mixed_precision, gather_all, model_rows, process_state, run, sampling_pipeline, versions

TINY_NUM_SAMPLES = 64  # the tiny model's default N: a quick look, not a number to report
INCEPTION = {"inception": Source("features")}  # what COCO and folder mode collect besides CLIP scores


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
    dtype = check_mixed_precision(mixed_precision)
    settings = SamplingSettings(scheduler, steps=steps, guidance_scale=scales[0], seed=seed, batch_size=batch_size,
                                seed_stride=PROTOCOL_STRIDE)  # fails on a bad value before anything loads
    rows = model_rows(tuners, base)
    weights = resolve_inception_weights(inception_weights)
    clip_folder = resolve_clip_folder(clip_model)
    state, device = process_state(device)
    tiny = pretrained_model_name_or_path in TINY_NAMES
    n = num_samples if num_samples is not None else (TINY_NUM_SAMPLES if tiny else COCO_FULL_N)
    draw = coco.draw(coco_dir, n, seed, coco_year, split)
    sd = load_model(pretrained_model_name_or_path, dtype=dtype, device=device, revision=revision, variant=variant)
    pipe = sampling_pipeline(sd, settings)
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
    prompts = [caption for _, caption in draw.pairs]

    def collect(state, paths: dict[str, list[Path]]) -> dict:
        fake, _ = sharded_features(state, inception, paths[""], inception_image, batch_size)
        clip = sharded_clip_scores(state, scorer, paths[""], prompts, batch_size) if scorer else None
        return {"inception": fake, "clip": clip}

    protocol = Protocol(
        prompt_sets={"": prompts}, resolution=resolution, sources={**INCEPTION, "clip": Source("clip_scores")},
        real={"inception": real}, collect=collect, report=write_reports, record={"resolution": resolution},
        context={"seed": seed, "kid_subsets": kid_subsets, "kid_subset_size": kid_subset_size}, warnings=messages,
        info={"num_real": len(real),
              "coco": {"dir": str(coco_dir), "year": coco_year, "split": split,
                       "num_images_in_split": draw.num_images_in_split,
                       "drawn_with_replacement": draw.with_replacement},
              "inception_weights": str(weights), "inception_sha256": inception_sha,
              "clip_model": str(clip_folder) if clip_folder else None, "real_features_cache": str(cache),
              "real_features_reused": reused, "skipped_real_images": len(skipped),
              "protocol_version": coco.PROTOCOL_VERSION, "protocol": coco.PROTOCOL.format(year=coco_year, split=split)})
    return run(protocol, sd, pipe, rows, settings, scales, output_dir, state=state, device=device,
               model=str(pretrained_model_name_or_path), mixed_precision=mixed_precision, started=started,
               progress=progress)


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
    context = {"kid_subsets": kid_subsets, "kid_subset_size": kid_subset_size}
    result = {
        **measure(INCEPTION, {"inception": real}, {"inception": fake}, context), "n": len(fake), "n_real": len(real),
        "n_fake": len(fake), "mode": "folders", "real_dir": str(real_dir), "fake_dir": str(fake_dir),
        "skipped_images": len(skipped) + len(fake_skipped), "inception_weights": str(weights),
        "inception_sha256": sha, "batch_size": batch_size, "device": device,
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
