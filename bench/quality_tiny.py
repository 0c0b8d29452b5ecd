"""The paper's SD v1.5 table in miniature, in the tiny world, with a ruler you can check (issues 14, 23).

    python bench/quality_tiny.py                         # every stage; resumes from what <out>/quality-tiny-runs has
    python bench/quality_tiny.py --stage sweep           # only the learning-rate sweep
    python bench/quality_tiny.py --quick --out /tmp/q    # the plumbing: two methods, one concept, a few steps

Protocol (restune_diffusion/world/protocol.py has the definitions):
- Every method is fine-tuned on each held-out concept (64 images, the same for all methods) for the same steps at
  batch 8 (configs/tiny/<method>.yaml), then judged on generated images of that concept (every colour x
  background), on the pretraining prompts (kept) and on the held-out colour x shape x background combinations.
- **Learning rate**: chosen per method on a validation protocol of its own: per LR point the first two concepts
  (star, heart) trained once each, with training seeds 100 and 101 (never reported), noise seed VALIDATION_NOISE,
  264 images per concept (528 per LR point), score = mean all-right accuracy over the two. (Two runs per point, not
  one per concept: the sweep is the bench's largest stage, and a learning rate is a method's setting, not a
  concept's.) The sweep walks a half-decade grid from 1e-4 to
  3e-1 until the best point has both neighbours measured, so the chosen LR is interior unless it sits at the grid's
  end (then said).
- **Reported runs**: training seeds 0, 1, 2 at the chosen LR; run k is judged on noise seed k, 384 images per
  concept (1,152 per method and concept); the base row on the same three noise seeds. 95 % intervals: bootstrap
  over training seeds, then images (FID: debiased); differences between methods: paired bootstrap.
- **Ceiling / floor**: real held-out renders of the same prompts through the autoencoder (what a perfect generator
  scores; for FID the floor at the same N); the untuned base.
- **Learning curves**: seed 0 at the chosen LR for 100, 200, 400, 800 and 1,600 steps, on the first two concepts.
- **Agreement**: the independent check judge's shape verdict beside the judge's on every generated image.

Each run is cached under <out>/quality-tiny-runs/<key> (key = method config, LR, seed, steps, concept, the world's
files): an interrupted bench resumes, a changed setting makes new runs. Runs go to `--jobs` worker processes, one
thread each. Writes <out>/quality-tiny.json and .md (and quality-tiny-curves.png).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/quality_tiny.py` from anywhere, without installing the package
    sys.path.insert(0, str(ROOT))

from bench.world_runs import (  # noqa: E402
    DEFAULT_JOB,
    DEFAULT_JOB_CONCEPT,
    DEFAULT_JOB_STEPS,
    Runner,
    measurements,
    method_style,
    world_fingerprint,
    write_outputs,
)
from restune_diffusion import methods as method_list  # noqa: E402

LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
SWEEP_START = (1e-3, 1e-2)
SWEEP_SEEDS, REPORT_SEEDS = (100, 101), (0, 1, 2)
VALIDATION_NOISE = 7  # the sweep's noise seed; reported run k uses noise seed k
CURVE_STEPS = (100, 200, 400, 800, 1600)
# the paper's rows, then every registered tuner with a tiny-world config
METHODS = method_list.methods(method_list.CONFIG_DIR / "tiny")
# images per prompt: 12 prompts (colour x background) per concept, 30 pretraining prompts, 6 held-out combinations
REPEATS = {"validation": (11, 0, 0), "report": (32, 8, 8), "curve": (8, 2, 2)}
CURVE_CONCEPTS = 2  # learning curves on the first two concepts
SWEEP_CONCEPTS = 2  # the sweep's validation runs: the first two concepts, one training seed each


# ---------------------------------------------------------------------------------------------------------------------
# stages
def sweep(runner: Runner, methods: list[str], concepts: list[str], steps: int, grid: tuple, start: tuple,
          seeds=SWEEP_SEEDS, repeats: tuple | None = None) -> dict:
    """Per method: {lr: validation score}, walked on the grid until the best point's neighbours are measured. Each
    LR point trains every concept once, concept i with seed seeds[i % 2] (both seeds, every concept; fewer concepts
    than seeds: each concept with every seed), and scores the mean all-right accuracy of their validation images."""
    repeats = repeats or REPEATS["validation"]
    scores: dict[str, dict[float, dict]] = {m: {} for m in methods}
    refs = {c: validation_reference(c, repeats[0]) for c in concepts}
    while True:
        wanted = {}
        for m in methods:
            if not scores[m]:
                wanted[m] = [lr for lr in start if lr in grid]
                continue
            best = max(scores[m], key=lambda lr: rank(scores[m][lr]))
            i = grid.index(best)
            wanted[m] = [grid[j] for j in (i - 1, i + 1) if 0 <= j < len(grid) and grid[j] not in scores[m]]
        wanted = {m: lrs for m, lrs in wanted.items() if lrs}
        if not wanted:
            return scores
        pairs = sweep_pairs(concepts, seeds)
        jobs = [runner.job(m, c, lr, s, steps, VALIDATION_NOISE, repeats)
                for m, lrs in wanted.items() for lr in lrs for c, s in pairs]
        results = iter(runner.run(jobs))
        for m, lrs in wanted.items():
            for lr in lrs:
                runs = [next(results) for _ in pairs]
                scores[m][lr] = {"all": float(np.mean([r["accuracy"][f"concept:{r['job']['concept']}"]
                                                       for r in runs])),
                                 "shape": float(np.mean([r["shape"][f"concept:{r['job']['concept']}"] for r in runs])),
                                 "domain_fid": validation_fid(runs, refs), "n": len(runs) * 12 * repeats[0]}
                print(f"  sweep {m:18} lr={lr:<7g} val all-right {scores[m][lr]['all']:.3f}", flush=True)


def sweep_pairs(concepts: list[str], seeds=SWEEP_SEEDS) -> list[tuple[str, int]]:
    """The (concept, training seed) runs of one LR point: concept i with seed i % 2 (both seeds, every concept);
    fewer concepts than seeds: each concept with every seed."""
    if len(concepts) >= len(seeds):
        return [(c, seeds[i % len(seeds)]) for i, c in enumerate(concepts)]
    return [(c, s) for c in concepts for s in seeds]


def validation_images(concepts: list[str], seeds=SWEEP_SEEDS) -> int:
    """Images judged per LR point: 12 prompts per concept x the sweep's repeats (2 x REPEATS["validation"]) per run."""
    return len(sweep_pairs(concepts, seeds)) * 12 * 2 * REPEATS["validation"][0]


