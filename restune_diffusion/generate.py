"""Text -> images with tuned weights: a plain diffusers StableDiffusionPipeline with tuner files attached.

Seeds are per image (seed + index), so a result does not depend on the batch size and an interrupted run can resume.
Several bypass files at once go through one backbone pass per step (restune_diffusion.multitask).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

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
                  scheduler: str = "ddim", scale: float = 1.0):
    """A StableDiffusionPipeline over `base` ("tiny" or a local SD v1.5 folder) with tuner file(s) attached.

    The handles are on `pipe.tuner_handles` (name -> handle); `scale` sets the tuners' strength.
    """
    from restune_diffusion.models import build_pipeline, load_model
    from restune_diffusion.weights import load_tuners

    device = device or default_device()
    dtype = parse_dtype(dtype, device) if not isinstance(dtype, torch.dtype) else dtype
    sd = load_model(base, dtype=dtype, device=device)
    pipe = build_pipeline(sd, scheduler=scheduler)
    pipe.tuner_handles = {}
    paths = [tuners] if isinstance(tuners, (str, os.PathLike)) else list(tuners or [])
    for path in paths:
        name = Path(path).stem if len(paths) > 1 else None
        handle = load_tuners(sd.unet, path, name=name, device=device)
        handle.scale = scale
        pipe.tuner_handles[handle.name] = handle
    return pipe


def image_size(pipe, height: int | None, width: int | None) -> tuple[int, int]:
    """The model's native size unless asked (512 for SD v1.5); multiples of 8 as the VAE needs."""
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = height or native, width or native
    for name, value in (("height", height), ("width", width)):
        if value % 8:
            raise ValueError(f"--{name} must be a multiple of 8, got {value}")
    return height, width


@torch.no_grad()
def generate_images(pipe, prompts: list[str], seed: int = 0, steps: int = 50, guidance_scale: float = 7.5,
                    batch_size: int = 4, height: int | None = None, width: int | None = None,
                    negative_prompt: str | None = None, start: int = 0, progress: bool = True):
    """One image per prompt; image i uses torch.Generator seeded with seed + start + i. Returns PIL images."""
    from tqdm.auto import tqdm

    height, width = image_size(pipe, height, width)
    device = pipe.unet.device
    images = []
    batches = range(0, len(prompts), batch_size)
    for lo in tqdm(batches, desc="generating", disable=not progress or len(batches) < 2):
        chunk = prompts[lo: lo + batch_size]
        generators = [torch.Generator(device="cpu").manual_seed(seed + start + lo + i) for i in range(len(chunk))]
        latents = torch.stack([torch.randn(pipe.unet.config.in_channels, height // pipe.vae_scale_factor,
                                           width // pipe.vae_scale_factor, generator=g) for g in generators])
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance_scale, height=height, width=width,
                   negative_prompt=[negative_prompt] * len(chunk) if negative_prompt else None,
                   latents=latents.to(device=device, dtype=pipe.unet.dtype))
        images.extend(out.images)
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


def save_image(image, path: str | os.PathLike) -> Path:
    """PNG written atomically (a resumed run never meets a half-written image)."""
    from restune_diffusion.weights import atomic_write

    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


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
    prompts = [p for p in read_prompts(args.prompt, args.prompts_file) for _ in range(args.num_images)]
    out = Path(args.out)
    if len(args.tuners or []) > 1:
        return _run_multitask(args, prompts, out)
    pipe = load_pipeline(args.pretrained_model_name_or_path, args.tuners[0] if args.tuners else None,
                         device=args.device, dtype=args.dtype, scheduler=args.scheduler, scale=args.scale)
    images = generate_images(pipe, prompts, seed=args.seed, steps=args.steps, guidance_scale=args.guidance_scale,
                             batch_size=args.batch_size, height=args.height, width=args.width,
                             negative_prompt=args.negative_prompt)
    return _save_all(images, out)


def _save_all(images, out: Path) -> list[Path]:
    paths = [save_image(image, out / f"{i:05d}.png") for i, image in enumerate(images)]
    paths.append(save_image(make_grid(images), out / "grid.png"))
    print(f"wrote {len(images)} images and grid.png to {out}")
    return paths


def _run_multitask(args, prompts: list[str], out: Path) -> list[Path]:
    """Several tuner files (bypasses): one backbone pass per step serves every task."""
    from restune_diffusion.models import build_pipeline, load_model
    from restune_diffusion.multitask import generate_multitask

    device = args.device or default_device()
    sd = load_model(args.pretrained_model_name_or_path, dtype=parse_dtype(args.dtype, device), device=device)
    pipe = build_pipeline(sd, scheduler=args.scheduler)
    tasks = {Path(p).stem: p for p in args.tuners}
    if len(tasks) != len(args.tuners):
        raise ValueError(f"--tuners: file names must differ (they name the tasks), got {args.tuners}")
    height, width = image_size(pipe, args.height, args.width)
    results = generate_multitask(pipe, tasks, prompts, num_inference_steps=args.steps,
                                 guidance_scale=args.guidance_scale, seed=args.seed, height=height, width=width)
    return [p for name, images in results.items() for p in _save_all(images, out / name)]
