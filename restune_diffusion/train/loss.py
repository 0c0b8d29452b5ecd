"""The training objective: noise a batch's latents at random timesteps and score the UNet's prediction of ε (or of
v = α·ε − σ·x0) by MSE, min-SNR weighted with --snr_gamma (Hang et al. 2023). One forward of the model may serve K
tasks (joint.py: rows k·N.. are task k's); a single run is K = 1.

Two terms against forgetting, per task (LossTerms), both from the same forward:
- prior preservation (DreamBooth): a batch of B paired items holds 2B rows, the instance images then the class images
  the frozen base drew (data.PairedDataset); the loss is instance MSE + prior_loss_weight × class MSE, the halves split
  with torch.chunk as diffusers does (each half min-SNR weighted by its own timesteps under --snr_gamma; diffusers'
  DreamBooth LoRA script leaves the class half unweighted);
- base-prediction preservation: B more rows, the instance rows' noisy latents and timesteps with a preservation prompt
  each; + preservation_weight × MSE(tuned prediction, frozen base prediction) on them. The model returns the frozen
  prediction beside its own (setup.TunedUNet: a second pass with the tuners off, or, for bypasses, a routed copy of
  the same backbone pass).

Every random draw of a batch (VAE sample, noise, timesteps, preservation prompts) comes from generators seeded by
(seed, process, epoch, batch), so a resumed run replays the numbers of an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from restune_diffusion.data import tokenize_captions

PROMPT_STREAM = 1  # the preservation prompts' draws, apart from the batch generator's (seed_for)


@dataclass
class StepInputs:
    """One micro-batch as the loss sees it. (R, 4, h, w) latents, noise and target; (R, 77, D) text; (R,) steps.
    class_rows C > 0: the last C of the R rows are class images (prior preservation; R = 2C). preserve_states
    (P, 77, D): base-prediction preservation's prompts for the first P rows' noisy latents and timesteps."""

    latents: torch.Tensor
    text_states: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    class_rows: int = 0
    preserve_states: torch.Tensor | None = None
    task_rows: int = 0  # > 0: tasks on their own data (joint.py, routed): task k's rows are k·task_rows..

    def __post_init__(self):
        rows = self.latents.shape[0]
        if self.class_rows and 2 * self.class_rows != rows:
            raise ValueError(f"prior preservation: {self.class_rows} class rows in a batch of {rows}; expected half")
        if self.task_rows and (self.class_rows or self.preserve_states is not None or rows % self.task_rows):
            raise ValueError(f"tasks on their own data: {rows} rows of {self.task_rows} per task, class rows "
                             f"{self.class_rows}; expected whole task blocks and no preservation rows")

    def block(self, k: int) -> StepInputs:
        """Task k's rows of a routed batch."""
        rows = slice(k * self.task_rows, (k + 1) * self.task_rows)
        return StepInputs(self.latents[rows], self.text_states[rows], self.noise[rows], self.timesteps[rows])


@dataclass(frozen=True)
class LossTerms:
    """One task's objective: min-SNR γ (None: off), the class half's weight (used when the batch has class rows),
    the weight of base-prediction preservation (0: off)."""

    snr_gamma: float | None = None
    prior_loss_weight: float = 1.0
    preservation_weight: float = 0.0

    @classmethod
    def of(cls, args) -> LossTerms:
        return cls(args.snr_gamma, args.prior_loss_weight, args.preservation_weight)


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


def task_loss(pred: torch.Tensor, target: torch.Tensor, inputs: StepInputs, noise_scheduler, terms: LossTerms,
              frozen: torch.Tensor | None = None) -> torch.Tensor:
    """One task's loss from its rows of the prediction: the denoising term (R rows; with class rows, instance +
    prior_loss_weight × class), + preservation_weight × MSE against `frozen`, the base's prediction of the P rows
    after them. Scalar."""
    rows, gamma = target.shape[0], terms.snr_gamma
    main = pred[:rows]  # (R, 4, h, w)
    if inputs.class_rows:
        pred_instance, pred_class = torch.chunk(main, 2, dim=0)
        target_instance, target_class = torch.chunk(target, 2, dim=0)
        t_instance, t_class = torch.chunk(inputs.timesteps, 2, dim=0)
        loss = prediction_loss(pred_instance, target_instance, noise_scheduler, t_instance, gamma) + \
            terms.prior_loss_weight * prediction_loss(pred_class, target_class, noise_scheduler, t_class, gamma)
    else:
        loss = prediction_loss(main, target, noise_scheduler, inputs.timesteps, gamma)
    if frozen is not None and terms.preservation_weight:
        loss = loss + terms.preservation_weight * F.mse_loss(pred[rows:].float(), frozen.float())
    return loss


