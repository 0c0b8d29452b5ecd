"""The paper's SD v1.5 table in miniature, in the tiny world (issue 14): every method fine-tuned on the held-out
concept with the same data, steps, seeds and budget, then scored on the same held-out prompts and seeds.

    python bench/quality_tiny.py                          # every row: LR sweep on seed 0, then seeds 0-2 (~2-3 h CPU)
    python bench/quality_tiny.py --quick --out /tmp/q     # the plumbing: res_tuning + base, 2 steps, one seed

Each training run is `train_t2i.py --config configs/tiny/<method>.yaml` in its own process (peak memory per run);
runs are resumable (a run with a result.json is not repeated). The learning rate of every method is chosen from the
same sweep by a validation score: prompt accuracy on the concept's prompts with other generation seeds (ties: lower
validation domain FID against the concept's training images), never by the reported test numbers.
Writes <out>/quality-tiny.json and <out>/quality-tiny.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/quality_tiny.py` from anywhere, without installing the package
    sys.path.insert(0, str(ROOT))

from restune_diffusion import world  # noqa: E402
from restune_diffusion.files import atomic_write_text  # noqa: E402
from restune_diffusion.methods import BASE, methods  # noqa: E402
from restune_diffusion.models import TINY, load_model  # noqa: E402
from restune_diffusion.paper import PAPER as PAPER_TABLE  # noqa: E402
from restune_diffusion.weights import load_tuners  # noqa: E402

METHODS = (BASE, *methods())  # the untuned base, then every method (restune_diffusion.methods)
# the paper's (FID, params M) per method; its base row has no trainable parameters; SC-Tuner and the baselines
# built by peft (dora, loha, lokr, oft) are not in its table
PAPER = {name: (PAPER_TABLE[name]["fid"], PAPER_TABLE[name]["params_m"] or 0) if name in PAPER_TABLE else (None, None)
         for name in METHODS}
LEARNING_RATES = (1e-3, 3e-3, 1e-2)  # the demo's tuners do best at 5e-3 to 1e-2 in 400 steps
SEEDS = (0, 1, 2)
TEST_SEED, VALIDATION_SEED = 0, 1  # generation noise of the reported numbers / of the LR choice


def run_training(method: str, lr: float, seed: int, steps: int, data_dir: Path, run_dir: Path) -> dict:
    """train_t2i.py in a fresh process; returns its summary.json."""
    cmd = [sys.executable, str(ROOT / "train_t2i.py"), "--config", str(ROOT / "configs" / "tiny" / f"{method}.yaml"),
           "--data_dir", str(data_dir), "--output_dir", str(run_dir), "--learning_rate", repr(lr), "--seed", str(seed),
           "--max_train_steps", str(steps)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{method} lr={lr} seed={seed}: train_t2i.py failed:\n{done.stderr[-3000:]}")
    return json.loads((run_dir / "summary.json").read_text())


def evaluate_run(tuners: Path | None, classifier, repeats: int) -> dict:
    """Test and validation scores of the base with `tuners` (None: the base itself)."""
    sd = load_model(TINY)
    if tuners is not None:
        load_tuners(sd.unet, tuners)
    test, _ = world.score(sd, classifier, seed=TEST_SEED, repeats=repeats)
    asked = world.prompt_grid((world.CONCEPT,), repeats)
    images = world.generate(sd, [a.caption for a in asked], seed=VALIDATION_SEED, steps=world.SAMPLING_STEPS,
                            guidance_scale=world.GUIDANCE_SCALE)
    train_images = world.render_batch(world.examples("concept_train", world.CONCEPT_TRAIN_N))
    validation = {"accuracy": world.prompt_accuracy(classifier, images, asked)["all"],
                  "domain_fid": world.domain_fid(classifier, train_images, images)}
    return {"test": test, "validation": validation}


def one_run(method: str, lr: float, seed: int, args, data_dir: Path, classifier) -> dict:
    run_dir = Path(args.out) / "runs" / f"{method}_lr{lr:g}_seed{seed}"
    result_file = run_dir / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    if method == "base":
        summary = {"trainable_params": 0, "peak_memory_bytes": None, "train_seconds": 0.0, "steps_run": 0}
        tuners = None
    else:
        summary = run_training(method, lr, seed, args.steps, data_dir, run_dir)
        tuners = run_dir / "tuners.safetensors"
    result = {"method": method, "lr": lr, "seed": seed, "steps": args.steps, **evaluate_run(tuners, classifier,
                                                                                              args.repeats),
              "params": summary["trainable_params"], "peak_memory_bytes": summary["peak_memory_bytes"],
              "train_seconds": summary["train_seconds"], "steps_run": summary["steps_run"]}
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(result_file, json.dumps(result, indent=1))
    print(f"{method:18} lr={lr:<8g} seed={seed}  acc={result['test']['concept_accuracy']['all']:.3f}  "
          f"FID={result['test']['concept_domain_fid']:.2f}  val_acc={result['validation']['accuracy']:.3f}",
          flush=True)
    return result


def mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def method_row(method: str, args, data_dir: Path, classifier) -> dict:
    """LR sweep on the first seed (chosen by validation score), then every seed at the chosen LR."""
    lrs = [0.0] if method == "base" else args.learning_rates
    sweep = [one_run(method, lr, args.seeds[0], args, data_dir, classifier) for lr in lrs]
    best = max(sweep, key=lambda r: (r["validation"]["accuracy"], -r["validation"]["domain_fid"]))
    runs = [one_run(method, best["lr"], s, args, data_dir, classifier) for s in args.seeds]
    acc = mean_spread([r["test"]["concept_accuracy"]["all"] for r in runs])
    fid = mean_spread([r["test"]["concept_domain_fid"] for r in runs])
    kept = mean_spread([r["test"]["pretrain_accuracy"]["all"] for r in runs])
    peaks = [r["peak_memory_bytes"] for r in runs if r["peak_memory_bytes"]]
    steps = sum(r["steps_run"] for r in runs)
    return {"method": method, "lr": best["lr"], "params": runs[0]["params"], "concept_accuracy": acc,
            "domain_fid": fid, "pretrain_accuracy": kept, "peak_memory_gib": max(peaks) / 2**30 if peaks else None,
            "seconds_per_step": sum(r["train_seconds"] for r in runs) / steps if steps else None,
            "paper_fid": PAPER[method][0], "paper_params_m": PAPER[method][1],
            "sweep": [{"lr": r["lr"], **r["validation"]} for r in sweep]}


def rank_cell(method: str, ours: dict, paper: dict) -> str:
    """'2 / 5': the method's place by domain FID among the paper's rows, and by the paper's FID ('-' off the table)."""
    return f"{ours[method]} / {paper[method]}" if method in ours else "-"


