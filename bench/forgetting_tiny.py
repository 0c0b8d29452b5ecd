"""Learning a concept without forgetting the rest, measured in the tiny world (issue 25).

    python bench/forgetting_tiny.py                      # after bench/quality_tiny.py --stage sweep (its LRs)
    python bench/forgetting_tiny.py --quick --out /tmp/f # the plumbing: two methods, a few steps

For each method at the learning rate bench/quality_tiny.py chose on validation: the concept it learns against what it
keeps of the pretraining prompts, with no remedy, with each remedy at two weights, and at three inference weights:
- **prior preservation** (DreamBooth's, diffusers' `--with_prior_preservation`): class images the base drew of the 30
  pretraining prompts (120, made once), paired with each batch, weighted by `--prior_loss_weight`;
- **base-prediction preservation** (`--preservation_prompts`): the tuned prediction pulled toward the frozen base's on
  the pretraining prompts at each step's own noisy latents, weighted by `--preservation_weight`;
- **inference weight** (`generate.py --scale`): the no-remedy run's tuners at a lower weight, no training.
Each setting: the concepts star and heart, training seeds 0 and 1 (run k judged on noise seed k), 288 concept images
and 270 pretraining-prompt images per run (1,152 and 1,080 per setting); 95 % intervals by bootstrap over seeds, then
images, the concepts as strata. The default job (configs/tiny_demo.yaml) is a row of its own on the star (four
seeds). Runs are cached with the quality bench's (bench/world_runs.py): the no-remedy runs are the same runs.
Writes <out>/forgetting-tiny.json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.world_runs import (  # noqa: E402
    DEFAULT_JOB,
    Runner,
    concept_data,
    config_path,
    measurements,
    method_style,
    world_fingerprint,
    write_outputs,
)

CONCEPTS, SEEDS = ("star", "heart"), (0, 1)
DEFAULT_JOB_SEEDS = (0, 1, 2, 3)
REPEATS = (24, 9, 4)  # images per prompt: 12 concept prompts, 30 pretraining prompts, 6 held-out combinations
WEIGHTS = {"prior": (0.5, 2.0), "prediction": (0.5, 2.0)}
SCALES = (0.25, 0.5, 0.75)
KEPT_TARGET, CONCEPT_SHARE_TARGET = 0.90, 0.7  # the default job's target: kept >= 0.9, concept >= 0.7 x ceiling
NUM_CLASS_IMAGES = 120
REMEDIES = {"prior": "prior preservation", "prediction": "base-prediction preservation", "scale": "inference weight"}


def inputs(out: Path) -> tuple[Path, Path, list[str]]:
    """The pretraining prompts as a prompts file and as class prompts, and the class images' folder."""
    from restune_diffusion.files import atomic_write_text
    from restune_diffusion.world.scene import kept_grid

    prompts = [a.caption for a in kept_grid()]
    folder = out / "forgetting-inputs"
    prompts_file = folder / "pretraining_prompts.txt"
    if not prompts_file.is_file():
        atomic_write_text(prompts_file, "\n".join(prompts) + "\n")
    return prompts_file, folder / "class_images", prompts


def remedy_flags(kind: str, weight: float, prompts_file: Path, class_dir: Path, prompts: list[str]) -> tuple:
    from restune_diffusion.world import protocol

    if kind == "prior":  # the class images drawn as every world measurement samples (DDIM 20 steps, guidance 4)
        return ("--with_prior_preservation", "--class_data_dir", str(class_dir), *[x for p in prompts
                for x in ("--class_prompt", p)], "--num_class_images", str(NUM_CLASS_IMAGES),
                "--class_sampling_steps", str(protocol.SAMPLING_STEPS), "--class_guidance_scale",
                repr(float(protocol.GUIDANCE_SCALE)), "--prior_loss_weight", repr(weight))
    return ("--preservation_prompts", str(prompts_file), "--preservation_weight", repr(weight))