def rank(score: dict) -> tuple:
    """An LR point's standing: all-right accuracy, then concept drawn, then the lower domain FID (what still orders
    the points where a method draws the concept in none of the validation images)."""
    return score["all"], score["shape"], -score.get("domain_fid", 0.0)


def validation_reference(concept: str, repeats: int):
    """The Gaussian of the judge's features of real renders of the validation prompts (the domain FID's
    reference)."""
    from restune_diffusion.metrics.fid import Gaussian
    from restune_diffusion.world import protocol
    from restune_diffusion.world.report import load_judges
    from restune_diffusion.world.scene import prompt_grid

    asked = prompt_grid((concept,), repeats)
    return Gaussian.of(protocol.hits(load_judges()[0], protocol.reference_images(concept, asked, "reference"),
                                     asked)["features"])


def validation_fid(runs: list[dict], refs: dict) -> float:
    """Mean over an LR point's runs of the domain FID of its validation images against the concept's references."""
    from restune_diffusion.world import protocol

    fids = [protocol.frechet(refs[r["job"]["concept"]], m.sets[f"concept:{r['job']['concept']}"]["features"])
            for r, m in zip(runs, measurements(runs))]
    return round(float(np.mean(fids)), 3)


def chosen_lr(scores: dict[float, dict], grid: tuple) -> tuple[float, str]:
    best = max(scores, key=lambda lr: rank(scores[lr]))
    edge = best in (grid[0], grid[-1])
    note = "at the grid's end: the sweep cannot go further" if edge else "interior"
    if max(s["shape"] for s in scores.values()) == 0:
        note += "; no LR drew the concept in any validation image: chosen by domain FID"
    return best, note


def report_jobs(runner: Runner, methods: list[str], concepts: list[str], lrs: dict, steps: int,
                seeds=REPORT_SEEDS) -> tuple[list, list[dict]]:
    """Keys (method, concept, k) and jobs, concept by concept, seed by seed: an interrupted stage leaves every method
    measured on the same concepts."""
    keys, jobs = [], []
    for c in concepts:
        for k, s in enumerate(seeds):
            for m in ["base", *methods]:
                keys.append((m, c, k))
                jobs.append(runner.job(m, c, lrs.get(m, 0.0), s, steps, k, REPEATS["report"]))
    return keys, jobs


