"""One way to sample: the settings (sampler, steps, guidance, negative prompt, seed rule, batch) as one object with one
argparse group, and one indexed generator, under generate.py, the evaluation, the tiny world, training's validation
grids and multi-task generation (multitask.py). Classifier-free guidance is diffusers' pipeline's, written nowhere here.

The seed rule: image i of a run starts from noise drawn from its own CPU generator seeded with
`image_seed(seed, i, stride)`, and a stochastic sampler ("Euler a") draws image i's step noise from a second generator
of its own derived from that seed. So image i is the same image whatever the batch size, the number of processes
(each generates the indices it is given) or the number of tasks (K tasks' rows are K copies of the batch, each copy
with fresh generators): it depends on its seed, prompt and model only (up to the last bits of float arithmetic, which
may follow the batch's shape). stride 1 is A1111's "seed + i" (generate.py: a seed read from an image's metadata
regenerates it); evaluation protocols use PROTOCOL_STRIDE, so the images of different seeds never overlap.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from restune_diffusion.models import native_resolution
from restune_diffusion.samplers import make_scheduler, sampler_key, sampler_label

DEFAULT_GUIDANCE = 7.5  # SD v1.5's classifier-free guidance scale (diffusers' default; its model card's curve)
DEFAULT_STEPS = 50
DEFAULT_SCHEDULER = "ddim"
PROTOCOL_STRIDE = 1_000_000  # evaluation protocols: image i of seed s is seed s·10⁶ + i


def image_seed(seed: int, index: int, stride: int = 1) -> int:
    """The seed of image `index` of a run with `seed`: seed·stride + index."""
    return seed * stride + index


@dataclass(frozen=True)
class SamplingSettings:
    """How images are sampled; image i of a run depends on these, its prompt and the model only.

    scheduler None keeps the pipeline's own sampler (load_pipeline's); a name ("Euler a", "DPM++ 2M Karras", ...)
    builds it from the pipeline's config for each call (samplers.py).
    """

    scheduler: str | None = DEFAULT_SCHEDULER
    karras_sigmas: bool = False
    steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE
    negative_prompt: str | None = None
    seed: int = 0
    seed_stride: int = 1  # image i's seed: seed·stride + i (generate.py: 1; evaluation: PROTOCOL_STRIDE)
    batch_size: int = 4

    def __post_init__(self):
        for name in ("steps", "batch_size", "seed_stride"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"--{name}: expected a positive integer, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"--seed: expected an integer >= 0, got {self.seed!r}")
        if isinstance(self.guidance_scale, bool) or not isinstance(self.guidance_scale, (int, float)):
            raise ValueError(f"--guidance_scale: expected a number, got {self.guidance_scale!r}")
        if self.scheduler is not None:
            sampler_key(self.scheduler)  # a bad sampler name fails before anything loads

    def image_seed(self, index: int) -> int:
        return image_seed(self.seed, index, self.seed_stride)

    def replace(self, **changes) -> SamplingSettings:
        return dataclasses.replace(self, **changes)

    def label(self, pipe=None) -> str:
        """The sampler's A1111 name for image metadata ("DPM++ 2M Karras")."""
        if self.scheduler is None:
            return getattr(pipe, "sampler_name", None) or type(pipe.scheduler).__name__
        return sampler_label(self.scheduler, self.karras_sigmas)


# ---------------------------------------------------------------------------------------------------------------------
# the one argparse group (generate.py, eval_fid.py, reproduce_table.py)
_FLAGS = {
    "scheduler": dict(help="sampler: DDIM (default), Euler, 'Euler a', UniPC, 'DPM++ 2M', 'DPM++ 2M Karras', PNDM"),
    "karras_sigmas": dict(action="store_true", help="Karras sigmas (Euler, UniPC, DPM++ 2M)"),
    "steps": dict(type=int, help="denoising steps"),
    "guidance_scale": dict(type=float, help="classifier-free guidance scale"),
    "negative_prompt": dict(help="what the unconditional half of guidance steers away from"),
    "seed": dict(type=int, help="image i is generated from seed·stride + i"),
    "batch_size": dict(type=int, help="images per pipeline call (the images do not depend on it)"),
}


