"""The tiny world's evaluation protocol (issues 14, 24): prompt accuracy, domain FID and KID of the base and tuned
models on a held-out concept's prompts, as rows of eval.json / eval.md like the COCO protocol's
(`eval_fid.py --world concept`, which runs this protocol through evaluation's one loop).

Protocol: N concept prompts, every colour x background of the concept N / 12 times, image i from the noise of seed
`seed * 1,000,000 + i`; real images: renders of the same prompts (the world's reference poses). Its inputs, for the
registered metrics (restune_diffusion.metrics): the judge's hits on the concept's images (-> concept_accuracy), the
judge's penultimate features of them against the real renders' (-> domain_fid, domain_kid_*), and its hits on the
pretraining prompts, every colour x background of the three pretraining shapes once, same seeds (-> pretrain_accuracy:
what tuning may forget). With the defaults (N 96, 20 DDIM steps, guidance 4, batch 128, seed 0) each row's accuracy
and features equal `world.generate` + `world.hits` of that model.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from PIL import Image

from ..files import atomic_write_text, file_sha256
from ..metrics import Protocol, Source
from ..metrics.plots import plot_sweep, plot_vs_step
from ..sampling import PROTOCOL_STRIDE, SamplingSettings
from . import protocol
from .datasets import CONCEPT
from .judge import JUDGE_FILE, load_judge
from .report import judge_folder
from .scene import CONCEPTS, RESOLUTION, kept_grid, prompt_grid, to_uint8

WORLDS = (*CONCEPTS, "concept")  # "concept": the default job's concept (the star)
EVAL_REPEATS = 8  # default N = 12 prompts x 8
PROTOCOL_VERSION = "restune-tiny-world-v2"
PROMPTS_PER_ROUND = len(prompt_grid((CONCEPT,)))  # 12: every colour x background once
PROTOCOL = (
    f"Tiny world, a held-out concept: N prompts = every colour x background N/{PROMPTS_PER_ROUND} times; image i "
    f"from seed * 1e6 + i at 32 px; real: renders of the same prompts (the world's reference poses). Accuracy: the "
    f"world's judge (trained on autoencoder round trips, with a 'none' class) names the asked shape / colour / "
    f"background (and all three). Domain FID: torchmetrics FID on the judge's penultimate features (float64 "
    f"statistics); domain KID on the same features. Pretraining-prompt accuracy: the {len(kept_grid())} pretraining "
    f"prompts once, same seeds. Says whether a tuner helps generation and how methods rank; nothing about SD v1.5's "
    f"FID."
)
# what the protocol collects, and the prefix of the metrics' fields: concept_accuracy, domain_fid, pretrain_accuracy
SOURCES = {"concept": Source("hits", "concept_"), "domain": Source("features", "domain_"),
           "pretrain": Source("hits", "pretrain_")}


def read_images(paths: list[Path]):
    images = []
    for p in paths:
        with Image.open(p) as im:
            images.append(im.convert("RGB"))
    # (N, 3, 32, 32) uint8, contiguous as world.generate's: the judge's float32 features move by ~5e-6 with the
    # memory layout (to_uint8 gives a channels-last view), and a row should equal world.generate + world.hits
    return to_uint8(images).contiguous()


def sampling(scheduler: str = "ddim", steps: int | None = None, batch_size: int | None = None, seed: int = 0,
             guidance_scale: float | None = None) -> SamplingSettings:
    """The world's sampling; None takes its protocol's value: protocol.SAMPLING_STEPS steps, guidance
    protocol.GUIDANCE_SCALE, batch protocol.BATCH (world.generate's: a batch's composition moves pixels by one
    level, so equal numbers need equal batches)."""
    return SamplingSettings(scheduler, steps=protocol.SAMPLING_STEPS if steps is None else steps,
                            guidance_scale=protocol.GUIDANCE_SCALE if guidance_scale is None else guidance_scale,
                            seed=seed, batch_size=protocol.BATCH if batch_size is None else batch_size,
                            seed_stride=PROTOCOL_STRIDE)


def evaluation_protocol(settings: SamplingSettings, world_name: str = "concept", num_samples: int | None = None,
                        pretrained_model_name_or_path: str = "tiny") -> Protocol:
    """The held-out concept's protocol for evaluation's loop (evaluation.sweep.evaluate_protocol); N default 96.
    Named errors for a world that does not exist and an N that does not ask every prompt equally often."""
    if world_name not in WORLDS:
        raise ValueError(f"--world: expected one of {WORLDS}, got {world_name!r}")
    n = EVAL_REPEATS * PROMPTS_PER_ROUND if num_samples is None else num_samples
    if not isinstance(n, int) or n < PROMPTS_PER_ROUND or n % PROMPTS_PER_ROUND:
        raise ValueError(f"--num_samples: the tiny world asks every colour x background of the concept equally often; "
                         f"expected a positive multiple of {PROMPTS_PER_ROUND}, got {n!r}")
    concept = CONCEPT if world_name == "concept" else world_name
    judge_dir = judge_folder(pretrained_model_name_or_path)
    judge = load_judge(judge_dir / JUDGE_FILE)
    asked, pretrain = prompt_grid((concept,), n // PROMPTS_PER_ROUND), kept_grid()
    real = protocol.hits(judge, protocol.reference_images(concept, asked, "reference"), asked)["features"]
    messages = []
    if n < judge.width:
        messages.append(f"N={n} < {judge.width} (the judge's feature dimension): the covariance is "
                        f"rank-deficient and the domain FID noisy; compare only at equal N")
        warnings.warn(messages[-1], UserWarning, stacklevel=2)

    def collect(state, paths: dict[str, list[Path]]) -> dict:
        if not state.is_main_process:  # the judge runs once, on the main process
            return {}
        seen = protocol.hits(judge, read_images(paths["concept"]), asked)
        return {"concept": seen, "domain": seen["features"],
                "pretrain": protocol.hits(judge, read_images(paths["pretrain"]), pretrain)}

    return Protocol(
        prompt_sets={"concept": [a.caption for a in asked], "pretrain": [a.caption for a in pretrain]},
        resolution=RESOLUTION, sources=SOURCES, real={"domain": real}, collect=collect, report=write_world_reports,
        record={"batch_size": settings.batch_size, "protocol": PROTOCOL_VERSION}, context={"seed": settings.seed},
        warnings=messages,
        info={"mode": f"tiny-world:{world_name}", "n_pretrain": len(pretrain), "concept": concept,
              "judge": str(judge_dir), "judge_sha256": file_sha256(judge_dir / JUDGE_FILE), "feature_dim": judge.width,
              "protocol_version": PROTOCOL_VERSION, "protocol": PROTOCOL})


def markdown_table(result: dict) -> str:
    lines = [f"Tiny world, held-out concept '{result['concept']}': N = {result['n']} (seed {result['seed']}, "
             f"{result['steps']} steps, {result['scheduler']}, {result['resolution']} px); pretraining prompts: "
             f"{result['n_pretrain']}", "",
             "| model | step | guidance | concept accuracy ↑ | shape | colour | background | domain FID ↓ | "
             "domain KID ↓ | pretraining-prompt accuracy ↑ |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        acc = r["concept_accuracy"]
        step = "–" if r["step"] is None else r["step"]
        lines.append(f"| {r['model']} | {step} | {r['guidance_scale']:g} | {acc['all']:.3f} | {acc['shape']:.3f} | "
                     f"{acc['colour']:.3f} | {acc['background']:.3f} | {r['domain_fid']:.2f} | "
                     f"{r['domain_kid_mean']:.2f} | {r['pretrain_accuracy']['all']:.3f} |")
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