def make_class_images(out: Path, prompts_file: Path, class_dir: Path, prompts: list[str]) -> None:
    """The class images once, before the workers share the folder: a one-step run that generates them."""
    if (class_dir / "class_images.json").is_file() and len(list(class_dir.glob("*.png"))) >= NUM_CLASS_IMAGES:
        return
    from restune_diffusion import train

    argv = ["--config", str(config_path("lora")), "--no-world_report", "--data_dir",
            str(concept_data(out, CONCEPTS[0])), "--output_dir", str(out / "forgetting-inputs" / "class_warmup"),
            "--max_train_steps", "1", *remedy_flags("prior", 1.0, prompts_file, class_dir, prompts)]
    if train.main(argv):
        raise RuntimeError(f"making the class images in {class_dir} failed")


def settings(methods: list[str]) -> list[tuple[str, str, float]]:
    """(method, remedy, weight) for every point of the plot; remedy 'none' / 'prior' / 'prediction' / 'scale'."""
    rows = []
    for m in methods:
        rows.append((m, "none", 0.0))
        rows += [(m, kind, w) for kind, ws in WEIGHTS.items() for w in ws]
        rows += [(m, "scale", s) for s in SCALES]
    return rows


def jobs_for(runner: Runner, setting: tuple, lr: float, steps: int, flags: dict) -> list[dict]:
    method, remedy, weight = setting
    concepts, seeds = ((("star",), DEFAULT_JOB_SEEDS) if method == DEFAULT_JOB else (CONCEPTS, SEEDS))
    extra = flags[(remedy, weight)] if remedy in WEIGHTS else ()
    scale = weight if remedy == "scale" else 1.0
    return [runner.job(method, c, lr, s, steps, k, REPEATS, extra=extra, scale=scale)
            for c in concepts for k, s in enumerate(seeds)]


def point(results: list[dict], n_boot: int) -> dict:
    """The concept drawn / all right / kept / held-out combinations of one setting, with 95 % intervals."""
    from restune_diffusion.world import protocol

    ms = measurements(results)
    by_concept: dict[str, list] = {}
    for r, m in zip(results, ms):
        by_concept.setdefault(r["job"]["concept"], []).append(m)

    def ci(key: str, head: str) -> dict:
        strata = [[m.sets[key.format(c=c)][head] for m in group] for c, group in by_concept.items()]
        value, lo, hi = protocol.bootstrap(strata, n_boot=n_boot)
        return {"mean": round(value, 4), "ci95": [round(lo, 4), round(hi, 4)]}

    return {"concept_drawn": ci("concept:{c}", "shape"), "all_right": ci("concept:{c}", "all"),
            "kept": ci("kept", "all"), "heldout_combos": ci("heldout_combos", "all"),
            "n_concept": int(sum(len(m.sets[f"concept:{r['job']['concept']}"]["all"]) for r, m in zip(results, ms))),
            "n_kept": int(sum(len(m.sets["kept"]["all"]) for m in ms)),
            "concepts": sorted(by_concept), "train_cpu_seconds": train_cpu(results)}


def train_cpu(results: list[dict]) -> float | None:
    """Mean CPU seconds of one training run of the setting (one thread; the inference weight reuses the no-remedy
    runs, so it costs what they cost): what a remedy adds per run."""
    files = [Path(r["job"]["folder"]).parent / "train_cpu.json" for r in results]
    seconds = [json.loads(f.read_text())["cpu_seconds"] for f in files if f.is_file()]
    return round(float(np.mean(seconds)), 1) if seconds else None


def ceilings(concepts: list[str]) -> dict[str, float]:
    """Each concept's ceiling (concept drawn by real held-out images through the autoencoder) on the same prompts."""
    from restune_diffusion.models import load_model
    from restune_diffusion.world import protocol
    from restune_diffusion.world.report import load_judges
    from restune_diffusion.world.scene import prompt_grid

    sd, (judge, _) = load_model("tiny"), load_judges()
    return {c: float(protocol.ceiling(judge, sd.vae, c, prompt_grid((c,), REPEATS[0]) * 4).hits["shape"].mean())
            for c in concepts}


