"""The one evaluation loop (issue 24): every model row x guidance scale of a protocol -> generate its prompt sets ->
collect what its metrics consume -> compute every registered metric -> one result row each.

Every model (the base and each tuner file, or each checkpoint of a run) is measured on the same prompts, seeds and
real side. Generation is split over processes by image index (`accelerate launch` / `torchrun`) and resumable; the
metrics are computed once, on the main process, from what the protocol gathered in index order, so N processes give
the numbers one process gives. The protocols: COCO captions (runner.py), the tiny world (world/evaluation.py, run
here by eval_fid.py --world); a protocol is data (restune_diffusion.metrics.Protocol).
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
from pathlib import Path
from typing import Iterator

import torch

from ..files import file_sha256
from ..generate import task_names
from ..metrics import Protocol, measure
from ..models import build_pipeline, load_model
from ..samplers import make_scheduler
from ..sampling import SamplingSettings
from ..weights import load_tuners
from .images import check_generation_record, generate_by_index

TUNERS_FILE = "tuners.safetensors"  # what a training run and each of its checkpoints hold
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


def versions() -> dict:
    import accelerate
    import diffusers
    import torchmetrics
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "torchmetrics": torchmetrics.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__}


def check_mixed_precision(mixed_precision: str) -> torch.dtype:
    if mixed_precision not in DTYPES:
        raise ValueError(f"--mixed_precision: expected one of {sorted(DTYPES)}, got {mixed_precision!r}")
    return DTYPES[mixed_precision]


def sampling_pipeline(sd, settings: SamplingSettings):
    """The generating pipeline of a loaded model, with the protocol's sampler."""
    pipe = build_pipeline(sd)
    pipe.scheduler = make_scheduler(settings.scheduler, sd.noise_scheduler.config)
    return pipe


def run(protocol: Protocol, sd, pipe, rows: list[ModelRow], settings: SamplingSettings, scales: list[float],
        output_dir: str | os.PathLike, *, state, device: str, model: str, mixed_precision: str, started: float,
        progress: bool = True) -> dict | None:
    """The loop: every row x scale -> <output_dir>/<row>/cfg<scale>/<prompt set>/{i:05d}.png -> protocol.collect ->
    every registered metric (metrics.measure) -> a result row. Writes the protocol's reports (main process) and
    returns eval.json's content; None on the other processes."""
    out, results = Path(output_dir), []
    n = len(next(iter(protocol.prompt_sets.values())))
    for row in rows:
        with tuners_on(sd.unet, row, device) as tuners_sha:
            for scale in scales:
                folder = out / row.name / f"cfg{scale:g}"
                at_scale = settings.replace(guidance_scale=scale)
                paths = {}
                for part, prompts in protocol.prompt_sets.items():
                    record = {"model": model, "tuners_sha256": tuners_sha, "seed": settings.seed,
                              "steps": settings.steps, "guidance_scale": scale, "scheduler": settings.scheduler,
                              **protocol.record, "mixed_precision": mixed_precision,
                              "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()}
                    if state.is_main_process:
                        check_generation_record(folder / part, record)
                    state.wait_for_everyone()
                    paths[part] = generate_by_index(pipe, prompts, folder / part, at_scale,
                                                    resolution=protocol.resolution, rank=state.process_index,
                                                    world=state.num_processes, progress=progress)
                    state.wait_for_everyone()
                fake = protocol.collect(state, paths)
                if state.is_main_process:
                    results.append({
                        "model": row.name, "tuners": str(row.tuners) if row.tuners else None,
                        "tuners_sha256": tuners_sha, "step": row.step, "guidance_scale": scale,
                        **measure(protocol.sources, protocol.real, fake, protocol.context),
                        "n": n, "images": str(folder)})
    if not state.is_main_process:
        return None
    result = {
        "rows": results, "n": n, "seed": settings.seed, "steps": settings.steps, "scheduler": settings.scheduler,
        "resolution": protocol.resolution, "batch_size": settings.batch_size, "guidance_scales": scales,
        "model": model, "mixed_precision": mixed_precision, "num_processes": state.num_processes, "device": device,
        **protocol.info, "warnings": protocol.warnings, "versions": versions(),
        "elapsed_s": round(time.perf_counter() - started, 3),
    }
    protocol.report(result, out)
    return result


def evaluate_protocol(protocol: Protocol, pretrained_model_name_or_path: str, output_dir: str | os.PathLike,
                      settings: SamplingSettings, *, guidance_scales: list[float] | None = None,
                      tuners: list[str] | None = None, base: bool = False, device: str | None = None,
                      mixed_precision: str = "no", progress: bool = True, revision: str | None = None,
                      variant: str | None = None) -> dict | None:
    """A protocol that needs nothing of the model to be built (the tiny world's) over every model x guidance scale
    (default: settings.guidance_scale); see `run`. `revision`/`variant`: of a hub id (models.load_model)."""
    started = time.perf_counter()
    dtype = check_mixed_precision(mixed_precision)
    scales = [float(s) for s in (guidance_scales or [settings.guidance_scale])]
    rows = model_rows(tuners, base)
    state, device = process_state(device)
    sd = load_model(pretrained_model_name_or_path, dtype=dtype, device=device, revision=revision, variant=variant)
    return run(protocol, sd, sampling_pipeline(sd, settings), rows, settings, scales, output_dir, state=state,
               device=device, model=str(pretrained_model_name_or_path), mixed_precision=mixed_precision,
               started=started, progress=progress)
