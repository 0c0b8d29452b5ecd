"""Text -> images with tuned weights: a plain diffusers StableDiffusionPipeline with tuner files attached.

Image i comes from seed + i through the one sampling path (sampling.py), so a result does not depend on the batch size
or on how many tuner files run at once. Several bypass files go through one backbone pass per step (multitask.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from restune_diffusion.files import atomic_write, atomic_write_text
from restune_diffusion.models import build_pipeline, load_model
from restune_diffusion.multitask import generate_multitask
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
                  revision: str | None = None, variant: str | None = None):
    """A StableDiffusionPipeline over `base` ("tiny", a local SD v1.5 folder, or a hub id in the local Hugging Face
    cache at `revision`, `variant` weight files; models.load_model) with tuner file(s) attached.

    The handles are on `pipe.tuner_handles` (name -> handle); `scale` sets the tuners' strength. `scheduler`: a
    sampler name users know ("Euler a", "DPM++ 2M Karras", ...; restune_diffusion.samplers).
    """
    sampler = sampler_key(scheduler)  # a bad name fails before any model loads
    device = device or default_device()
    dtype = parse_dtype(dtype, device) if not isinstance(dtype, torch.dtype) else dtype
    sd = load_model(base, dtype=dtype, device=device, revision=revision, variant=variant)
    pipe = build_pipeline(sd)
    pipe.scheduler = make_scheduler(scheduler, sd.noise_scheduler.config, karras_sigmas)
    pipe.sampler_name = sampler_label(scheduler, karras_sigmas or sampler[1])
    pipe.tuner_handles = {}
    paths = [tuners] if isinstance(tuners, (str, os.PathLike)) else list(tuners or [])
    for path in paths:
        name = Path(path).stem if len(paths) > 1 else None
        handle = load_tuners(sd.unet, path, name=name, device=device)
        handle.scale = scale
        pipe.tuner_handles[handle.name] = handle
    return pipe


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
    fields = {"Steps": m["steps"], "Sampler": m["sampler"], "CFG scale": m["guidance_scale"], "Seed": m["seed"],
              "Size": f"{m['width']}x{m['height']}", "Model": m["model"], "Tuners": m.get("tuners"),
              "Tuners hash": (m.get("tuners_sha256") or "")[:10] or None, "Tuner scale": m.get("scale")}
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
    out, tuners = Path(args.out), list(args.tuners or [])
    names = task_names(tuners, args.task_names) if len(tuners) > 1 else None
    if args.task_names and names is None:
        raise ValueError(f"--task_names: names the tasks of several --tuners files; got {len(tuners)} --tuners")
    pipe = load_pipeline(args.pretrained_model_name_or_path, tuners[0] if len(tuners) == 1 else None,
                         device=args.device, dtype=args.dtype, scheduler=settings.scheduler, scale=args.scale,
                         karras_sigmas=settings.karras_sigmas, revision=args.revision, variant=args.variant)
    kw = dict(height=args.height, width=args.width, progress=True)
    if names is None:
        images = {None: generate(pipe, prompts, settings, **kw)[0]}
    else:
        handles = {name: load_tuners(pipe.unet, path, name=f"task:{name}") for name, path in zip(names, tuners)}
        for handle in handles.values():
            handle.scale = args.scale
        images = generate_multitask(pipe, handles, prompts, settings, **kw)
    paths = []
    for (name, found), path in zip(images.items(), tuners or [None]):
        records = _records(args, settings, prompts, path, found[0].size)
        paths += _save_all(found, out if name is None else out / name, records)
    return paths


def _records(args, settings: SamplingSettings, prompts: list[str], tuners, size: tuple[int, int]) -> list[dict]:
    """What made each image: written into its PNG text and the folder's index.json."""
    sha = _sha256(tuners) if tuners else None
    return [{"prompt": p, "negative_prompt": settings.negative_prompt, "seed": settings.image_seed(i),
             "steps": settings.steps, "guidance_scale": settings.guidance_scale, "sampler": settings.label(),
             "width": size[0], "height": size[1], "model": str(args.pretrained_model_name_or_path),
             "tuners": str(tuners) if tuners else None, "tuners_sha256": sha, "scale": args.scale if tuners else None}
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