def best_corner(points: list[dict], ceiling: float) -> dict:
    """The setting nearest (kept 1, concept drawn = ceiling) with both axes as shares of what is reachable."""
    return min(points, key=lambda p: np.hypot(1 - p["kept"]["mean"],
                                              (ceiling - p["concept_drawn"]["mean"]) / max(ceiling, 1e-9)))


def remedy_table(result: dict) -> str:
    """Which remedy for which tuner: per method, the no-remedy point, each remedy at its best weight (the point nearest
    the corner (kept 1, concept drawn = ceiling)) and the training CPU time per run it costs."""
    def at(p: dict) -> str:
        return f"{p['concept_drawn']['mean']:.3f} / {p['kept']['mean']:.3f}"

    def cost(p: dict, none: dict) -> str:
        a, b = p.get("train_cpu_seconds"), none.get("train_cpu_seconds")
        return f" ({a / b:.1f}x)" if a and b and p["remedy"] != "scale" else ""

    lines = ["| method | ceiling | no remedy | " + " | ".join(f"{v} (best weight)" for v in REMEDIES.values())
             + " | best corner |", "|---|---|---|" + "---|" * len(REMEDIES) + "---|"]
    for m, info in result["methods"].items():
        none = next(p for p in info["points"] if p["remedy"] == "none")
        cells = []
        for kind in REMEDIES:
            points = [p for p in info["points"] if p["remedy"] == kind]
            best = best_corner(points, info["ceiling"]) if points else None
            cells.append(f"{best['weight']:g}: {at(best)}{cost(best, none)}" if best else "–")
        lines.append(f"| {m} | {info['ceiling']:.3f} | {at(none)} | " + " | ".join(cells)
                     + f" | {label(info['best'])} |")
    return "\n".join(lines) + "\n"


def label(p: dict) -> str:
    return "no remedy" if p["remedy"] == "none" else f"{REMEDIES[p['remedy']]} {p['weight']:g}"


def markdown(result: dict) -> str:
    def cell(d):
        return f"{d['mean']:.3f} [{d['ci95'][0]:.2f}, {d['ci95'][1]:.2f}]"

    meta = result["meta"]
    lines = ["# Learning without forgetting in the tiny world (issue 25)", "", f"Command: `{meta['command']}`", "",
             f"Machine: {meta['machine']}. CPU time of the runs: {meta['cpu_hours']:.2f} h.", "", meta["protocol"], "",
             "| method | LR | setting | concept drawn ↑ | all right ↑ | pretraining prompts (kept) ↑ | held-out "
             "combinations ↑ | best corner |", "|---|---|---|---|---|---|---|---|"]
    for m, info in result["methods"].items():
        for p in info["points"]:
            best = "**best**" if p is info["best"] or p == info["best"] else ""
            lines.append(f"| {m} | {info['lr']:g} | {label(p)} | {cell(p['concept_drawn'])} | {cell(p['all_right'])} "
                         f"| {cell(p['kept'])} | {cell(p['heldout_combos'])} | {best} |")
    t = result["default_job_target"]
    lines += ["", "## Which remedy for which tuner", "",
              "Concept drawn / pretraining prompts kept; each remedy at its weight nearest the corner (kept 1, concept "
              "drawn = ceiling), with its training CPU time per run against no remedy's:", "",
              remedy_table(result).rstrip("\n")]
    lines += ["", "Ceiling (concept drawn by real held-out images through the autoencoder, same prompts): "
              + ", ".join(f"{c} {v:.3f}" for c, v in result["ceilings"].items()) + ".", "",
              f"Target for the default job ({DEFAULT_JOB}): pretraining prompts >= {KEPT_TARGET} while the concept is "
              f"drawn at >= {CONCEPT_SHARE_TARGET} x the ceiling ({t['concept_needed']:.3f}): "
              + (f"**met** by {t['met_by']}." if t["met_by"] else f"not met; nearest: {t['nearest']}.")]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from restune_diffusion.files import atomic_write

    fig, ax = plt.subplots(figsize=(8, 5.5))
    styles = {"prior": "-", "prediction": "--", "scale": ":"}
    for i, (m, info) in enumerate(result["methods"].items()):
        look = method_style(i)
        colour = look["color"]
        pts = info["points"]
        none = next(p for p in pts if p["remedy"] == "none")
        for kind, style in styles.items():  # each remedy's curve starts at no remedy (weight 0, or inference weight 1)
            chain = [none, *sorted((p for p in pts if p["remedy"] == kind), key=lambda p: p["weight"],
                                   reverse=kind == "scale")]
            ax.plot([p["kept"]["mean"] for p in chain], [p["concept_drawn"]["mean"] for p in chain], linestyle=style,
                    color=colour, linewidth=1, marker=look["marker"], markersize=4,
                    label=m if kind == "prior" else None)
        for p in pts:
            ax.annotate(label(p).replace("base-prediction preservation", "pred.")
                        .replace("prior preservation", "prior").replace("inference weight", "w"),
                        (p["kept"]["mean"], p["concept_drawn"]["mean"]), xytext=(4, 3), textcoords="offset points",
                        fontsize=5, color=colour)
        b = info["best"]
        ax.plot([b["kept"]["mean"]], [b["concept_drawn"]["mean"]], marker="*", markersize=14, linestyle="",
                color=colour, markeredgecolor="k")
    for kind, style in styles.items():  # the line styles' key
        ax.plot([], [], linestyle=style, color="gray", label=REMEDIES[kind])
    ax.axvline(KEPT_TARGET, color="gray", linestyle=":")
    ax.axhline(result["default_job_target"]["concept_needed"], color="gray", linestyle=":")
    ax.set_xlabel("pretraining prompts kept (all right)")
    ax.set_ylabel("concept drawn")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title("forgetting vs learning: one colour per method, a line per remedy from no remedy, * the best corner",
                 fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=130))
    plt.close(fig)
    return path