def model_inputs(noise_scheduler, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(sample, timesteps, text states, P) the model runs on: the R noised rows, then P preservation rows (the first
    P rows' noisy latents and timesteps with the preservation prompts)."""
    noisy = noise_scheduler.add_noise(inputs.latents, inputs.noise, inputs.timesteps)  # (R, 4, h, w)
    states, timesteps = inputs.text_states, inputs.timesteps
    if inputs.preserve_states is None:
        return noisy, timesteps, states, 0
    p = inputs.preserve_states.shape[0]
    return (torch.cat([noisy, noisy[:p]]), torch.cat([timesteps, timesteps[:p]]),
            torch.cat([states, inputs.preserve_states.to(states.dtype)]), p)


def task_losses(model, noise_scheduler, inputs: StepInputs, terms: list[LossTerms]) -> torch.Tensor:
    """Each task's loss from one forward of `model` on the noised batch, (K,): the model returns K·N rows, task k's
    in rows k·N.. (K = 1: the plain UNet); with preservation rows it also returns the frozen base's prediction of
    them (`frozen_rows`, setup.TunedUNet)."""
    target = prediction_target(noise_scheduler, inputs.latents, inputs.noise, inputs.timesteps)  # (R, 4, h, w)
    if inputs.task_rows:  # R = K·B rows, task k's own in rows k·B..; the model routes them (one backbone pass)
        noisy = noise_scheduler.add_noise(inputs.latents, inputs.noise, inputs.timesteps)
        pred = model(noisy, inputs.timesteps, inputs.text_states, return_dict=False, routed=True)[0]
        b = inputs.task_rows
        return torch.stack([task_loss(pred[k * b:(k + 1) * b], target[k * b:(k + 1) * b], inputs.block(k),
                                      noise_scheduler, t) for k, t in enumerate(terms)])
    sample, timesteps, states, p = model_inputs(noise_scheduler, inputs)  # N = R + P rows
    out = model(sample, timesteps, states, return_dict=False, **({"frozen_rows": p} if p else {}))
    pred, frozen = out[0], (out[1] if p else None)  # (K·N, 4, h, w), (P, 4, h, w)
    n = sample.shape[0]
    return torch.stack([task_loss(pred[k * n:(k + 1) * n], target, inputs, noise_scheduler, t, frozen)
                        for k, t in enumerate(terms)])


def diffusion_loss(unet, noise_scheduler, latents, text_states, noise, timesteps, snr_gamma: float | None = None):
    """The loss of one tuner set (or the base) on one batch: task_losses with K = 1. Scalar."""
    return task_losses(unet, noise_scheduler, StepInputs(latents, text_states, noise, timesteps),
                       [LossTerms(snr_gamma)])[0]


def draw_prompts(prompts: list[str], count: int, *keys: int) -> list[str]:
    """`count` preservation prompts, drawn with replacement by a generator seeded by `keys` (seed, process, epoch,
    batch): one per instance row."""
    rng = np.random.default_rng([*keys, PROMPT_STREAM])
    return [prompts[i] for i in rng.integers(len(prompts), size=count)]


def seed_for(*keys: int) -> int:
    """A 62-bit seed from non-negative ints (seed, process, epoch, batch): independent streams, no global RNG."""
    return int(np.random.default_rng(list(keys)).integers(2**62))


def encode_text(sd, captions: list[str], device) -> torch.Tensor:
    """(B, 77, D) text states of the frozen text encoder."""
    ids = tokenize_captions(sd.tokenizer, captions).to(device)
    return sd.text_encoder(ids, return_dict=False)[0]


def routed_inputs(batch: dict, sd, seed: int, noise_offset: float, dtype: torch.dtype, device) -> StepInputs:
    """A batch of K tasks' blocks (data.task_collate): each block's draws from a generator seeded by `seed` alone,
    the draws an alone run of the task makes for the same batch; the blocks stacked, task_rows = B."""
    b, n = batch["task_rows"], len(batch["captions"])
    parts = []
    for start in range(0, n, b):
        block = {k: v[start:start + b] for k, v in batch.items() if k != "task_rows"}
        parts.append(batch_inputs(block, sd, torch.Generator(device).manual_seed(seed), noise_offset, dtype, device))
    stacked = (torch.cat([getattr(p, name) for p in parts]) for name in ("latents", "text_states", "noise",
                                                                          "timesteps"))
    return StepInputs(*stacked, task_rows=b)


@torch.no_grad()
def batch_inputs(batch: dict, sd, generator: torch.Generator, noise_offset: float, dtype: torch.dtype,
                 device, preserve_prompts: list[str] | None = None) -> StepInputs:
    """The latents, text states, noise and timesteps of a batch (its class rows counted), and the states of the
    preservation prompts when given; the frozen VAE and text encoder run in `dtype`."""
    if "latent_parameters" in batch:  # --cache_latents: the cached posterior, sampled with an encode's draws
        posterior = DiagonalGaussianDistribution(batch["latent_parameters"].to(device, dtype))  # (B, 2C, h, w)
    else:
        posterior = sd.vae.encode(batch["pixel_values"].to(device, dtype)).latent_dist
    latents = posterior.sample(generator=generator) * sd.vae.config.scaling_factor  # (B, 4, h, w)
    text_states = encode_text(sd, batch["captions"], device)  # (B, 77, D)
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    if noise_offset:  # per-channel offset (crosslabs' "diffusion with offset noise")
        offset = torch.randn((*latents.shape[:2], 1, 1), generator=generator, device=device, dtype=latents.dtype)
        noise = noise + noise_offset * offset
    steps = sd.noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator, device=device).long()
    preserve = encode_text(sd, preserve_prompts, device) if preserve_prompts else None  # (P, 77, D)
    return StepInputs(latents, text_states, noise, timesteps, int(batch.get("class_rows", 0)), preserve)
