"""Text -> images with tuned weights: a plain diffusers StableDiffusionPipeline with tuner files attached.

Image i comes from seed + i through the one sampling path (sampling.py), so a result does not depend on the batch size
or on how many tuner files run at once. Several tuner files are mixed on one UNet, each at its weight (mixing.py);
several bypass files are tasks, run through one backbone pass per step (multitask.py), unless mixed explicitly.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from restune_diffusion.files import atomic_write, atomic_write_text
from restune_diffusion.mixing import compile_unet, fuse_all, load_weighted, parse_weighted, tuner_types
from restune_diffusion.models import build_pipeline, load_model
from restune_diffusion.multitask import check_bypass_only, generate_multitask
from restune_diffusion.samplers import make_scheduler, sampler_key, sampler_label
from restune_diffusion.sampling import SamplingSettings, generate, make_grid, sampling_settings
from restune_diffusion.weights import load_tuners

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_dtype(name: str | None, device: str) -> torch.dtype:
    """fp16 on CUDA, fp32 on CPU unless asked."""
    if name is None:
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype: expected one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def load_pipeline(base: str, tuners=None, device: str | None = None, dtype: torch.dtype | str | None = None,
                  scheduler: str = "ddim", scale: float = 1.0, karras_sigmas: bool = False,
                  revision: str | None = None, variant: str | None = None, mix: bool = False, fuse: bool = False,
                  compile_mode: str | None = None):
    """A StableDiffusionPipeline over `base` ("tiny", a local SD v1.5 folder, or a hub id in the local Hugging Face
    cache at `revision`, `variant` weight files; models.load_model) with tuner file(s) attached.

    `tuners`: a file, "file:0.8", or a list of these and (file, weight) pairs, or {name: any of these}: every set on
    the one UNet at its weight (default `scale`), named after its file (its run folder when the file names collide).
    Several bypass files need mix=True (summed as weighted deltas; for one image set per task use
    restune_diffusion.multitask). The handles are on `pipe.tuner_handles` (name -> handle); change weights with
    `restune_diffusion.mixing.set_tuner_weights(pipe, names, weights)` or `handle.scale`, no reload. `fuse`: fuse()
    every set where that is exact (a line says what stays unfused); `compile_mode`: torch.compile the UNet in that
    mode ("default", "reduce-overhead", ...). `scheduler`: a sampler name users know ("Euler a", "DPM++ 2M Karras",
    ...; restune_diffusion.samplers).
    """
    specs = tuner_specs(tuners, scale)  # a bad spec or name fails before any model loads
    sampler = sampler_key(scheduler)  # a bad name fails before any model loads
    device = device or default_device()
    dtype = parse_dtype(dtype, device) if not isinstance(dtype, torch.dtype) else dtype
    sd = load_model(base, dtype=dtype, device=device, revision=revision, variant=variant)
    pipe = build_pipeline(sd)
    pipe.scheduler = make_scheduler(scheduler, sd.noise_scheduler.config, karras_sigmas)
    pipe.sampler_name = sampler_label(scheduler, karras_sigmas or sampler[1])
    pipe.tuner_handles = load_weighted(sd.unet, specs, mix=mix, device=device)
    if fuse:
        for line in fuse_all(pipe.tuner_handles.values()):
            print(f"fuse: {line}")
    if compile_mode:
        compile_unet(pipe.unet, compile_mode)
    return pipe


def tuner_specs(tuners, scale: float = 1.0) -> list[tuple[str | None, str, float]]:
    """load_pipeline's `tuners` as (name, path, weight) rows; name None (one file): the name in the file."""
    if tuners is None:
        return []
    if isinstance(tuners, Mapping):
        items = list(tuners.items())
    else:
        items = [(None, t) for t in ([tuners] if isinstance(tuners, (str, os.PathLike)) else tuners)]
    rows = []
    for name, spec in items:
        if isinstance(spec, (tuple, list)) and len(spec) == 2:
            path, weight = os.fspath(spec[0]), float(spec[1])
        else:
            path, weight = parse_weighted(spec, scale)
        rows.append((name, path, weight))
    if len(rows) > 1 and not isinstance(tuners, Mapping):  # named after their files, or their run folders
        rows = [(name, path, weight) for name, (_, path, weight) in zip(task_names([r[1] for r in rows]), rows)]
    return rows