def add_sampling_args(parser: argparse.ArgumentParser, defaults: SamplingSettings | None = SamplingSettings(), *,
                      flags: dict[str, str] | None = None, omit: Sequence[str] = (), sweep: bool = False,
                      helps: dict[str, str] | None = None):
    """The sampling flags as one group. `defaults` None leaves every default None (the caller fills them per mode);
    `flags` renames some (the table: steps -> --eval_steps); `omit` leaves out what the caller sets itself (the
    table's seed is training's); `sweep`: --guidance_scale takes several values; `helps` adds to a flag's help."""
    group = parser.add_argument_group("sampling (restune_diffusion.sampling)")
    for name, kwargs in _FLAGS.items():
        if name in omit:
            continue
        kwargs = dict(kwargs)
        default = getattr(defaults, name) if defaults is not None else None
        if name == "guidance_scale" and sweep:
            kwargs["nargs"] = "+"
            default = [default] if default is not None else None
        if name == "karras_sigmas":
            default = bool(default)
        help_text = kwargs.pop("help") + (f"; {helps[name]}" if helps and name in helps else "")
        if default is not None and name != "karras_sigmas":
            help_text += f" (default {default if not isinstance(default, list) else default[0]})"
        flag = (flags or {}).get(name, f"--{name}")
        group.add_argument(flag, dest=flag.removeprefix("--"), default=default, help=help_text, **kwargs)
    return group


def sampling_settings(args: argparse.Namespace, *, flags: dict[str, str] | None = None, **fixed) -> SamplingSettings:
    """The settings the group's flags in `args` give; `fixed`: fields the caller sets (seed_stride, an omitted seed,
    one guidance scale of a sweep). Fields left None take SamplingSettings' defaults."""
    values = {}
    for name in _FLAGS:
        dest = (flags or {}).get(name, f"--{name}").removeprefix("--")
        if hasattr(args, dest):
            values[name] = getattr(args, dest)
    values.update(fixed)
    return SamplingSettings(**{k: v for k, v in values.items() if v is not None})


# ---------------------------------------------------------------------------------------------------------------------
# the indexed generator
class NonFiniteImagesError(ValueError):
    """Generated images hold NaN/Inf (from non-finite latents): written nowhere, since they would be black."""


def check_finite(images: np.ndarray, indices: Sequence[int]) -> None:
    """images: (B, H, W, 3) floats before conversion to uint8; raise naming how many (and which) are non-finite."""
    bad = [int(indices[i]) for i in range(len(images)) if not np.isfinite(images[i]).all()]
    if bad:
        raise NonFiniteImagesError(
            f"{len(bad)} of {len(images)} images in this batch have NaN/Inf pixels (image indices {bad[:8]}): the "
            f"denoised latents were non-finite, e.g. fp16 overflow (try --dtype fp32) or a tuner file holding "
            f"NaN/Inf weights. Nothing was written for them (they would be black).")


def image_size(pipe, height: int | None, width: int | None) -> tuple[int, int]:
    """The model's native size unless asked (512 for SD v1.5, 32 for tiny); multiples of 8 as the VAE needs."""
    native = native_resolution(pipe)
    height, width = height or native, width or native
    for name, value in (("height", height), ("width", width)):
        if value % 8:
            raise ValueError(f"--{name} must be a multiple of 8, got {value}")
    return height, width


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


def uses_guidance(pipe, settings: SamplingSettings) -> bool:
    """Whether the pipeline runs classifier-free guidance (two rows per image): diffusers' own rule."""
    return settings.guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None


def _runner(pipe, settings: SamplingSettings, unet):
    """The pipeline to call: `pipe` itself, or one over the same components with the settings' sampler and/or
    another UNet module (multitask.py's K-task router). Nothing of `pipe` changes."""
    changes = {}
    if settings.scheduler is not None:
        changes["scheduler"] = make_scheduler(settings.scheduler, pipe.scheduler.config, settings.karras_sigmas)
    if unet is not None:
        changes["unet"] = unet
    if not changes:
        return pipe
    runner = type(pipe)(**{**pipe.components, **changes}, requires_safety_checker=False)
    runner.set_progress_bar_config(disable=True)
    return runner


@contextlib.contextmanager
def _vae_in_fp32(vae, enabled: bool):
    dtype = vae.dtype
    if enabled and dtype != torch.float32:
        vae.to(torch.float32)  # the frozen VAE only; fp16 -> fp32 -> fp16 is exact
    try:
        with torch.autocast(vae.device.type, enabled=False) if enabled else contextlib.nullcontext():
            yield
    finally:
        if enabled and dtype != torch.float32:
            vae.to(dtype)


