"""Training and judging runs in the tiny world, cached: the machinery of bench/quality_tiny.py and
bench/forgetting_tiny.py.

A run = (method config, concept, learning rate, seed, steps, extra training flags): trained once into
<out>/quality-tiny-runs/<key>/train. A measurement of it = (noise seed, images per prompt set, inference weight):
its generated images are kept (images.npz), so a new judge re-reads them and nothing is regenerated; the judges'
verdicts are kept per judge fingerprint (result-*.json, measurement-*.npz: committed, so a fresh clone resumes
without retraining what was measured; the trained tuners and images stay local). The key holds everything a run
depends on (the config's settings, the base model's files), so a changed setting makes a new run and an interrupted
bench resumes. Runs go to worker processes, one thread each.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RUNS = "quality-tiny-runs"


def fingerprint(paths) -> str:
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(path.name.encode())
        h.update(str(path.stat().st_size).encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 16))
    return h.hexdigest()[:12]


def world_fingerprint() -> str:
    """The base model's files (what training and generation depend on; the judges are apart)."""
    from restune_diffusion.models import TINY_ASSETS

    return fingerprint(p for p in TINY_ASSETS.rglob("*") if p.is_file() and "judge" not in p.parts
                       and p.suffix in (".safetensors", ".json"))


def judges_fingerprint() -> str:
    from restune_diffusion.world.report import judge_folder

    return fingerprint(judge_folder().glob("*.safetensors"))


def run_key(spec: dict) -> str:
    text = json.dumps(spec, sort_keys=True)
    return f"{spec['method']}-{spec['concept']}-lr{spec['lr']:g}-s{spec['seed']}-n{spec['steps']}-" \
           f"{hashlib.sha256(text.encode()).hexdigest()[:10]}"


DEFAULT_JOB, DEFAULT_JOB_STEPS, DEFAULT_JOB_CONCEPT = "tiny_demo", 500, "star"  # `python train_t2i.py`


def config_path(method: str) -> Path:
    return ROOT / "configs" / ("tiny_demo.yaml" if method == DEFAULT_JOB else f"tiny/{method}.yaml")


def config_text(method: str) -> str:
    """What of a config a run depends on, canonical: its settings without the description and the learning rate
    (the run's own LR is in its key), so editing either keeps the runs already measured."""
    import yaml

    config = yaml.safe_load(config_path(method).read_text())
    config.pop("description", None)
    for key in ("learning_rate", *REMEDY_KEYS):
        for section in ("train", "data"):
            (config.get(section) or {}).pop(key, None)
    return json.dumps(config, sort_keys=True)


# a config's own forgetting remedy: off in every run (train_argv), so a run's remedy is exactly its `extra` flags
REMEDY_KEYS = ("preservation_weight", "preservation_prompts", "class_prompt", "with_prior_preservation",
               "prior_loss_weight", "class_data_dir", "num_class_images")


def train_argv(job: dict, output_dir: Path) -> list[str]:
    """train_t2i.py's flags for one run: the method's config on the run's data (run_flags), with the run's own
    remedy flags (job["flags"]: the paths as they are here; the key's spec holds them relative to the bench's out)."""
    return ["--config", str(config_path(job["spec"]["method"])), "--data_dir", job["data"],
            *run_flags(job["spec"], output_dir, job.get("flags", job["spec"].get("extra", ())))]


