"""Text -> images with tuned weights: a plain diffusers StableDiffusionPipeline with tuner files attached.

Seeds are per image (seed + index), so a result does not depend on the batch size and an interrupted run can resume.
Several bypass files at once go through one backbone pass per step (restune_diffusion.multitask).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from restune_diffusion.models import build_pipeline, load_model
from restune_diffusion.multitask import generate_multitask
from restune_diffusion.samplers import make_scheduler, sampler_key, sampler_label
from restune_diffusion.weights import atomic_write, atomic_write_text, load_tuners

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


def native_resolution(pipe) -> int:
    """The size the model was made for: the VAE's sample_size, else the UNet's latent size x the VAE factor.

    SD v1.5: 512 both ways. The tiny model: its VAE says 32 (what the demo trains at) where its UNet config says 8
    latents (16 px), so the VAE, which sets the pixel scale, wins when the two disagree upward.
    """
    from_unet = pipe.unet.config.sample_size * pipe.vae_scale_factor
    from_vae = getattr(pipe.vae.config, "sample_size", None)
    return max(from_unet, from_vae) if isinstance(from_vae, int) else from_unet


def image_size(pipe, height: int | None, width: int | None) -> tuple[int, int]:
    """The model's native size unless asked (512 for SD v1.5, 32 for tiny); multiples of 8 as the VAE needs."""
    native = native_resolution(pipe)
    height, width = height or native, width or native
    for name, value in (("height", height), ("width", width)):
        if value % 8:
            raise ValueError(f"--{name} must be a multiple of 8, got {value}")
    return height, width


class NonFiniteImagesError(ValueError):
    """Generated images hold NaN/Inf (from non-finite latents): written nowhere, since they would be black."""


def check_finite(images: np.ndarray, first_index: int = 0) -> None:
    """images: (B, H, W, 3) floats before conversion to uint8; raise naming how many (and which) are non-finite."""
    bad = [first_index + i for i in range(len(images)) if not np.isfinite(images[i]).all()]
    if bad:
        raise NonFiniteImagesError(
            f"{len(bad)} of {len(images)} images in this batch have NaN/Inf pixels (image indices {bad[:8]}): the "
            f"denoised latents were non-finite, e.g. fp16 overflow (try --dtype fp32) or a tuner file holding "
            f"NaN/Inf weights. Nothing was written for them (they would be black).")


def initial_latents(pipe, seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
    """(B, C, h, w) starting noise, row i from a CPU generator seeded with seeds[i]: an image depends on its seed
    only, on any device and at any batch size."""
    shape = (pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    rows = [torch.randn(shape, generator=torch.Generator(device="cpu").manual_seed(s)) for s in seeds]
    return torch.stack(rows).to(device=pipe.unet.device, dtype=pipe.unet.dtype)


def sampler_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """Per-image CPU generators for stochastic samplers (Euler a), on a stream apart from the initial noise's."""
    return [torch.Generator(device="cpu").manual_seed(int(np.random.SeedSequence([s, 1]).generate_state(1)[0]))
            for s in seeds]


@torch.no_grad()
def generate_batch(pipe, prompts: Sequence[str], seeds: Sequence[int], *, steps: int, guidance_scale: float,
                   height: int, width: int, negative_prompt: str | None = None, first_index: int = 0):
    """One pipeline call: image i from the noise of seeds[i] (see initial_latents). Returns PIL images, or raises
    NonFiniteImagesError naming the images (first_index + i) that came out NaN/Inf."""
    latents = initial_latents(pipe, seeds, height, width)
    out = pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance_scale, height=height, width=width,
               negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
               latents=latents, output_type="np", generator=sampler_generators(seeds))
    check_finite(out.images, first_index)
    return pipe.numpy_to_pil(out.images)


def generate_images(pipe, prompts: list[str], seed: int = 0, steps: int = 50, guidance_scale: float = 7.5,
                    batch_size: int = 4, height: int | None = None, width: int | None = None,
                    negative_prompt: str | None = None, start: int = 0, progress: bool = True):
    """One image per prompt; image i uses torch.Generator seeded with seed + start + i. Returns PIL images.

    Raises NonFiniteImagesError rather than return black images from NaN/Inf latents.
    """
    from tqdm.auto import tqdm

    height, width = image_size(pipe, height, width)
    images = []
    batches = range(0, len(prompts), batch_size)
    for lo in tqdm(batches, desc="generating", disable=not progress or len(batches) < 2):
        chunk = prompts[lo: lo + batch_size]
        images += generate_batch(pipe, chunk, [seed + start + lo + i for i in range(len(chunk))], steps=steps,
                                 guidance_scale=guidance_scale, height=height, width=width,
                                 negative_prompt=negative_prompt, first_index=start + lo)
    return images


def make_grid(images, cols: int | None = None):
    """Images side by side in rows of `cols` (default: near-square)."""
    from PIL import Image

    if not images:
        raise ValueError("make_grid: no images")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    return grid


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
    for flag in ("num_images", "steps", "batch_size"):
        value = getattr(args, flag)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"--{flag}: expected a positive integer, got {value!r}")
    prompts = [p for p in read_prompts(args.prompt, args.prompts_file) for _ in range(args.num_images)]
    out = Path(args.out)
    names = getattr(args, "task_names", None)
    if len(args.tuners or []) > 1:
        return _run_multitask(args, prompts, out, task_names(args.tuners, names))
    if names:
        raise ValueError(f"--task_names: names the tasks of several --tuners files; got {len(args.tuners or [])} "
                         f"--tuners")
    tuners = args.tuners[0] if args.tuners else None
    pipe = load_pipeline(args.pretrained_model_name_or_path, tuners, device=args.device, dtype=args.dtype,
                         scheduler=args.scheduler, scale=args.scale, karras_sigmas=getattr(args, "karras_sigmas", 0),
                         revision=getattr(args, "revision", None), variant=getattr(args, "variant", None))
    images = generate_images(pipe, prompts, seed=args.seed, steps=args.steps, guidance_scale=args.guidance_scale,
                             batch_size=args.batch_size, height=args.height, width=args.width,
                             negative_prompt=args.negative_prompt)
    return _save_all(images, out, _records(args, pipe, prompts, tuners, images[0].size))