def report_runs(runner: Runner, methods: list[str], concepts: list[str], lrs: dict, steps: int,
                seeds=REPORT_SEEDS) -> dict:
    """{(method, concept): [result of seed k judged on noise seed k]}; the base once per noise seed."""
    keys, jobs = report_jobs(runner, methods, concepts, lrs, steps, seeds)
    results = dict(zip(keys, runner.run(jobs)))
    return {(m, c): [results[m, c, k] for k in range(len(seeds))] for m in ["base", *methods] for c in concepts}


def curve_jobs(runner: Runner, methods: list[str], concepts: list[str], lrs: dict, curve_steps) -> tuple[list, list]:
    keys, jobs = [], []
    for m in methods:
        for c in concepts:
            for n in curve_steps:
                keys.append((m, c, n))
                jobs.append(runner.job(m, c, lrs[m], REPORT_SEEDS[0], n, 0, REPEATS["curve"]))
    return keys, jobs


def curve_runs(runner: Runner, methods: list[str], concepts: list[str], lrs: dict, curve_steps) -> dict:
    keys, jobs = curve_jobs(runner, methods, concepts, lrs, curve_steps)
    return dict(zip(keys, runner.run(jobs)))


def measured_so_far(runner: Runner, methods: list[str], concepts: list[str], lrs: dict, steps: int) -> tuple:
    """For `--stage partial`: the concepts on which every row's reported runs are cached, and the methods whose
    learning curves are; nothing is trained."""
    done = [c for c in concepts if runner.cached(report_jobs(runner, methods, [c], lrs, steps)[1])]
    curved = [m for m in methods
              if runner.cached(curve_jobs(runner, [m], concepts[:CURVE_CONCEPTS], lrs, CURVE_STEPS)[1])]
    return done, curved