def run_flags(spec: dict, output_dir: Path, extra=()) -> list[str]:
    """The flags every world run trains with: the run's LR, seed and steps; the config's remedy off
    (configs/tiny_demo.yaml ships one), then `extra`, the run's own remedy flags, if any."""
    return ["--no-world_report", "--output_dir", str(output_dir), "--learning_rate", repr(spec["lr"]), "--seed",
            str(spec["seed"]), "--max_train_steps", str(spec["steps"]), "--lr_warmup_steps",
            str(min(25, spec["steps"] // 4)), "--preservation_weight", "0", "--no-with_prior_preservation", *extra]


OUT_TOKEN = "<out>"  # a run key's stand-in for the bench's output folder, so a clone elsewhere finds its runs


def portable(flags, out: Path) -> list[str]:
    """Flags with the bench's output folder as OUT_TOKEN: what a run key holds, the same in every checkout."""
    root = Path(out).resolve()

    def token(flag: str) -> str:
        if "/" not in flag:  # a value, not a path
            return flag
        path = Path(flag).resolve()  # a relative --out gives relative paths
        return OUT_TOKEN + "/" + str(path.relative_to(root)) if path.is_relative_to(root) else flag

    return [token(f) for f in flags]


def concept_data(out: Path, concept: str) -> Path:
    from restune_diffusion.world.datasets import concept_train_set, write_imagefolder

    folder = out / "data" / concept
    if not (folder / "metadata.jsonl").is_file():
        write_imagefolder(folder, concept_train_set(concept))
    return folder


def do_run(job: dict) -> dict:
    """Train one (method, concept, LR, seed, steps) and measure it; cached in its folder. Runs in a worker."""
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    from restune_diffusion.files import atomic_write_text
    from restune_diffusion.models import load_model
    from restune_diffusion.weights import load_tuners
    from restune_diffusion.world import protocol
    from restune_diffusion.world.report import Measurement, load_judges, prompt_sets

    folder, run = Path(job["folder"]), Path(job["folder"]).parent
    result_file = folder / f"result-{job['judges']}.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    start = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.time()
    tuners = Path(job["tuners"]) if job.get("tuners") else run / "train" / "tuners.safetensors"
    if job.get("tuners") and not tuners.is_file():  # trained elsewhere (a joint run: bench/joint_tiny.py)
        raise FileNotFoundError(f"{tuners}: the tuners to measure are missing; train them first")
    if job["method"] != "base" and not tuners.is_file():
        spec = job["spec"]
        train_logged(train_argv(job, run / "train"), run,
                     f"{spec['method']} {spec['concept']} lr={spec['lr']} seed={spec['seed']}")
    concept_r, kept_r, combo_r = job["repeats"]
    sets = prompt_sets((job["concept"],) if job["concept"] else (), concept_r, kept_r, combo_r)
    images_file = folder / "images.npz"
    if not images_file.is_file():  # the generated images, kept: a new judge re-reads them, nothing is regenerated
        start = resource.getrusage(resource.RUSAGE_SELF)
        sd = load_model("tiny")
        if job["method"] != "base":
            load_tuners(sd.unet, tuners).scale = job["scale"]  # the inference weight (1: as trained)
        images = {name: protocol.generate(sd, [a.caption for a in asked], seed=job["noise"]).numpy()
                  for name, asked in sets.items()}
        save_npz(images_file, images)
        atomic_write_text(folder / "images_cpu.json", json.dumps({"cpu_seconds": cpu_since(start)}))
    with np.load(images_file) as data:
        images = {name: torch.from_numpy(data[name]) for name in sets}
    judge, check = load_judges()
    measurement = Measurement()
    for name, asked in sets.items():
        h, c = protocol.hits(judge, images[name], asked), protocol.hits(check, images[name], asked)
        h["check_shape"], h["agree"] = c["shape"], c["seen"] == h["seen"]
        measurement.sets[name] = h
    measurement.save(folder / f"measurement-{job['judges']}.npz")
    costs = [run / "train_cpu.json", folder / "images_cpu.json"]
    result = {"job": job, "seconds": round(time.time() - t0, 1), "cpu_seconds": cpu_since(start),
              "cpu_seconds_to_make": round(sum(json.loads(p.read_text())["cpu_seconds"] for p in costs
                                               if p.is_file()), 1),
              "accuracy": {name: float(h["all"].mean()) for name, h in measurement.sets.items()},
              "shape": {name: float(h["shape"].mean()) for name, h in measurement.sets.items()}}
    summary_file = run / "train" / "summary.json"
    if summary_file.is_file():
        s = json.loads(summary_file.read_text())
        result["params"], result["train_seconds"] = s.get("trainable_params"), s.get("train_seconds")
    atomic_write_text(result_file, json.dumps(result, indent=1))
    return result


def train_logged(argv: list[str], run: Path, what: str) -> None:
    """train_t2i.py in this process, its output in <run>/train.log, its CPU seconds in <run>/train_cpu.json; a failed
    run raises with the log's tail."""
    from restune_diffusion import train
    from restune_diffusion.files import atomic_write_text

    start = resource.getrusage(resource.RUSAGE_SELF)
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "train.log", "w") as log:
        streams, (sys.stdout, sys.stderr) = (sys.stdout, sys.stderr), (log, log)
        try:
            code = train.main(argv)
        finally:
            sys.stdout, sys.stderr = streams
    if code:
        raise RuntimeError(f"{what}: training failed (exit {code}):\n{(run / 'train.log').read_text()[-2000:]}")
    atomic_write_text(run / "train_cpu.json", json.dumps({"cpu_seconds": cpu_since(start)}))


def cpu_since(start) -> float:
    """CPU seconds of this process since the rusage snapshot `start` (the runs are one thread each)."""
    end = resource.getrusage(resource.RUSAGE_SELF)
    return round(end.ru_utime + end.ru_stime - start.ru_utime - start.ru_stime, 1)


def write_outputs(out: Path, stem: str, data: dict, text: str, plot) -> None:
    """<out>/<stem>.json and .md (atomically), the figure by plot(path of <stem>.png or its own name), the table
    printed: how both tiny-world benches end."""
    from restune_diffusion.files import atomic_write_text

    atomic_write_text(out / f"{stem}.json", json.dumps(data, indent=1))
    atomic_write_text(out / f"{stem}.md", text)
    plot()
    print(text)


def method_style(i: int) -> dict:
    """Colour and marker of the i-th method in the benches' figures: 13 methods, no colour or marker twice."""
    import matplotlib.pyplot as plt

    colours, markers = plt.get_cmap("tab20").colors, "os^vDPX*<>ph"
    return {"color": colours[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20], "marker": markers[i % len(markers)]}


def save_npz(path: Path, arrays: dict) -> None:
    from restune_diffusion.files import atomic_write

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    atomic_write(path, write)


class Runner:
    """Submits jobs to a pool, skipping cached ones; results by folder."""

    def __init__(self, out: Path, jobs: int, world: str, quick: bool):
        self.out, self.world, self.quick, self.judges = out, world, quick, judges_fingerprint()
        self.pool = mp.get_context("spawn").Pool(jobs, maxtasksperchild=8) if jobs > 1 else None
        self.cpu_seconds = 0.0
        self.measure = True  # False: run() refuses to train or measure (it only reads cached verdicts)

    def job(self, method: str, concept: str | None, lr: float, seed: int, steps: int, noise: int,
            repeats: tuple, extra: tuple[str, ...] = (), scale: float = 1.0) -> dict:
        """One measurement of one run. `extra`: more training flags (a remedy); `scale`: the tuners' inference
        weight."""
        spec = {"method": method, "concept": concept or "none", "lr": lr if method != "base" else 0.0,
                "seed": seed if method != "base" else 0, "steps": steps if method != "base" else 0,
                "config": config_text(method) if method != "base" else "", "world": self.world}
        if extra and method != "base":  # absent when empty: runs without a remedy keep their keys
            spec["extra"] = portable(extra, self.out)
        from restune_diffusion.world.protocol import PROTOCOL_VERSION

        measure = f"noise{noise}-r{'-'.join(map(str, repeats))}-{PROTOCOL_VERSION}"
        if scale != 1.0 and method != "base":
            measure += f"-scale{scale:g}"
        folder = self.out / RUNS / run_key(spec) / measure
        data = str(concept_data(self.out, concept)) if concept and method != "base" else ""
        return {"method": method, "concept": concept, "spec": spec, "noise": noise, "repeats": list(repeats),
                "folder": str(folder), "data": data, "judges": self.judges, "scale": scale, "flags": list(extra)}

    def cached(self, jobs: list[dict]) -> bool:
        """Whether every job's verdict is already here (then run() measures nothing)."""
        return all((Path(j["folder"]) / f"result-{j['judges']}.json").is_file() for j in jobs)

    def run(self, jobs: list[dict]) -> list[dict]:
        results = [Path(j["folder"]) / f"result-{j['judges']}.json" for j in jobs]
        todo = [j for j, r in zip(jobs, results) if not r.is_file()]
        if todo and not self.measure:
            raise SystemExit(f"{len(todo)} runs are not cached ({Path(todo[0]['folder']).parent.name}, ...): "
                             "this stage measures nothing; run the stage that makes them")
        if todo:
            print(f"  {len(todo)} runs to do ({len(jobs) - len(todo)} cached)", flush=True)
        done = self.pool.map(do_run, todo, chunksize=1) if self.pool and len(todo) > 1 else [do_run(j) for j in todo]
        self.cpu_seconds += sum(r["cpu_seconds"] for r in done)
        return [dict(json.loads(r.read_text()), job=j) for j, r in zip(jobs, results)]  # paths of this checkout

    def close(self):
        if self.pool:
            self.pool.close()
            self.pool.join()


def measurements(results: list[dict]):
    from restune_diffusion.world.report import Measurement

    return [Measurement.load(Path(r["job"]["folder"]) / f"measurement-{r['job']['judges']}.npz") for r in results]