def chosen_lrs(out: Path, methods: list[str]) -> dict[str, float]:
    """Each method's LR as the quality bench chose it on validation: its sweep's file (written when the sweep ends),
    else the finished table's rows; the default job's from its own sweep."""
    quality, sweep, default = (out / "quality-tiny.json", out / "quality-tiny-sweep.json",
                               out / "default-job-sweep.json")
    lrs = {}
    if set(methods) - {DEFAULT_JOB}:  # the default job alone needs only its own sweep
        if sweep.is_file():
            quality, chosen = sweep, json.loads(sweep.read_text())["methods"]
            lrs = {m: chosen[m]["chosen_lr"] for m in methods if m in chosen}
        elif quality.is_file():
            rows = json.loads(quality.read_text())["rows"]
            lrs = {m: rows[m]["lr"] for m in methods if m in rows}
        else:
            raise FileNotFoundError(f"{sweep}: run bench/quality_tiny.py --stage sweep first (its learning rates "
                                    "are used here)")
    if DEFAULT_JOB in methods:
        if not default.is_file():
            raise FileNotFoundError(f"{default}: run bench/quality_tiny.py --stage default_job first")
        lrs[DEFAULT_JOB] = json.loads(default.read_text())["chosen_lr"]
    missing = sorted(set(methods) - set(lrs))
    if missing:
        raise ValueError(f"{quality}: no chosen learning rate for {missing}")
    return lrs


