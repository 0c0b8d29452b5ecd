"""The training objective: noise a batch's latents at random timesteps and score the UNet's prediction of ε (or of
v = α·ε − σ·x0) by MSE, min-SNR weighted with --snr_gamma (Hang et al. 2023). One forward of the model may serve K
tasks (joint.py: rows k·B.. are task k's); a single run is K = 1.

Every random draw of a batch (VAE sample, noise, timesteps) comes from a generator seeded by (seed, process, epoch,
batch), so a resumed run replays the numbers of an uninterrupted one.

Where a new term plugs in: `task_loss`. Prior preservation (DreamBooth), for instance, is one more term per task,
computed from class-image rows carried by the batch or from the frozen model's prediction on the same inputs (which
`StepInputs` would carry, computed once per step before the tasks' forward); nothing else in the loop changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from restune_diffusion.data import tokenize_captions


@dataclass
class StepInputs:
    """One micro-batch as the loss sees it. (B, 4, h, w) latents, noise and target; (B, 77, D) text; (B,) steps."""

    latents: torch.Tensor
    text_states: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023) per sample, (B,): min(SNR, γ)/SNR for ε-prediction and
    min(SNR, γ)/(SNR+1) for v-prediction (diffusers PR #6307 fixed the v form)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)  # (B,)
    clipped = torch.clamp(snr, max=gamma)
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return clipped / snr
    if kind == "v_prediction":
        return clipped / (snr + 1)
    raise ValueError(f"snr_gamma: prediction_type {kind!r} is not supported; expected 'epsilon' or 'v_prediction'")


def prediction_target(noise_scheduler, latents, noise, timesteps) -> torch.Tensor:
    """What the UNet learns to predict: ε, or v = α·ε − σ·x0. (B, 4, h, w)"""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type {kind!r} is not supported; expected 'epsilon' or 'v_prediction'")


def prediction_loss(pred, target, noise_scheduler, timesteps, snr_gamma: float | None) -> torch.Tensor:
    """The mean over the batch of the per-sample MSE, min-SNR weighted when snr_gamma is given. Scalar."""
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
    if snr_gamma is not None:
        loss = loss * min_snr_weights(noise_scheduler, timesteps, snr_gamma)
    return loss.mean()


def task_loss(pred: torch.Tensor, target: torch.Tensor, inputs: StepInputs, noise_scheduler,
              snr_gamma: float | None) -> torch.Tensor:
    """One task's loss from its rows of the prediction: the denoising term. The one place a per-task term is added
    (see the module's docstring). Scalar."""
    return prediction_loss(pred, target, noise_scheduler, inputs.timesteps, snr_gamma)


def task_losses(model, noise_scheduler, inputs: StepInputs, snr_gammas: list) -> torch.Tensor:
    """Each task's loss from one forward of `model` on the noised batch, (K,): the model returns K·B rows, task k's
    in rows k·B.. (K = 1: the plain UNet)."""
    target = prediction_target(noise_scheduler, inputs.latents, inputs.noise, inputs.timesteps)
    noisy = noise_scheduler.add_noise(inputs.latents, inputs.noise, inputs.timesteps)  # (B, 4, h, w)
    pred = model(noisy, inputs.timesteps, inputs.text_states, return_dict=False)[0]  # (K·B, 4, h, w)
    b = inputs.latents.shape[0]
    return torch.stack([task_loss(pred[k * b:(k + 1) * b], target, inputs, noise_scheduler, gamma)
                        for k, gamma in enumerate(snr_gammas)])


def diffusion_loss(unet, noise_scheduler, latents, text_states, noise, timesteps, snr_gamma: float | None = None):
    """The loss of one tuner set (or the base) on one batch: task_losses with K = 1. Scalar."""
    return task_losses(unet, noise_scheduler, StepInputs(latents, text_states, noise, timesteps), [snr_gamma])[0]


def seed_for(*keys: int) -> int:
    """A 62-bit seed from non-negative ints (seed, process, epoch, batch): independent streams, no global RNG."""
    return int(np.random.default_rng(list(keys)).integers(2**62))


@torch.no_grad()
def batch_inputs(batch: dict, sd, generator: torch.Generator, noise_offset: float, dtype: torch.dtype,
                 device) -> StepInputs:
    """The latents, text states, noise and timesteps of a batch; the frozen VAE and text encoder run in `dtype`."""
    if "latent_parameters" in batch:  # --cache_latents: the cached posterior, sampled with an encode's draws
        posterior = DiagonalGaussianDistribution(batch["latent_parameters"].to(device, dtype))  # (B, 2C, h, w)
    else:
        posterior = sd.vae.encode(batch["pixel_values"].to(device, dtype)).latent_dist
    latents = posterior.sample(generator=generator) * sd.vae.config.scaling_factor  # (B, 4, h, w)
    ids = tokenize_captions(sd.tokenizer, batch["captions"]).to(device)
    text_states = sd.text_encoder(ids, return_dict=False)[0]  # (B, 77, D)
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    if noise_offset:  # per-channel offset (crosslabs' "diffusion with offset noise")
        offset = torch.randn((*latents.shape[:2], 1, 1), generator=generator, device=device, dtype=latents.dtype)
        noise = noise + noise_offset * offset
    steps = sd.noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator, device=device).long()
    return StepInputs(latents, text_states, noise, timesteps)