def write_sweep(out: Path, scores: dict, concepts: list[str], steps: int) -> Path:
    """quality-tiny-sweep.json: each method's validation scores and chosen LR, as soon as the sweep ends (the
    forgetting bench reads it; the report stage need not have run)."""
    from restune_diffusion.files import atomic_write_text

    path = out / "quality-tiny-sweep.json"
    methods = {}
    for m, s in scores.items():
        lr, note = chosen_lr(s, LR_GRID)
        methods[m] = {"chosen_lr": lr, "note": note, "scores": {str(k): v for k, v in sorted(s.items())}}
    if path.is_file():  # a sweep of some methods keeps the others' choices
        methods = {**json.loads(path.read_text()).get("methods", {}), **methods}
    atomic_write_text(path, json.dumps({
        "concepts": concepts, "seeds": list(SWEEP_SEEDS), "validation_noise": VALIDATION_NOISE, "steps": steps,
        "lr_grid": list(LR_GRID), "score": "mean all-right accuracy of the validation images", "methods": methods},
        indent=1) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# the numbers
def reference_sets(concepts: list[str], n_per_seed: int, seeds: int) -> dict:
    """Per concept: the real reference renders' judge features (domain FID / KID against them), and the ceiling:
    real held-out renders of the same prompts through the autoencoder, as `seeds` clusters. The reference's Gaussian
    is computed once (`reference_stats`): the bootstrap compares thousands of resamples with it."""
    from restune_diffusion.metrics.fid import Gaussian
    from restune_diffusion.models import load_model
    from restune_diffusion.world import protocol
    from restune_diffusion.world.report import load_judges
    from restune_diffusion.world.scene import prompt_grid

    sd, (judge, check) = load_model("tiny"), load_judges()
    out = {}
    for c in concepts:
        asked = prompt_grid((c,), n_per_seed // 12)
        ref = protocol.reference_images(c, asked * seeds, "reference")
        ref_features = protocol.hits(judge, ref, asked * seeds)["features"]
        top = protocol.ceiling(judge, sd.vae, c, asked * seeds)
        check_top = protocol.hits(check, top.images, asked * seeds)
        split = lambda v: np.split(v, seeds)  # noqa: E731
        out[c] = {"reference": ref_features, "reference_stats": Gaussian.of(ref_features),
                  "ceiling": {k: split(v) for k, v in top.hits.items()},
                  "check_ceiling_shape": split(check_top["shape"])}
    return out


def ci(value: tuple[float, float, float], digits: int = 3) -> dict:
    return {"mean": round(value[0], digits), "ci95": [round(value[1], digits), round(value[2], digits)]}


def row_stats(ms: list, concepts: list[str], refs: dict, n_boot: int) -> dict:
    """One method's numbers: per concept and over concepts (the mean of the concepts, strata in the bootstrap)."""
    from restune_diffusion.world import protocol

    def per(head: str, c: str) -> list[np.ndarray]:
        return [m.sets[f"concept:{c}"][head] for m in ms[c]]

    def fid_of(k: int, features: np.ndarray, cs=concepts) -> float:
        return protocol.frechet(refs[cs[k]]["reference_stats"], features)

    def kid_of(k: int, features: np.ndarray, cs=concepts) -> float:
        return protocol.kid(refs[cs[k]]["reference"], features)

    row = {"concepts": {}}
    for c in concepts:
        one = [c]
        feats = [per("features", c)]
        row["concepts"][c] = {
            "n": int(sum(len(x) for x in feats[0])),
            "concept_drawn": ci(protocol.bootstrap([per("shape", c)], n_boot=n_boot)),
            "all_right": ci(protocol.bootstrap([per("all", c)], n_boot=n_boot)),
            "domain_fid": ci(protocol.bootstrap(feats, statistic=lambda k, f, cs=one: fid_of(k, f, cs),
                                                n_boot=n_boot // 4, debias=True), 2),
            "kid": ci(protocol.bootstrap(feats, statistic=lambda k, f, cs=one: kid_of(k, f, cs),
                                              n_boot=n_boot // 20, debias=True), 2),
            "kept": ci(protocol.bootstrap([[m.sets["kept"]["all"] for m in ms[c]]], n_boot=n_boot)),
            "check_concept_drawn": round(float(np.mean(np.concatenate(per("check_shape", c)))), 3),
            "judges_agree": round(float(np.mean(np.concatenate(per("agree", c)))), 3),
        }
    strata = lambda head: [per(head, c) for c in concepts]  # noqa: E731
    row["mean"] = {
        "n": int(sum(row["concepts"][c]["n"] for c in concepts)),
        "concept_drawn": ci(protocol.bootstrap(strata("shape"), n_boot=n_boot)),
        "all_right": ci(protocol.bootstrap(strata("all"), n_boot=n_boot)),
        "domain_fid": ci(protocol.bootstrap(strata("features"), statistic=fid_of, n_boot=n_boot // 4, debias=True),
                         2),
        "kept": ci(protocol.bootstrap([[m.sets["kept"]["all"] for m in ms[c]] for c in concepts], n_boot=n_boot)),
        "heldout_combos": ci(protocol.bootstrap([[m.sets["heldout_combos"]["all"] for m in ms[c]]
                                                 for c in concepts], n_boot=n_boot)),
        "judges_agree": round(float(np.mean([row["concepts"][c]["judges_agree"] for c in concepts])), 3),
        "check_concept_drawn": round(float(np.mean([row["concepts"][c]["check_concept_drawn"] for c in concepts])),
                                     3),
    }
    return row


def ceiling_row(refs: dict, concepts: list[str], n_boot: int) -> dict:
    from restune_diffusion.world import protocol

    row = {"concepts": {}}
    for c in concepts:
        top = refs[c]["ceiling"]
        row["concepts"][c] = {"n": int(sum(len(x) for x in top["shape"])),
                              "concept_drawn": ci(protocol.bootstrap([top["shape"]], n_boot=n_boot)),
                              "all_right": ci(protocol.bootstrap([top["all"]], n_boot=n_boot)),
                              "domain_fid": ci(protocol.bootstrap(
                                  [top["features"]], statistic=lambda k, f, c=c: protocol.frechet(
                                      refs[c]["reference_stats"], f), n_boot=n_boot // 4, debias=True), 2),
                              "kid": round(protocol.kid(refs[c]["reference"],
                                                                   np.concatenate(top["features"])), 2),
                              "check_concept_drawn": round(float(np.mean(np.concatenate(
                                  refs[c]["check_ceiling_shape"]))), 3)}
    row["mean"] = {key: round(float(np.mean([row["concepts"][c][key]["mean"] for c in concepts])), 3)
                   for key in ("concept_drawn", "all_right", "domain_fid")}
    return row


def comparisons(ms: dict, methods: list[str], concepts: list[str], refs: dict, n_boot: int) -> dict:
    """Paired differences between every two rows: all-right accuracy (a - b) and domain FID (a - b)."""
    from restune_diffusion.world import protocol

    def fid_of(k, f):
        return protocol.frechet(refs[concepts[k]]["reference_stats"], f)

    out = {}
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            acc = [[m.sets[f"concept:{c}"]["all"] for m in ms[a][c]] for c in concepts], \
                  [[m.sets[f"concept:{c}"]["all"] for m in ms[b][c]] for c in concepts]
            feats = [[m.sets[f"concept:{c}"]["features"] for m in ms[a][c]] for c in concepts], \
                    [[m.sets[f"concept:{c}"]["features"] for m in ms[b][c]] for c in concepts]
            out[f"{a} - {b}"] = {"all_right": ci(protocol.bootstrap(acc[0], acc[1], n_boot=n_boot)),
                                 "domain_fid": ci(protocol.bootstrap(feats[0], feats[1], statistic=fid_of,
                                                                     n_boot=n_boot // 4, debias=True), 2)}
    return out


def verdict(diff: dict, lower_is_better: bool) -> str:
    lo, hi = diff["ci95"]
    if lo > 0:
        return "worse" if lower_is_better else "better"
    if hi < 0:
        return "better" if lower_is_better else "worse"
    return "not distinguishable"


def paper_orderings(table: dict, methods: list[str]) -> list[dict]:
    """Each pair the paper orders by FID (a below b), and what our paired interval says of a vs b."""
    from restune_diffusion.paper import PAPER

    rows = []
    ranked = [m for m in sorted(PAPER, key=lambda m: PAPER[m]["fid"]) if m in ["base", *methods]]
    order = ["base", *methods]
    for i, a in enumerate(ranked):
        for b in ranked[i + 1:]:
            key, sign = (f"{a} - {b}", 1) if order.index(a) < order.index(b) else (f"{b} - {a}", -1)
            diff = table["comparisons"][key]
            flip = lambda d, sign=sign: {"mean": sign * d["mean"], "ci95": sorted(sign * x for x in d["ci95"])}  # noqa: E731
            rows.append({"paper": f"{a} < {b} (FID {PAPER[a]['fid']} < {PAPER[b]['fid']})",
                         "fid": verdict(flip(diff["domain_fid"]), lower_is_better=True),
                         "accuracy": verdict(flip(diff["all_right"]), lower_is_better=False),
                         "fid_difference": flip(diff["domain_fid"]), "accuracy_difference": flip(diff["all_right"])})
    return rows


def _cell(d: dict, digits: int = 3) -> str:
    return f"{d['mean']:.{digits}f} [{d['ci95'][0]:.{digits}f}, {d['ci95'][1]:.{digits}f}]"


def headline_markdown(table: dict) -> str:
    """The headline table (README's copy is checked against this by a test)."""
    lines = ["| method | LR | params | concept drawn ↑ | all attributes right ↑ | domain FID ↓ | pretraining prompts "
             "(kept) ↑ | held-out combinations ↑ |", "|---|---|---|---|---|---|---|---|"]
    top = table["ceiling"]["mean"]
    lines.append(f"| ceiling (real images through the autoencoder) | – | – | {top['concept_drawn']:.3f} | "
                 f"{top['all_right']:.3f} | {top['domain_fid']:.2f} (floor) | – | – |")
    for name, row in table["rows"].items():
        m = row["mean"]
        lr = f"{row['lr']:g}" + ("*" if row.get("lr_note", "interior") != "interior" else "") if row["lr"] else "–"
        lines.append(f"| {name} | {lr} | {row['params']:,} | {_cell(m['concept_drawn'])} | {_cell(m['all_right'])} | "
                     f"{_cell(m['domain_fid'], 1)} | {_cell(m['kept'])} | {_cell(m['heldout_combos'])} |")
    return "\n".join(lines)


def significance_matrix(table: dict, key: str, lower_is_better: bool) -> list[str]:
    """Every two rows compared on `key` by their paired interval (table["comparisons"] holds each pair once)."""
    names = list(table["rows"])
    mark = {"better": "+", "worse": "−", "not distinguishable": "·"}
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for a in names:
        cells = []
        for b in names:
            if a == b:
                cells.append("")
                continue
            d = table["comparisons"][f"{a} - {b}"][key] if f"{a} - {b}" in table["comparisons"] else \
                {"ci95": [-x for x in reversed(table["comparisons"][f"{b} - {a}"][key]["ci95"])]}
            cells.append(mark[verdict(d, lower_is_better)])
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return lines


def markdown(table: dict) -> str:
    meta = table["meta"]
    concepts = meta["concepts"]
    lines = ["# Quality in the tiny world (issues 14, 23)", "", *([f"**{meta['partial']}**", ""] if "partial" in meta
                                                                 else []), f"Command: `{meta['command']}`", "",
             f"Machine: {meta['machine']}. CPU time of the runs: {meta['cpu_hours']:.2f} h ({meta['runs']} runs).", "",
             meta["protocol"], "", "## Mean over the concepts " + ", ".join(concepts), "", headline_markdown(table),
             "",
             "95 % intervals in brackets (bootstrap over training seeds, then images; the concepts as strata). "
             "`*`: the chosen LR sits at the end of the sweep's grid.", "", "## Per concept", ""]
    for c in concepts:
        lines += [f"### {c}", "", "| method | N | concept drawn | all right | domain FID | domain KID | kept | "
                  "check judge: drawn | judges agree |", "|---|---|---|---|---|---|---|---|---|"]
        top = table["ceiling"]["concepts"][c]
        lines.append(f"| ceiling | {top['n']} | {_cell(top['concept_drawn'])} | {_cell(top['all_right'])} | "
                     f"{_cell(top['domain_fid'], 1)} | {top['kid']:.2f} | – | "
                     f"{top['check_concept_drawn']:.3f} | – |")
        for name, row in table["rows"].items():
            r = row["concepts"][c]
            lines.append(f"| {name} | {r['n']} | {_cell(r['concept_drawn'])} | {_cell(r['all_right'])} | "
                         f"{_cell(r['domain_fid'], 1)} | {_cell(r['kid'], 2)} | {_cell(r['kept'])} | "
                         f"{r['check_concept_drawn']:.3f} | {r['judges_agree']:.3f} |")
        lines.append("")
    lines += ["## Learning-rate sweep (validation protocol)", "", "| method | " +
              " | ".join(f"{lr:g}" for lr in LR_GRID) + " | chosen |", "|---|" + "---|" * (len(LR_GRID) + 1)]
    for name, row in table["rows"].items():
        if not row["lr"]:
            continue
        cells = [f"{row['sweep'][str(lr)]['all']:.3f}" if str(lr) in row["sweep"] else "" for lr in LR_GRID]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['lr']:g} ({row['lr_note']}) |")
    lines += ["", f"## Learning curves (seed 0, chosen LR; all-right accuracy, mean over "
              f"{', '.join(meta['curve_concepts'])})", "",
              "| method | " + " | ".join(str(n) for n in meta["curve_steps"]) + " |",
              "|---|" + "---|" * len(meta["curve_steps"])]
    for name, curve in table["curves"].items():
        lines.append(f"| {name} | " + " | ".join(f"{curve[str(n)]['all_right']:.3f}" for n in meta["curve_steps"]) +
                     " |")
    for key, title, lower in (("all_right", "all-right accuracy", False), ("domain_fid", "domain FID", True)):
        lines += ["", f"## Which differences are significant: {title}", "",
                  "Row vs column, paired 95 % interval of the difference: `+` the row is better, `−` worse, `·` not "
                  "distinguishable.", "", *significance_matrix(table, key, lower)]
    lines += ["", "## The paper's FID orderings, here", "",
              "| paper | domain FID here | all-right accuracy here |", "|---|---|---|"]
    for o in table["paper_orderings"]:
        lines.append(f"| {o['paper']} | {o['fid']} ({_cell(o['fid_difference'], 1)}) | {o['accuracy']} "
                     f"({_cell(o['accuracy_difference'])}) |")
    lines += ["", "A miniature world ranks methods at equal budget on a task where quality is measured; it says "
              "nothing about SD v1.5's absolute FID (another model, data, feature network and N)."]
    return "\n".join(lines) + "\n"


def plot_curves(table: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from restune_diffusion.files import atomic_write

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    steps = table["meta"]["curve_steps"]
    for i, (name, curve) in enumerate(table["curves"].items()):
        ax.plot(steps, [curve[str(n)]["all_right"] for n in steps], label=name, **method_style(i))
    curve_concepts = table["meta"]["curve_concepts"]  # the ceiling of the concepts the curves are measured on
    ax.axhline(float(np.mean([table["ceiling"]["concepts"][c]["all_right"]["mean"] for c in curve_concepts])),
               color="k", linestyle="--", label="ceiling")
    ax.set_xscale("log")
    ax.set_xlabel("training steps")
    ax.set_ylabel(f"all-right accuracy (mean over {', '.join(curve_concepts)})")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--concepts", nargs="+", default=None, help="default: every concept of the world")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--stage", choices=("sweep", "report", "curves", "all", "default_job", "partial"), default="all",
                   help="default_job: the LR of `python train_t2i.py` (configs/tiny_demo.yaml, 500 steps on the "
                        "star) chosen on the same validation protocol; partial: trains nothing, writes "
                        "quality-tiny-partial.md/json from the concepts (and curves) measured so far")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (one thread each)")
    p.add_argument("--n_boot", type=int, default=2000)
    p.add_argument("--machine", default="this project's CPU machine (2 cores), one thread per run")
    p.add_argument("--quick", action="store_true", help="two methods, one concept, 4 steps, small sets")
    args = p.parse_args(argv)
    from restune_diffusion.world.scene import CONCEPTS

    concepts = args.concepts or list(CONCEPTS)
    global LR_GRID, SWEEP_START, REPEATS, CURVE_STEPS
    if args.quick:
        args.methods, concepts, args.steps, args.n_boot = ["lora", "res_tuning"], concepts[:1], 4, 40
        LR_GRID, SWEEP_START, CURVE_STEPS = (1e-3, 1e-2), (1e-3, 1e-2), (2, 4)
        REPEATS = {"validation": (1, 0, 0), "report": (2, 1, 1), "curve": (1, 1, 1)}
    sweep_concepts, curve_concepts, all_concepts = concepts[:SWEEP_CONCEPTS], concepts[:CURVE_CONCEPTS], concepts
    partial = args.stage == "partial"
    out = Path(args.out)
    runner = Runner(out, args.jobs, world_fingerprint(), args.quick)
    start = time.time()
    try:
        if args.stage == "default_job":
            # one concept: both training seeds, twice the images per run (528 validation images per LR point)
            scores = sweep(runner, [DEFAULT_JOB], [DEFAULT_JOB_CONCEPT], DEFAULT_JOB_STEPS, LR_GRID, SWEEP_START,
                           repeats=(2 * REPEATS["validation"][0], 0, 0))
            lr, note = chosen_lr(scores[DEFAULT_JOB], LR_GRID)
            from restune_diffusion.files import atomic_write_text

            atomic_write_text(out / "default-job-sweep.json", json.dumps({
                "config": "configs/tiny_demo.yaml", "concept": DEFAULT_JOB_CONCEPT, "steps": DEFAULT_JOB_STEPS,
                "seeds": list(SWEEP_SEEDS), "validation_noise": VALIDATION_NOISE, "chosen_lr": lr, "note": note,
                "scores": {str(k): v for k, v in scores[DEFAULT_JOB].items()}}, indent=1))
            print(f"default job: lr {lr:g} ({note})")
            return 0
        print("sweep", flush=True)
        runner.measure = args.stage != "partial"
        scores = sweep(runner, args.methods, concepts[:SWEEP_CONCEPTS], args.steps, LR_GRID, SWEEP_START,
                       repeats=(2 * REPEATS["validation"][0], 0, 0))
        lrs = {m: chosen_lr(scores[m], LR_GRID)[0] for m in args.methods}
        write_sweep(out, scores, concepts[:SWEEP_CONCEPTS], args.steps)
        if args.stage == "sweep":
            return 0
        if args.stage in ("report", "all"):
            print("reported runs", flush=True)
            reported = report_runs(runner, args.methods, concepts, lrs, args.steps)
        if args.stage in ("curves", "all"):
            print("learning curves", flush=True)
            curves = curve_runs(runner, args.methods, concepts[:CURVE_CONCEPTS], lrs, CURVE_STEPS)
        if args.stage == "partial":
            done, curved = measured_so_far(runner, args.methods, concepts, lrs, args.steps)
            if not done:
                raise SystemExit("--stage partial: no concept has every row's reported runs cached yet "
                                 "(run --stage report)")
            print(f"partial: concepts {done}, learning curves of {curved or 'no method'}", flush=True)
            curves = curve_runs(runner, curved, concepts[:CURVE_CONCEPTS], lrs, CURVE_STEPS)
            concepts = done
            reported = report_runs(runner, args.methods, concepts, lrs, args.steps)
        elif args.stage != "all":
            return 0
    finally:
        runner.close()
    print("statistics", flush=True)
    n_seed = 12 * REPEATS["report"][0]
    refs = reference_sets(concepts, n_seed, len(REPORT_SEEDS))
    ms = {m: {c: measurements(reported[(m, c)]) for c in concepts} for m in ["base", *args.methods]}
    rows = {}
    for m in ["base", *args.methods]:
        first = reported[(m, concepts[0])][0]
        lr, note = (chosen_lr(scores[m], LR_GRID) if m != "base" else (0.0, ""))
        rows[m] = {"lr": lr, "lr_note": note, "params": first.get("params") or 0,
                   "sweep": {str(k): v for k, v in scores.get(m, {}).items()}, **row_stats(ms[m], concepts, refs,
                                                                                           args.n_boot)}
    table = {"rows": rows, "ceiling": ceiling_row(refs, concepts, args.n_boot),
             "comparisons": comparisons(ms, ["base", *args.methods], concepts, refs, args.n_boot)}
    table["paper_orderings"] = paper_orderings(table, args.methods)
    curved = [m for m in args.methods if (m, curve_concepts[0], CURVE_STEPS[0]) in curves]
    table["curves"] = {m: {str(n): {"all_right": float(np.mean([curves[(m, c, n)]["accuracy"][f"concept:{c}"]
                                                               for c in curve_concepts])),
                                    "kept": float(np.mean([curves[(m, c, n)]["accuracy"]["kept"]
                                                           for c in curve_concepts]))}
                           for n in CURVE_STEPS} for m in curved}
    all_results = [r for rs in reported.values() for r in rs] + list(curves.values())
    cpu = sum(r["cpu_seconds_to_make"] for r in all_results)  # training + generation + judging of every run used
    from restune_diffusion.world import protocol

    table["meta"] = {
        "command": " ".join(["python bench/quality_tiny.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": args.machine, "cpu_hours": cpu / 3600, "runs": len(all_results), "concepts": concepts,
        "all_concepts": all_concepts,
        "methods": args.methods, "steps": args.steps, "report_seeds": list(REPORT_SEEDS),
        "sweep_seeds": list(SWEEP_SEEDS), "sweep_concepts": sweep_concepts,
        "curve_concepts": curve_concepts,
        "validation_noise": VALIDATION_NOISE, "lr_grid": list(LR_GRID),
        "repeats": REPEATS, "curve_steps": list(CURVE_STEPS), "world": runner.world, "n_boot": args.n_boot,
        "wall_seconds_this_call": round(time.time() - start),
        "sampling": {"steps": protocol.SAMPLING_STEPS, "guidance_scale": protocol.GUIDANCE_SCALE,
                     "scheduler": "DDIM"},
        "protocol": (f"Each method fine-tuned on each concept ({len(concepts)}) with {args.steps} steps at batch 8 on "
                     f"64 images; seeds {list(REPORT_SEEDS)} at the LR chosen on validation "
                     f"({', '.join(sweep_concepts)} with seeds {list(SWEEP_SEEDS)}, noise seed "
                     f"{VALIDATION_NOISE}, {validation_images(sweep_concepts)} images per LR point); "
                     f"run k judged on noise seed k, "
                     f"{n_seed} images per concept and seed ({n_seed * len(REPORT_SEEDS)} per method and concept). "
                     f"Judge: the world's judge (autoencoder round trips, explicit 'none'); the check judge "
                     f"(independent) beside it. Domain FID / KID: the judge's 64-d features vs real renders of the "
                     f"same prompts. Kept: the 30 pretraining prompts x {REPEATS['report'][1]}; held-out "
                     f"combinations: 6 x {REPEATS['report'][2]}. Sampling: DDIM {protocol.SAMPLING_STEPS} steps, "
                     f"guidance {protocol.GUIDANCE_SCALE}. Learning curves: seed 0, {', '.join(curve_concepts)}, "
                     f"{12 * REPEATS['curve'][0]} concept images each."),
    }
    stem = "quality-tiny-partial" if partial else "quality-tiny"
    if partial:
        table["meta"]["partial"] = (f"PARTIAL: what is measured so far: {', '.join(concepts)} of the "
                                    f"{len(all_concepts)} concepts ({', '.join(all_concepts)}); learning curves of "
                                    f"{len(table['curves'])} of "
                                    f"{len(args.methods)} methods. Not the finished table (quality-tiny.md).")
    write_outputs(out, stem, table, markdown(table), lambda: plot_curves(table, out / f"{stem}-curves.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