def main(argv: list[str] | None = None) -> int:
    from bench.quality_tiny import METHODS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--methods", nargs="+", default=[*METHODS, DEFAULT_JOB])
    p.add_argument("--steps", type=int, default=400, help="the quality bench's budget (the default job: 500)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--n_boot", type=int, default=2000)
    p.add_argument("--machine", default="this project's CPU machine (2 cores), one thread per run")
    p.add_argument("--quick", action="store_true", help="lora and res_tuning at lr 1e-2, 4 steps, tiny sets")
    args = p.parse_args(argv)
    global REPEATS, SCALES, WEIGHTS, NUM_CLASS_IMAGES
    out = Path(args.out)
    if args.quick:
        args.methods, args.n_boot, args.steps = ["lora", "res_tuning"], 50, 4
        REPEATS, SCALES, WEIGHTS, NUM_CLASS_IMAGES = (1, 1, 1), (0.5,), {"prior": (1.0,), "prediction": (1.0,)}, 4
        lrs = {m: 1e-2 for m in args.methods}
    else:
        lrs = chosen_lrs(out, args.methods)
    prompts_file, class_dir, prompts = inputs(out)
    flags = {(kind, w): remedy_flags(kind, w, prompts_file, class_dir, prompts) for kind, ws in WEIGHTS.items()
             for w in ws}
    start = time.time()
    make_class_images(out, prompts_file, class_dir, prompts)
    runner = Runner(out, args.jobs, world_fingerprint(), args.quick)
    points = settings(args.methods)
    try:
        steps = {m: (500 if m == DEFAULT_JOB and not args.quick else args.steps) for m in args.methods}
        jobs = {s: jobs_for(runner, s, lrs[s[0]], steps[s[0]], flags) for s in points}
        flat = [j for js in jobs.values() for j in js]
        results = iter(runner.run(flat))
        by_setting = {s: [next(results) for _ in js] for s, js in jobs.items()}
    finally:
        runner.close()
    tops = ceilings(sorted({c for js in jobs.values() for j in js for c in [j["concept"]]}))
    result = {"methods": {}, "ceilings": tops}
    for (m, remedy, weight), rs in by_setting.items():
        info = result["methods"].setdefault(m, {"lr": lrs[m], "steps": steps[m], "points": []})
        info["points"].append({"remedy": remedy, "weight": weight, **point(rs, args.n_boot)})
    for info in result["methods"].values():
        concepts = info["points"][0]["concepts"]
        info["ceiling"] = float(np.mean([tops[c] for c in concepts]))
        info["best"] = best_corner(info["points"], info["ceiling"])
    target_method = DEFAULT_JOB if DEFAULT_JOB in result["methods"] else args.methods[0]
    info = result["methods"][target_method]
    needed = CONCEPT_SHARE_TARGET * info["ceiling"]
    met = [p for p in info["points"] if p["kept"]["mean"] >= KEPT_TARGET and p["concept_drawn"]["mean"] >= needed]
    result["default_job_target"] = {"method": target_method, "concept_needed": needed,
                                    "met_by": label(max(met, key=lambda p: p["kept"]["mean"])) if met else None,
                                    "nearest": label(info["best"])}
    cpu = sum(r["cpu_seconds_to_make"] for rs in by_setting.values() for r in rs)
    result["meta"] = {
        "command": " ".join(["python bench/forgetting_tiny.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": args.machine, "cpu_hours": cpu / 3600, "wall_seconds_this_call": round(time.time() - start),
        "concepts": list(CONCEPTS), "seeds": list(SEEDS), "repeats": list(REPEATS), "weights": WEIGHTS,
        "scales": list(SCALES), "num_class_images": NUM_CLASS_IMAGES, "n_boot": args.n_boot,
        "protocol": (f"Each method at its validated LR, {args.steps} steps at batch 8 (the default job: 500 on the "
                     f"star, seeds {list(DEFAULT_JOB_SEEDS)}); concepts {list(CONCEPTS)} x training seeds "
                     f"{list(SEEDS)}, run k judged on noise seed k; {12 * REPEATS[0]} concept and {30 * REPEATS[1]} "
                     f"pretraining-prompt images per run. Remedies: prior preservation ({NUM_CLASS_IMAGES} class "
                     f"images of the 30 pretraining prompts, drawn by the base), base-prediction preservation (the "
                     f"30 pretraining prompts), weights {WEIGHTS}; inference weights {list(SCALES)} on the "
                     f"no-remedy runs. Judge: the world's judge."),
    }
    write_outputs(out, "forgetting-tiny", result, markdown(result),
                  lambda: plot(result, out / "forgetting-tiny.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