@torch.no_grad()
def sample(pipe, prompts: Sequence[str], indices: Sequence[int], settings: SamplingSettings, *,
           height: int | None = None, width: int | None = None, copies: int = 1, unet=None,
           amp_dtype: torch.dtype | None = None, fp32_decode: bool = False) -> np.ndarray:
    """One pipeline call: image j is prompts[j] from the seed of image indices[j]. Returns (copies, B, H, W, 3) floats
    in [0, 1]; raises NonFiniteImagesError naming the images that came out NaN/Inf.

    copies K > 1: the batch's rows are stacked K times (copy k: rows k·B..), each copy with fresh generators, and
    `unet` (multitask.TaskRouter) sends copy k through task k's bypass. `amp_dtype`: autocast for fp32 tuners on
    half-precision frozen weights (training's validation); `fp32_decode`: the VAE decodes in fp32 (an fp16 decode
    can overflow to black).
    """
    if len(prompts) != len(indices):
        raise ValueError(f"sample: {len(prompts)} prompts for {len(indices)} image indices")
    height, width = image_size(pipe, height, width)
    seeds = [settings.image_seed(i) for i in indices]
    runner = _runner(pipe, settings, unet)
    cfg = uses_guidance(pipe, settings)
    negative = [settings.negative_prompt] * len(prompts) if settings.negative_prompt else None
    generators = [g for _ in range(copies) for g in sampler_generators(seeds)]  # fresh per copy: K·B generators
    amp = torch.autocast(pipe.unet.device.type, dtype=amp_dtype) if amp_dtype not in (None, torch.float32) \
        else contextlib.nullcontext()
    with amp:
        text, uncond = pipe.encode_prompt(list(prompts), pipe.text_encoder.device, 1, cfg, negative)  # (B, L, D)
        latents = runner(prompt_embeds=text.repeat(copies, 1, 1),
                         negative_prompt_embeds=uncond.repeat(copies, 1, 1) if cfg else None,
                         num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                         height=height, width=width, generator=generators, output_type="latent",
                         latents=initial_latents(pipe, seeds, height, width).repeat(copies, 1, 1, 1)).images
    with _vae_in_fp32(pipe.vae, fp32_decode):
        vae = pipe.vae
        decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    images = pipe.image_processor.postprocess(decoded, output_type="np", do_denormalize=[True] * len(decoded))
    check_finite(images, list(indices) * copies)
    return images.reshape(copies, len(prompts), *images.shape[1:])


def generate(pipe, prompts: Sequence[str], settings: SamplingSettings, *, start: int = 0, progress: bool = False,
             output_type: str = "pil", **sample_kw) -> list:
    """Every prompt, in batches of settings.batch_size: image i is prompts[i] from the seed of image start + i.
    Returns one entry per copy (one unless `copies` goes on to sample): a list of PIL images, or (N, H, W, 3) floats
    for output_type="np"."""
    from tqdm.auto import tqdm

    if output_type not in ("pil", "np"):
        raise ValueError(f"output_type: expected 'pil' or 'np', got {output_type!r}")
    parts = []
    steps = range(0, len(prompts), settings.batch_size)
    for lo in tqdm(steps, desc="generating", disable=not progress or len(steps) < 2):
        chunk = list(prompts[lo:lo + settings.batch_size])
        images = sample(pipe, chunk, range(start + lo, start + lo + len(chunk)), settings, **sample_kw)
        parts.append(images if output_type == "np" else [pipe.numpy_to_pil(copy) for copy in images])
    if output_type == "np":
        return list(np.concatenate(parts, axis=1))
    return [[image for part in parts for image in part[c]] for c in range(len(parts[0]))] if parts else [[]]


def batches(n: int, batch_size: int, rank: int = 0, world: int = 1) -> list[range]:
    """This process's blocks of image indices: fixed blocks [k·batch, (k+1)·batch), block k -> process k mod world."""
    if batch_size < 1:
        raise ValueError(f"--batch_size: expected a positive integer, got {batch_size}")
    return [range(lo, min(lo + batch_size, n)) for k, lo in enumerate(range(0, n, batch_size)) if k % world == rank]


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