def _records(args, pipe, prompts: list[str], tuners, size: tuple[int, int]) -> list[dict]:
    """What made each image: written into its PNG text and the folder's index.json."""
    sha = _sha256(tuners) if tuners else None
    return [{"prompt": p, "negative_prompt": args.negative_prompt, "seed": args.seed + i, "steps": args.steps,
             "guidance_scale": args.guidance_scale, "sampler": pipe.sampler_name, "width": size[0], "height": size[1],
             "model": str(args.pretrained_model_name_or_path), "tuners": str(tuners) if tuners else None,
             "tuners_sha256": sha, "scale": args.scale if tuners else None} for i, p in enumerate(prompts)]


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


def _run_multitask(args, prompts: list[str], out: Path, names: list[str]) -> list[Path]:
    """Several tuner files (bypasses): one backbone pass per step serves every task. Every flag means what it means
    for one file: image i has seed + i, --batch_size prompts per denoising loop, --scale and --negative_prompt."""
    from tqdm.auto import tqdm

    pipe = load_pipeline(args.pretrained_model_name_or_path, None, device=args.device, dtype=args.dtype,
                         scheduler=args.scheduler, karras_sigmas=getattr(args, "karras_sigmas", False),
                         revision=getattr(args, "revision", None), variant=getattr(args, "variant", None))
    handles = {}
    for name, path in zip(names, args.tuners):
        handles[name] = load_tuners(pipe.unet, path, name=f"task:{name}")
        handles[name].scale = args.scale
    height, width = image_size(pipe, args.height, args.width)
    results: dict[str, list] = {name: [] for name in names}
    for lo in tqdm(range(0, len(prompts), args.batch_size), desc="generating"):
        chunk = prompts[lo: lo + args.batch_size]
        latents = initial_latents(pipe, [args.seed + lo + i for i in range(len(chunk))], height, width)
        negative = [args.negative_prompt] * len(chunk) if args.negative_prompt else None
        batch = generate_multitask(pipe, handles, chunk, num_inference_steps=args.steps,
                                   guidance_scale=args.guidance_scale, negative_prompt=negative, height=height,
                                   width=width, latents=latents, output_type="np", seed=args.seed + lo)
        for name, images in batch.items():
            check_finite(images, lo)
            results[name].extend(pipe.numpy_to_pil(images))
    size = (width, height)
    return [p for (name, images), path in zip(results.items(), args.tuners)
            for p in _save_all(images, out / name, _records(args, pipe, prompts, path, size))]
