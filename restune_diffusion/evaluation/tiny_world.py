"""The tiny world's evaluation (issue 14): prompt accuracy and domain FID of the base and tuned models, on the held-out
concept's prompts, as rows of eval.json / eval.md like the COCO runner's (`eval_fid.py --world concept`).

Protocol (restune_diffusion/world.py): N concept prompts, every colour x background of the star N / 12 times, image i
from the noise of seed `seed * 1,000,000 + i`; real images: the first N of the concept's held-out set. Prompt
accuracy: the shipped attribute classifier's shape / colour / background (and all three) against the prompt. Domain
FID: torchmetrics' FID over the classifier's penultimate features. Pretraining-prompt accuracy: every colour x
background of the three pretraining shapes once, same seeds (what tuning may forget). With the defaults (N 96,
20 DDIM steps, guidance 4, batch 64, seed 0) each row equals `world.score` of that model.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path

from PIL import Image

from .. import world
from ..files import atomic_write_text
from ..models import TINY, TINY_ASSETS, build_pipeline, load_model
from ..samplers import make_scheduler, sampler_key
from ..sampling import PROTOCOL_STRIDE, SamplingSettings
from .images import check_generation_record, generate_by_index
from .inception import file_sha256
from .plots import plot_sweep, plot_vs_step
from .runner import DTYPES, model_rows, process_state, tuners_on, versions

WORLDS = ("concept",)
WORLD_BATCH = 64  # world.generate's batch
PROTOCOL_VERSION = "restune-tiny-world-v1"
PROMPTS_PER_ROUND = len(world.prompt_grid((world.CONCEPT,)))  # 12: every colour x background once
PROTOCOL = (
    f"Tiny world, held-out concept '{world.CONCEPT}': N prompts = every colour x background N/{PROMPTS_PER_ROUND} "
    f"times; image i from seed * 1e6 + i at 32 px; real: the first N images of the concept's held-out set. Prompt "
    f"accuracy: the attribute classifier's shape/colour/background (and all three) against the prompt. Domain FID: "
    f"torchmetrics FID on the classifier's penultimate features (float64 statistics). Pretraining-prompt accuracy: "
    f"the {len(world.prompt_grid(world.PRETRAIN_SHAPES))} pretraining prompts once, same seeds. Says whether a tuner "
    f"helps generation and how methods rank; nothing about SD v1.5's FID."
)


def classifier_folder(pretrained_model_name_or_path: str) -> Path:
    """The attribute classifier beside the base (its classifier/ folder, as tools/pretrain_tiny.py writes it), else
    the shipped one."""
    if pretrained_model_name_or_path != TINY and (Path(pretrained_model_name_or_path) / "classifier").is_dir():
        return Path(pretrained_model_name_or_path) / "classifier"
    return TINY_ASSETS / "classifier"


def read_images(paths: list[Path]):
    images = []
    for p in paths:
        with Image.open(p) as im:
            images.append(im.convert("RGB"))
    return world.to_uint8(images)  # (N, 3, 32, 32) uint8


def check_settings(world_name: str, num_samples: int | None, steps: int | None, batch_size: int | None,
                   mixed_precision: str, scheduler: str) -> tuple[int, int, int]:
    """(N, steps, batch size) with the world's defaults; named errors for bad values."""
    if world_name not in WORLDS:
        raise ValueError(f"--world: expected one of {WORLDS}, got {world_name!r}")
    n = world.EVAL_REPEATS * PROMPTS_PER_ROUND if num_samples is None else num_samples
    if not isinstance(n, int) or n < PROMPTS_PER_ROUND or n % PROMPTS_PER_ROUND:
        raise ValueError(f"--num_samples: the tiny world asks every colour x background of the concept equally often; "
                         f"expected a positive multiple of {PROMPTS_PER_ROUND}, got {n!r}")
    if mixed_precision not in DTYPES:
        raise ValueError(f"--mixed_precision: expected one of {sorted(DTYPES)}, got {mixed_precision!r}")
    steps = world.SAMPLING_STEPS if steps is None else steps
    batch_size = WORLD_BATCH if batch_size is None else batch_size
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name}: expected a positive integer, got {value!r}")
    sampler_key(scheduler)
    return n, steps, batch_size


