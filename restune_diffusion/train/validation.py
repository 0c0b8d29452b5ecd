"""Validation during training: sample grids of the validation prompts (the one sampling path, sampling.py) and the
held-out loss of --validation_split (kohya's flag), each with the weights validation uses (the EMA under --use_ema).

Validation never changes the dtype of the model being trained and builds its pipeline from the components in memory
(PITFALLS: validation downcasts the live model; validation OOM); its latents are decoded in fp32.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import sys
from pathlib import Path

import numpy as np
import torch

from restune_diffusion.data import eval_batches, tokenize_captions
from restune_diffusion.files import atomic_write
from restune_diffusion.models import build_pipeline
from restune_diffusion.sampling import NonFiniteImagesError, SamplingSettings, generate, make_grid
from restune_diffusion.train.loss import diffusion_loss, seed_for

VALIDATION_INFERENCE_STEPS = 30  # as diffusers' LoRA script
HELDOUT_TIMESTEPS = 4  # each held-out sample is scored at t = (k + 1/2)·T/4: 125, 375, 625, 875 for T = 1000


def generate_grid(sd, prompts: list[str], num_images: int, resolution: int, seed: int, weight_dtype, device):
    """A row of `num_images` per prompt from the live tuned UNet (grid image i from seed + i), autocast in the
    weight dtype (fp32 tuners meet half-precision inputs), decoded in fp32. None, and a warning, if some came out
    NaN/Inf."""
    settings = SamplingSettings(steps=VALIDATION_INFERENCE_STEPS, seed=seed, batch_size=num_images)
    try:
        images = generate(build_pipeline(sd), [p for p in prompts for _ in range(num_images)], settings,
                          height=resolution, width=resolution, amp_dtype=weight_dtype, fp32_decode=True)[0]
    except NonFiniteImagesError as err:
        print(f"warning: validation images not written: {err}", file=sys.stderr)
        return None
    return make_grid(images, cols=num_images)  # a row per prompt


def validation_weights(task):
    """Inside: the weights validation uses, the EMA under --use_ema (ema.TunerEMA.applied), else the live ones."""
    return task.ema.applied() if task.ema is not None else contextlib.nullcontext()


def validation_due(run, step: int) -> bool:
    """Every --validation_steps steps, at the end of every --validation_epochs-th epoch, and at the last step."""
    args, per_epoch = run.args, run.steps_per_epoch
    by_epochs = bool(args.validation_epochs and step % per_epoch == 0 and (step // per_epoch) % args.validation_epochs
                     == 0)
    return step == run.max_train_steps or bool(args.validation_steps and step % args.validation_steps == 0) or by_epochs


def validate(run, task) -> Path | None:
    """Grid of the validation prompts at this step: <task folder>/validation/step-<N>.png (main process) and the
    trackers. Call with only this task's tuners enabled (joint.only)."""
    a, args = run.accelerator, task.args
    if not (args.validation_prompt and args.num_validation_images) or not a.is_main_process:
        return None
    with validation_weights(task):
        grid = generate_grid(run.sd, args.validation_prompt, args.num_validation_images, args.resolution, args.seed,
                             run.weight_dtype, a.device)
    if grid is None:
        return None
    path = atomic_write(task.output_dir / "validation" / f"step-{run.global_step}.png",
                        lambda tmp: grid.save(tmp, format="PNG"))
    tag = f"{task.prefix}validation"
    for tracker in a.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, np.asarray(grid)[None], run.global_step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({tag: [np.asarray(grid)]}, step=run.global_step)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return path


# ---------------------------------------------------------------------------------------------------------------------
# held-out validation loss (kohya's --validation_split)
def validation_seed(args) -> int:
    return args.seed if args.validation_seed is None else args.validation_seed


def split_heldout(dataset, fraction: float, seed: int):
    """(training part, held-out part or None): a seeded `fraction` of the images (at least one) never trained on.
    Both parts are shallow copies of `dataset` with their own `samples` (what the data classes index), split by image
    so that no image is on both sides (COCO's captions of one image are several samples); no caption dropout in the
    held-out part."""
    if not fraction:
        return dataset, None
    samples = getattr(dataset, "samples", None)
    if samples is None:
        raise ValueError(f"--validation_split: the data set ({type(dataset).__name__}) has no sample list to split")
    images = list(dict.fromkeys(str(s.path) for s in samples))
    count = max(1, round(len(images) * fraction))
    if count >= len(images):
        raise ValueError(f"--validation_split {fraction}: holds out {count} of {len(images)} images, leaving none to "
                         "train on; pass a smaller fraction")
    order = np.random.default_rng([seed, 17]).permutation(len(images))  # 17: a stream of its own
    held = {images[i] for i in order[:count]}
    train_part, heldout = copy.copy(dataset), copy.copy(dataset)
    train_part.samples = [s for s in samples if str(s.path) not in held]
    heldout.samples = [s for s in samples if str(s.path) in held]
    if hasattr(heldout, "caption_dropout_rate"):
        heldout.caption_dropout_rate = 0.0
    return train_part, heldout


@torch.no_grad()
def heldout_loss(run, task) -> float:
    """The training loss (min-SNR weighted with --snr_gamma) of the held-out images with the model as it is: each at
    HELDOUT_TIMESTEPS fixed timesteps with noise seeded by (validation seed, image index, timestep), latents the VAE
    posterior's mean. The same weights give the same number, whatever the batch size or the step."""
    args, sd, data, device = task.args, run.sd, run.heldout, run.accelerator.device
    seed, num = validation_seed(args), sd.noise_scheduler.config.num_train_timesteps
    steps = [int((k + 0.5) * num / HELDOUT_TIMESTEPS) for k in range(HELDOUT_TIMESTEPS)]
    autocast = (torch.autocast(device.type, dtype=run.weight_dtype) if run.weight_dtype != torch.float32
                else contextlib.nullcontext())
    training, total = run.model.training, 0.0
    run.model.eval()
    try:
        for indices in eval_batches(data, args.train_batch_size):  # one size per batch (buckets)
            items = [data[i] for i in indices]
            pixels = torch.stack([item["pixel_values"] for item in items]).to(device, run.weight_dtype)
            latents = sd.vae.encode(pixels).latent_dist.mode() * sd.vae.config.scaling_factor  # (B, 4, h, w)
            ids = tokenize_captions(sd.tokenizer, [item["caption"] for item in items]).to(device)
            text_states = sd.text_encoder(ids, return_dict=False)[0]  # (B, 77, D)
            for k, t in enumerate(steps):
                noise = torch.stack([torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(
                    seed_for(seed, i, k))) for i in indices]).to(device, latents.dtype)
                timesteps = torch.full((len(items),), t, device=device, dtype=torch.long)
                with autocast:
                    loss = diffusion_loss(sd.unet, sd.noise_scheduler, latents, text_states, noise, timesteps,
                                          args.snr_gamma)
                total += loss.item() * len(items)
    finally:
        run.model.train(training)
    return total / (len(data) * len(steps))


def measure_heldout(run, task) -> float | None:
    """The held-out loss with the weights validation uses (the EMA under --use_ema); main process, else None. Call
    with only this task's tuners enabled (joint.only)."""
    if run.heldout is None or not run.accelerator.is_main_process:
        return None
    with validation_weights(task):
        return heldout_loss(run, task)
