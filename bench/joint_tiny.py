"""K concepts' bypasses trained jointly in one backbone pass against each trained alone, in the tiny world (issue 23).

    python bench/joint_tiny.py                   # after bench/quality_tiny.py (its bypass LR and its alone runs)
    python bench/joint_tiny.py --quick --out /tmp/j   # the plumbing: two concepts, 4 steps, tiny sets

The paper's multi-task story with quality: per training seed of the quality table's report (0, 1, 2), ONE joint run
of the Res-Tuning-Bypass config (configs/tiny/res_tuning_bypass.yaml) with a bypass per held-out concept, each task on
its own concept's 64 images (a routed joint run: restune_diffusion/train/joint.py), one backbone pass per step on
the K·8 rows, at the table's learning rate and steps. Each task's bypass is judged with the table's protocol (run k on
noise seed k, 384 concept images per concept and seed) and compared with the table's runs of the same bypass trained
alone: the paired difference (same prompts and noise) with its 95 % interval (bootstrap over seeds, then images, the
concepts as strata); the largest weight difference where the alone run's tuners are still here; the training CPU
time of the joint run against its K alone runs. Runs and measurements are cached (bench/world_runs.py), so an
interrupted bench resumes. Writes <out>/joint-tiny.json and .md.
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
    RUNS,
    Runner,
    concept_data,
    config_path,
    config_text,
    measurements,
    run_flags,
    run_key,
    train_logged,
    world_fingerprint,
    write_outputs,
)

METHOD = "res_tuning_bypass"
SEEDS = (0, 1, 2)  # the quality table's reported seeds
REPEATS = (32, 8, 8)  # the quality table's report: 12 concept prompts x 32, 30 pretraining prompts x 8, 6 combos x 8


def joint_config(out: Path, concepts: list[str], folder: Path) -> Path:
    """The bypass config as a `tasks:` list: one task per concept, its data the concept's images (the folders the
    alone runs read)."""
    import yaml

    from restune_diffusion.files import atomic_write_text

    config = yaml.safe_load(config_path(METHOD).read_text())
    body = {"description": f"bench/joint_tiny.py: {METHOD} with one bypass per concept, each on its own data",
            "train": config["train"], "data": config["data"],
            "tasks": [{"name": c, "tuners": config["tuners"], "data": {"data_dir": str(concept_data(out, c))}}
                      for c in concepts]}
    return atomic_write_text(folder / "joint.yaml", yaml.safe_dump(body, sort_keys=False))


def joint_run(runner: Runner, concepts: list[str], lr: float, seed: int, steps: int) -> Path:
    """Train (once; cached by its settings) the joint run of one seed; returns its folder (train/<concept>/ each)."""
    import torch

    spec = {"method": f"joint-{METHOD}", "concept": "+".join(concepts), "lr": lr, "seed": seed, "steps": steps,
            "config": config_text(METHOD), "world": runner.world}
    folder = runner.out / RUNS / run_key(spec)
    if all((folder / "train" / c / "tuners.safetensors").is_file() for c in concepts):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    argv = ["--config", str(joint_config(runner.out, concepts, folder)), *run_flags(spec, folder / "train")]
    torch.set_num_threads(1)  # as the alone runs (bench/world_runs.py): CPU times comparable
    print(f"  joint run, seed {seed}: {len(concepts)} bypasses in one backbone pass", flush=True)
    train_logged(argv, folder, f"joint run seed {seed}")
    return folder


def joint_job(runner: Runner, folder: Path, concept: str, lr: float, seed: int, steps: int, noise: int) -> dict:
    """The measurement of one task of a joint run: the alone run's protocol, on the joint run's tuners."""
    job = runner.job(METHOD, concept, lr, seed, steps, noise, REPEATS)
    job["folder"] = str(folder / f"{concept}-{Path(job['folder']).name}")
    job["tuners"] = str(folder / "train" / concept / "tuners.safetensors")
    return job


def weight_gap(joint: Path, alone: Path) -> float | None:
    """The largest |joint - alone| over the tuners' tensors; None where the alone run's tuners are not here."""
    from safetensors.torch import load_file

    if not alone.is_file():
        return None
    a, b = load_file(joint), load_file(alone)
    if a.keys() != b.keys():
        raise ValueError(f"{joint} and {alone} hold different tensors")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def compare(joint: dict, alone: dict, concepts: list[str], n_boot: int) -> dict:
    """Concept drawn / all right / kept of the joint and the alone bypasses, and their paired difference."""
    from restune_diffusion.world import protocol

    def ci(strata, paired=None) -> dict:
        value, lo, hi = protocol.bootstrap(strata, paired_with=paired, n_boot=n_boot)
        return {"mean": round(value, 4), "ci95": [round(lo, 4), round(hi, 4)]}

    out = {}
    for name, (key, head) in {"concept_drawn": ("concept:{c}", "shape"), "all_right": ("concept:{c}", "all"),
                              "kept": ("kept", "all")}.items():
        def strata(ms, cs=concepts, key=key, head=head):
            return [[m.sets[key.format(c=c)][head].astype(float) for m in ms[c]] for c in cs]

        differ = sum(int((a != b).sum()) for sj, sa in zip(strata(joint), strata(alone)) for a, b in zip(sj, sa))
        out[name] = {"joint": ci(strata(joint)), "alone": ci(strata(alone)),
                     "difference": ci(strata(joint), strata(alone)), "verdicts_differ": differ,
                     "n": sum(len(a) for sa in strata(alone) for a in sa),
                     "per_concept": {c: {"joint": ci(strata(joint, [c])), "alone": ci(strata(alone, [c]))}
                                     for c in concepts}}
    return out


def cell(d: dict) -> str:
    return f"{d['mean']:.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]"


def headline(result: dict) -> str:
    """The joint-vs-alone table (README quotes it): mean over the concepts, paired difference, verdicts changed."""
    stats, k = result["stats"], len(result["concepts"])
    lines = ["| mean over the concepts | jointly trained (one backbone pass) | each alone | joint − alone (paired) | "
             "verdicts that differ |", "|---|---|---|---|---|"]
    for name, label in (("concept_drawn", "concept drawn"), ("all_right", "all right"),
                        ("kept", "pretraining prompts kept")):
        s = stats[name]
        lines.append(f"| {label} ({k} concepts) | {cell(s['joint'])} | {cell(s['alone'])} | {cell(s['difference'])} "
                     f"| {s['verdicts_differ']} of {s['n']:,} |")
    return "\n".join(lines) + "\n"


def markdown(result: dict) -> str:
    meta, stats = result["meta"], result["stats"]
    lines = ["# K concepts' bypasses in one backbone pass vs each alone (tiny world, issue 23)", "",
             f"Command: `{meta['command']}`", "", f"Machine: {meta['machine']}.", "", meta["protocol"], "",
             headline(result).rstrip("\n")]
    lines += ["", "| concept | all right, joint | all right, alone | concept drawn, joint | concept drawn, alone |",
              "|---|---|---|---|---|"]
    for c in result["concepts"]:
        a, d = stats["all_right"]["per_concept"][c], stats["concept_drawn"]["per_concept"][c]
        lines.append(f"| {c} | {cell(a['joint'])} | {cell(a['alone'])} | {cell(d['joint'])} | {cell(d['alone'])} |")
    gaps = [g for g in result["weight_gaps"].values() if g is not None]
    cpu = result["train_cpu_seconds"]
    lines += ["", f"N = {result['n_images_per_row']:,} concept images per row."]
    if gaps:
        lines += ["", f"Largest weight difference (max |joint − alone| over a bypass's tensors), {len(gaps)} of "
                  f"{len(result['weight_gaps'])} bypasses whose alone tuners are here: median {np.median(gaps):.1e}, "
                  f"largest {max(gaps):.1e}. The two trainings do the same arithmetic on other batch shapes (K·8 "
                  "rows against 8), so round-off differs in the last bits and drifts over the Adam steps; "
                  "tests/test_joint_data.py pins the equality to 1e-6 over 5 steps."]
    if cpu["joint"] and cpu["alone"]:
        k = len(result["concepts"])
        lines += ["", f"Training CPU time per seed (one thread): the joint run {cpu['joint']:.0f} s for {k} bypasses, "
                  f"the {k} alone runs {cpu['alone']:.0f} s together ({cpu['alone'] / cpu['joint']:.2f}x). Tasks on "
                  "their own data share the backbone pass but not its arithmetic (every row differs), so the saving "
                  "is the per-step overhead, not the FLOPs."]
    return "\n".join(lines) + "\n"


def train_cpu(folders: list[Path]) -> float | None:
    """The training CPU seconds of these runs together; None if one is not recorded."""
    seconds = [json.loads((f / "train_cpu.json").read_text())["cpu_seconds"] for f in folders
               if (f / "train_cpu.json").is_file()]
    return round(float(np.sum(seconds)), 1) if len(seconds) == len(folders) else None


def main(argv: list[str] | None = None) -> int:
    from bench.forgetting_tiny import chosen_lrs
    from restune_diffusion.world.scene import CONCEPTS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--concepts", nargs="+", default=list(CONCEPTS))
    p.add_argument("--steps", type=int, default=400, help="the quality table's budget")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--n_boot", type=int, default=2000)
    p.add_argument("--machine", default="this project's CPU machine (2 cores), one thread per run")
    p.add_argument("--quick", action="store_true", help="two concepts, one seed, 4 steps, tiny sets, lr 1e-2")
    args = p.parse_args(argv)
    global SEEDS, REPEATS
    out, concepts = Path(args.out), args.concepts
    if args.quick:
        concepts, SEEDS, REPEATS, args.steps, args.n_boot = concepts[:2], (0,), (1, 1, 1), 4, 50
        lr = 1e-2
    else:
        lr = chosen_lrs(out, [METHOD])[METHOD]
    start = time.time()
    runner = Runner(out, args.jobs, world_fingerprint(), args.quick)
    try:
        folders = {s: joint_run(runner, concepts, lr, s, args.steps) for s in SEEDS}
        alone_jobs = [runner.job(METHOD, c, lr, s, args.steps, k, REPEATS) for c in concepts
                      for k, s in enumerate(SEEDS)]
        joint_jobs = [joint_job(runner, folders[s], c, lr, s, args.steps, k) for c in concepts
                      for k, s in enumerate(SEEDS)]
        results = runner.run(alone_jobs + joint_jobs)
    finally:
        runner.close()
    ms = measurements(results)
    half = len(alone_jobs)
    alone, joint = {}, {}
    for r, m, i in zip(results, ms, range(len(results))):
        (alone if i < half else joint).setdefault(r["job"]["concept"], []).append(m)
    gaps = {f"{c}-seed{s}": weight_gap(folders[s] / "train" / c / "tuners.safetensors",
                                       Path(a["folder"]).parent / "train" / "tuners.safetensors")
            for a, (c, s) in zip(alone_jobs, [(c, s) for c in concepts for s in SEEDS])}
    alone_cpu = [train_cpu([Path(a["folder"]).parent for a in alone_jobs if a["spec"]["seed"] == s]) for s in SEEDS]
    joint_cpu = [train_cpu([folders[s]]) for s in SEEDS]
    result = {
        "method": METHOD, "lr": lr, "steps": args.steps, "seeds": list(SEEDS), "concepts": concepts,
        "n_images_per_row": int(sum(len(m.sets[f"concept:{r['job']['concept']}"]["all"])
                                    for r, m in zip(results[:half], ms[:half]))),
        "stats": compare(joint, alone, concepts, args.n_boot), "weight_gaps": gaps,
        "train_cpu_seconds": {"joint": float(np.mean(joint_cpu)) if None not in joint_cpu else None,
                              "alone": float(np.mean(alone_cpu)) if None not in alone_cpu else None},
        "meta": {"command": " ".join(["python bench/joint_tiny.py", *(argv if argv is not None else sys.argv[1:])]),
                 "machine": args.machine, "wall_seconds_this_call": round(time.time() - start),
                 "protocol": (f"{METHOD} at the quality table's LR ({lr:g}), {args.steps} steps at batch 8 per task; "
                              f"per training seed {list(SEEDS)} one joint run of {len(concepts)} bypasses "
                              f"({', '.join(concepts)}), each on its own concept's images, one backbone pass per "
                              f"step on the {len(concepts)}x8 rows; the alone runs are the quality table's. Run k "
                              f"judged on noise seed k: {12 * REPEATS[0]} concept, {30 * REPEATS[1]} pretraining-"
                              "prompt images per run. 95 % intervals: bootstrap over seeds then images, concepts as "
                              "strata; the difference paired (same prompts and noise).")},
    }
    write_outputs(out, "joint-tiny", result, markdown(result), lambda: None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