def generate_sets(state, pipe, prompt_sets: dict[str, list[str]], folder: Path, record: dict, progress: bool) -> dict:
    """Each prompt set's images under folder/<set>/ (split over processes, resumable): {set: uint8 (N, 3, 32, 32)} on
    the main process, {set: None} on the others."""
    images = {}
    for part, prompts in prompt_sets.items():
        if state.is_main_process:
            check_generation_record(folder / part, {
                **record, "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()})
        state.wait_for_everyone()
        settings = SamplingSettings(record["scheduler"], steps=record["steps"], guidance_scale=record["guidance_scale"],
                                    seed=record["seed"], batch_size=record["batch_size"], seed_stride=PROTOCOL_STRIDE)
        paths = generate_by_index(pipe, prompts, folder / part, settings, resolution=world.RESOLUTION,
                                  rank=state.process_index, world=state.num_processes, progress=progress)
        state.wait_for_everyone()
        images[part] = read_images(paths) if state.is_main_process else None
    return images


def evaluate_world(pretrained_model_name_or_path: str, output_dir: str | os.PathLike, *, world_name: str = "concept",
                   tuners: list[str] | None = None, base: bool = False, guidance_scales: list[float] | None = None,
                   num_samples: int | None = None, seed: int = 0, steps: int | None = None,
                   scheduler: str = "ddim", batch_size: int | None = None, device: str | None = None,
                   mixed_precision: str = "no", progress: bool = True, revision: str | None = None,
                   variant: str | None = None) -> dict | None:
    """Every model x guidance scale on the held-out concept's prompts; writes eval.json, eval.md and
    fid_vs_accuracy.png (+ fid_vs_step.png for checkpoints) on the main process and returns eval.json's content
    (None on the other processes). Generation is split over processes by image index, resumable. Defaults (None):
    N 96, world.SAMPLING_STEPS steps, guidance world.GUIDANCE_SCALE, batch 64 (world.generate's: a batch's
    composition moves pixels by one level, so equal numbers need equal batches)."""
    started = time.perf_counter()
    n, steps, batch_size = check_settings(world_name, num_samples, steps, batch_size, mixed_precision, scheduler)
    scales = [float(s) for s in (guidance_scales or [world.GUIDANCE_SCALE])]
    rows = model_rows(tuners, base)
    state, device = process_state(device)
    classifier_dir = classifier_folder(pretrained_model_name_or_path)
    classifier = world.load_classifier(classifier_dir)
    sd = load_model(pretrained_model_name_or_path, dtype=DTYPES[mixed_precision], device=device, revision=revision,
                    variant=variant)
    pipe = build_pipeline(sd)
    pipe.scheduler = make_scheduler(scheduler, sd.noise_scheduler.config)
    asked, real = world.concept_eval_set(n // PROMPTS_PER_ROUND)
    pretrain = world.prompt_grid(world.PRETRAIN_SHAPES)
    prompt_sets = {"concept": [a.caption for a in asked], "pretrain": [a.caption for a in pretrain]}
    messages = []
    if state.is_main_process and n < classifier.width:
        messages.append(f"N={n} < {classifier.width} (the classifier's feature dimension): the covariance is "
                        f"rank-deficient and the domain FID noisy; compare only at equal N")
        warnings.warn(messages[-1], UserWarning, stacklevel=2)

    out, results = Path(output_dir), []
    for row in rows:
        with tuners_on(sd.unet, row, device) as tuners_sha:
            for scale in scales:
                folder = out / row.name / f"cfg{scale:g}"
                record = {"model": str(pretrained_model_name_or_path), "tuners_sha256": tuners_sha, "seed": seed,
                          "steps": steps, "guidance_scale": scale, "scheduler": scheduler, "batch_size": batch_size,
                          "mixed_precision": mixed_precision, "protocol": PROTOCOL_VERSION}
                images = generate_sets(state, pipe, prompt_sets, folder, record, progress)
                if state.is_main_process:
                    results.append({
                        "model": row.name, "tuners": str(row.tuners) if row.tuners else None,
                        "tuners_sha256": tuners_sha, "step": row.step, "guidance_scale": scale,
                        "concept_accuracy": world.prompt_accuracy(classifier, images["concept"], asked),
                        "domain_fid": world.domain_fid(classifier, real, images["concept"]),
                        "pretrain_accuracy": world.prompt_accuracy(classifier, images["pretrain"], pretrain),
                        "n": n, "images": str(folder)})
    if not state.is_main_process:
        return None
    result = {
        "mode": f"tiny-world:{world_name}", "rows": results, "n": n, "n_pretrain": len(pretrain), "seed": seed,
        "steps": steps, "scheduler": scheduler, "resolution": world.RESOLUTION, "batch_size": batch_size,
        "guidance_scales": scales, "model": str(pretrained_model_name_or_path), "mixed_precision": mixed_precision,
        "num_processes": state.num_processes, "device": device, "concept": world.CONCEPT,
        "classifier": str(classifier_dir), "classifier_sha256": file_sha256(classifier_dir / world.CLASSIFIER_FILE),
        "feature_dim": classifier.width, "warnings": messages, "protocol_version": PROTOCOL_VERSION,
        "protocol": PROTOCOL, "versions": versions(), "elapsed_s": round(time.perf_counter() - started, 3),
    }
    write_world_reports(result, out)
    return result


def markdown_table(result: dict) -> str:
    lines = [f"Tiny world, held-out concept '{result['concept']}': N = {result['n']} (seed {result['seed']}, "
             f"{result['steps']} steps, {result['scheduler']}, {result['resolution']} px); pretraining prompts: "
             f"{result['n_pretrain']}", "",
             "| model | step | guidance | concept accuracy ↑ | shape | colour | background | domain FID ↓ | "
             "pretraining-prompt accuracy ↑ |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        acc = r["concept_accuracy"]
        step = "–" if r["step"] is None else r["step"]
        lines.append(f"| {r['model']} | {step} | {r['guidance_scale']:g} | {acc['all']:.3f} | {acc['shape']:.3f} | "
                     f"{acc['colour']:.3f} | {acc['background']:.3f} | {r['domain_fid']:.2f} | "
                     f"{r['pretrain_accuracy']['all']:.3f} |")
    notes = [f"- {w}" for w in result["warnings"]]
    return "\n".join(lines + ([""] + notes if notes else []) + ["", result["protocol"], ""])


def write_world_reports(result: dict, out: Path) -> None:
    """eval.json, eval.md, fid_vs_accuracy.png (one curve per model over the guidance scales) and, with checkpoints,
    fid_vs_step.png (domain FID and concept accuracy against the training step, one curve per run)."""
    fid = ("domain FID", lambda r: r["domain_fid"])
    accuracy = ("concept prompt accuracy", lambda r: r["concept_accuracy"]["all"])
    atomic_write_text(out / "eval.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "eval.md", markdown_table(result))
    plot_sweep(result["rows"], out / "fid_vs_accuracy.png", accuracy, fid,
               f"domain FID vs prompt accuracy over guidance (N={result['n']})")
    if any(r["step"] is not None for r in result["rows"]):
        plot_vs_step(result["rows"], out / "fid_vs_step.png", [fid, accuracy],
                     f"domain FID and prompt accuracy vs training step (N={result['n']})")