def markdown(rows: list[dict], meta: dict) -> str:
    def pm(pair: tuple[float, float], digits: int) -> str:
        return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"

    ranked = [r for r in rows if r["paper_fid"] is not None]
    ours = {r["method"]: i + 1 for i, r in enumerate(sorted(ranked, key=lambda r: r["domain_fid"][0]))}
    paper = {r["method"]: i + 1 for i, r in enumerate(sorted(ranked, key=lambda r: r["paper_fid"]))}
    lines = ["# Quality in the tiny world (issue 14)", "", f"Command: `{meta['command']}`", "",
             f"Held-out concept '{world.CONCEPT}': {meta['repeats'] * 12} images per run (every colour x background, "
             f"{meta['repeats']} seeds each), {meta['steps']} steps at batch 8 on {world.CONCEPT_TRAIN_N} training "
             f"images, seeds {meta['seeds']}, LR chosen per method from {meta['learning_rates']} by validation "
             f"score. Mean ± standard deviation over seeds. Domain FID: the attribute classifier's "
             f"{meta['feature_dim']}-d penultimate features, torchmetrics FID. Paper: SD v1.5 on COCO2017.", "",
             "| method | LR | params | concept accuracy | domain FID | pretraining-prompt accuracy | peak memory "
             "(GiB) | s/step | paper FID | paper params (M) | FID rank: ours / paper |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        memory = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] else "-"
        speed = f"{r['seconds_per_step']:.3f}" if r["seconds_per_step"] else "-"
        lr = f"{r['lr']:g}" if r["method"] != "base" else "-"
        lines.append(f"| {r['method']} | {lr} | {r['params']:,} | {pm(r['concept_accuracy'], 3)} | "
                     f"{pm(r['domain_fid'], 2)} | {pm(r['pretrain_accuracy'], 3)} | {memory} | {speed} | "
                     f"{r['paper_fid'] if r['paper_fid'] is not None else '-'} | "
                     f"{r['paper_params_m'] if r['paper_params_m'] is not None else '-'} | "
                     f"{rank_cell(r['method'], ours, paper)} |")
    if meta.get("note"):
        lines += ["", meta["note"]]
    lines += ["", "A miniature world ranks methods at equal budget on a task where quality is measurable; it says "
              "nothing about SD v1.5's absolute FID (other model, data, feature network and N)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--learning_rates", nargs="+", type=float, default=list(LEARNING_RATES))
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--repeats", type=int, default=world.EVAL_REPEATS, help="images per concept prompt")
    p.add_argument("--quick", action="store_true", help="res_tuning + base, 2 steps, one seed and LR, 1 image each")
    p.add_argument("--note", default="", help="a line for the table (e.g. how the machine was shared while timing)")
    args = p.parse_args(argv)
    if args.quick:
        args.methods, args.learning_rates, args.seeds, args.steps, args.repeats = (
            ["base", "res_tuning"], [2e-3], [0], 2, 1)
    out = Path(args.out)
    data_dir = world.write_imagefolder(out / "runs" / "concept_train",
                                       world.examples("concept_train", world.CONCEPT_TRAIN_N))
    classifier = world.load_classifier()
    start = time.time()
    rows = [method_row(m, args, data_dir, classifier) for m in args.methods]
    meta = {"command": " ".join(["python bench/quality_tiny.py", *(argv if argv is not None else sys.argv[1:])]),
            "steps": args.steps, "seeds": args.seeds, "learning_rates": args.learning_rates, "repeats": args.repeats,
            "feature_dim": classifier.width, "seconds": round(time.time() - start), "note": args.note}
    atomic_write_text(out / "quality-tiny.json", json.dumps({"meta": meta, "rows": rows}, indent=1))
    text = markdown(rows, meta)
    atomic_write_text(out / "quality-tiny.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