def generate_images(pipe, prompts: list[str], settings: SamplingSettings | None = None, *, start: int = 0,
                    height: int | None = None, width: int | None = None, progress: bool = True, **fields) -> list:
    """One image per prompt, image i from the seed of image start + i (sampling.py's seed rule); `fields`: any
    SamplingSettings field (steps=, guidance_scale=, seed=, batch_size=, ...). Returns PIL images; raises
    sampling.NonFiniteImagesError rather than return black images from NaN/Inf latents."""
    settings = (settings or SamplingSettings(scheduler=None)).replace(**fields)
    return generate(pipe, prompts, settings, start=start, height=height, width=width, progress=progress)[0]


def save_image(image, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """PNG written atomically (a resumed run never meets a half-written image); `metadata` goes into its text chunks:
    "parameters" in A1111's format (what A1111/ComfyUI show and read back) and "restune" as JSON."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if metadata:
        info.add_text("parameters", a1111_parameters(metadata))
        info.add_text("restune", json.dumps(metadata))
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def a1111_parameters(m: dict) -> str:
    """prompt, then "Negative prompt: ...", then "Steps: 50, Sampler: Euler a, CFG scale: 7.5, Seed: 3, ..."."""
    lines = [m["prompt"]] + ([f"Negative prompt: {m['negative_prompt']}"] if m.get("negative_prompt") else [])
    listed = lambda v, f=str: ", ".join(map(f, v)) if isinstance(v, list) else (None if v is None else f(v))  # noqa: E731
    fields = {"Steps": m["steps"], "Sampler": m["sampler"], "CFG scale": m["guidance_scale"], "Seed": m["seed"],
              "Size": f"{m['width']}x{m['height']}", "Model": m["model"], "Tuners": listed(m.get("tuners")),
              "Tuners hash": listed(m.get("tuners_sha256"), lambda h: h[:10]), "Tuner scale": listed(m.get("scale"))}
    return "\n".join(lines + [", ".join(f"{k}: {v}" for k, v in fields.items() if v is not None)])


def read_prompts(prompts: list[str] | None, prompts_file: str | None) -> list[str]:
    found = list(prompts or [])
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts_file {path}: not found")
        found += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not found:
        raise ValueError("no prompt: pass --prompt TEXT (repeatable) or --prompts_file FILE (one prompt a line)")
    return found


def run(args) -> list[Path]:
    """The generate.py CLI: every prompt x num_images, PNGs + grid.png in args.out (per task for several bypasses)."""
    if not isinstance(args.num_images, int) or args.num_images < 1:
        raise ValueError(f"--num_images: expected a positive integer, got {args.num_images!r}")
    settings = sampling_settings(args)
    prompts = [p for p in read_prompts(args.prompt, args.prompts_file) for _ in range(args.num_images)]
    out, mix = Path(args.out), getattr(args, "mix", False)
    specs = [parse_weighted(t, args.scale) for t in args.tuners or []]  # (path, weight)
    types = [tuner_types(path) for path, _ in specs]
    tasks = [] if mix else [i for i, found in enumerate(types) if "bypass" in found]
    names = task_names([specs[i][0] for i in tasks], args.task_names) if len(tasks) > 1 else None
    if args.task_names and names is None:
        raise ValueError(f"--task_names: names the tasks of several bypass --tuners files; got {len(tasks)} "
                         "bypass file(s)")
    if names:  # several tasks: each file is a bypass and nothing else, checked before any model loads
        for i in tasks:
            check_bypass_only(types[i], specs[i][0])
    shared = [s for i, s in enumerate(specs) if names is None or i not in tasks]  # on the backbone, for every task
    pipe = load_pipeline(args.pretrained_model_name_or_path, shared, device=args.device, dtype=args.dtype,
                         scheduler=settings.scheduler, karras_sigmas=settings.karras_sigmas, revision=args.revision,
                         variant=args.variant, mix=mix, fuse=getattr(args, "fuse", False),
                         compile_mode=getattr(args, "compile", None))
    kw = dict(height=args.height, width=args.width, progress=True)
    if names is None:
        images, used = {None: generate(pipe, prompts, settings, **kw)[0]}, [specs]
    else:  # several bypass files: one image set per task, one backbone pass per step
        handles = {}
        for name, i in zip(names, tasks):
            handles[name] = load_tuners(pipe.unet, specs[i][0], name=f"task:{name}")
            handles[name].scale = specs[i][1]
        images, used = generate_multitask(pipe, handles, prompts, settings, **kw), [[*shared, specs[i]] for i in tasks]
    paths = []
    for (name, found), files in zip(images.items(), used):
        records = _records(args, settings, prompts, files, found[0].size)
        paths += _save_all(found, out if name is None else out / name, records)
    return paths


def _records(args, settings: SamplingSettings, prompts: list[str], specs: list[tuple[str, float]],
             size: tuple[int, int]) -> list[dict]:
    """What made each image: written into its PNG text and the folder's index.json. One tuner file: its path, hash
    and weight; several (mixed): lists of them."""
    paths, weights = [str(p) for p, _ in specs], [w for _, w in specs]
    sha = [_sha256(p) for p in paths]
    one = lambda values: (values[0] if len(values) == 1 else values) if values else None  # noqa: E731
    return [{"prompt": p, "negative_prompt": settings.negative_prompt, "seed": settings.image_seed(i),
             "steps": settings.steps, "guidance_scale": settings.guidance_scale, "sampler": settings.label(),
             "width": size[0], "height": size[1], "model": str(args.pretrained_model_name_or_path),
             "tuners": one(paths), "tuners_sha256": one(sha), "scale": one(weights)}
            for i, p in enumerate(prompts)]


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def task_names(paths: Sequence[str | os.PathLike], names: Sequence[str] | None = None) -> list[str]:
    """One name per tuner file (its output folder): `names` if given, else the file stems, else, when stems collide
    (every training run writes tuners.safetensors), the run folders: out/dogs/tuners.safetensors -> "dogs"."""
    paths = [Path(p) for p in paths]
    if names:
        if len(names) != len(paths) or len(set(names)) != len(names):
            raise ValueError(f"--task_names: expected {len(paths)} different names (one per --tuners file), "
                             f"got {list(names)}")
        bad = [n for n in names if not n or n in (".", "..") or "/" in n or os.sep in n]
        if bad:
            raise ValueError(f"--task_names: a name is a folder name under --out, got {bad}")
        return list(names)
    for candidate in ([p.stem for p in paths], [p.resolve().parent.name for p in paths]):
        if len(set(candidate)) == len(candidate):
            return candidate
    listed = [str(p) for p in paths]
    raise ValueError(f"--tuners: neither the file names nor their folders tell the tasks apart ({listed}); "
                     "name them with --task_names A --task_names B ...")


INDEX_FILE = "index.json"
NUMBERED = re.compile(r"^(\d{5,})\.png$")


def next_index(out: Path) -> int:
    """1 + the highest NNNNN.png in `out` (0 for a new folder): a rerun continues numbering, never overwrites."""
    found = [int(m.group(1)) for p in out.glob("*.png") if (m := NUMBERED.match(p.name))] if out.is_dir() else []
    return max(found, default=-1) + 1


def _save_all(images, out: Path, records: list[dict]) -> list[Path]:
    """NNNNN.png per image (numbering continued), a grid (grid.png, then grid_NNNNN.png), and index.json extended."""
    start = next_index(out)
    paths = [save_image(image, out / f"{start + i:05d}.png", record)
             for i, (image, record) in enumerate(zip(images, records, strict=True))]
    grid = out / ("grid.png" if start == 0 else f"grid_{start:05d}.png")
    paths.append(save_image(make_grid(images), grid))
    index_path = out / INDEX_FILE
    try:
        index = json.loads(index_path.read_text()) if index_path.is_file() else []
    except json.JSONDecodeError as err:
        raise ValueError(f"{index_path}: not valid JSON ({err}); move it aside to start a new index") from None
    index += [{"file": p.name, **r} for p, r in zip(paths, records)]
    atomic_write_text(index_path, json.dumps(index, indent=1) + "\n")
    print(f"wrote {len(images)} images ({start:05d}..{start + len(images) - 1:05d}) and {grid.name} to {out}")
    return paths
