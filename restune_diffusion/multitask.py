"""Multi-task inference with Res-Tuning-Bypass (paper Sec. 3.3): K task bypasses on one UNet, one backbone pass.

When can backbone features be shared? The backbone (everything before the bypass target) reads the latents, the
timestep and the text, and no bypass changes what it computes. So:
- At the first denoising step every task starts from the same noise, prompt and timestep: the backbone input is
  identical, and ONE backbone pass on B rows feeds all K bypasses (`broadcast=True`: the output has K·B rows).
- From the second step on, each task's latents follow its own trajectory (its bypass changed its noise prediction),
  so the backbone inputs differ and no feature can be shared. The K tasks' latents are stacked into one batch of
  K·B rows and the backbone runs ONCE on it; bypass k reads rows k·B..(k+1)·B of every feature (`route_bypasses`).
  Same FLOPs as K passes, but one kernel launch per op instead of K, and the text encoding is shared.
Features are shared across tasks only when the rows are equal: same prompt, same timestep AND same latents, which
with K different bypasses holds at step 1 only. Tasks sharing one bypass (or None, the base UNet) stay equal longer,
but nothing here relies on that.

`shared=False` runs the K tasks as K separate backbone passes, with the same result: the baseline for timing.
"""

from __future__ import annotations

import contextlib
import copy
import os
from typing import Any, Iterator, Mapping, Sequence

import torch

from restune_diffusion.tuners.bypass import BypassHub
from restune_diffusion.weights import load_tuners


def _hub(unet, handles: Sequence) -> BypassHub:
    hub = BypassHub.of(unet)
    if hub is None:
        raise ValueError("handles: this UNet has no bypass attached; attach or load_tuners bypass sets first")
    if not handles:
        raise ValueError("handles: expected at least one task (a bypass handle, or None for the base UNet)")
    for handle in handles:
        if handle is not None:
            hub.run_of(handle)
    return hub


@contextlib.contextmanager
def route_bypasses(unet, handles: Sequence, broadcast: bool = False) -> Iterator[None]:
    """Inside: a UNet forward sends batch slice k (of K equal slices) through bypass handles[k] (None: the base UNet).
    broadcast=True: the input is one slice shared by all tasks, and the output has K times its rows. Inside, the
    handles' enabled flags are ignored and bypass sets not routed do nothing; non-bypass tuner sets act on every row."""
    hub = _hub(unet, handles)
    if hub.route is not None:
        raise RuntimeError("route_bypasses: a route is already active on this UNet (no nesting)")
    runs = [None if h is None else hub.run_of(h) for h in handles]
    hub.route, hub.broadcast = runs, broadcast
    try:
        yield
    finally:
        hub.route, hub.broadcast = None, False


def _rows(value, rows: slice, n: int):
    return value[rows] if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == n else value


@torch.no_grad()
def multitask_unet_forward(unet, handles: Sequence, sample: torch.Tensor, timestep, encoder_hidden_states,
                           shared: bool = True, broadcast: bool = False, **unet_kwargs) -> torch.Tensor:
    """The UNet's output for K tasks: slice k of `sample` (K·B rows) through bypass handles[k] (None: base).

    shared=True: one backbone pass on the stacked batch; shared=False: K passes of B rows (the timing baseline).
    broadcast=True: `sample` has B rows, the same input for every task; returns K·B rows.
    """
    k, n = len(handles), sample.shape[0]
    if not broadcast and n % max(k, 1):
        raise ValueError(f"sample: {n} rows do not split into {k} equal task slices")
    if shared:
        with route_bypasses(unet, handles, broadcast):
            return unet(sample, timestep, encoder_hidden_states, **unet_kwargs, return_dict=False)[0]
    size = n if broadcast else n // k
    outs = []
    for i, handle in enumerate(handles):
        rows = slice(None) if broadcast else slice(i * size, (i + 1) * size)
        with route_bypasses(unet, [handle]):
            outs.append(unet(_rows(sample, rows, n), _rows(timestep, rows, n), _rows(encoder_hidden_states, rows, n),
                             **unet_kwargs, return_dict=False)[0])
    return torch.cat(outs)


def _task_handles(unet, tasks: Mapping) -> tuple[list, list]:
    """(handles, the ones loaded here to detach afterwards). A task is a tuner file, an attached handle, or None."""
    if not isinstance(tasks, Mapping) or not tasks:
        raise ValueError(f"tasks: expected a non-empty mapping name -> tuner file | handle | None, got {tasks!r}")
    handles, loaded = [], []
    try:
        for name, task in tasks.items():
            if isinstance(task, (str, os.PathLike)):
                task = load_tuners(unet, task, name=f"multitask:{name}")
                loaded.append(task)
            elif task is not None and getattr(task, "unet", None) is not unet:
                raise ValueError(f"tasks[{name!r}]: expected a tuner file path, a handle attached to pipe.unet, or "
                                 f"None; got {type(task).__name__}")
            handles.append(task)
        _hub(unet, [h for h in handles if h is not None] or [None])
    except Exception:
        for handle in loaded:
            handle.detach()
        raise
    return handles, loaded


def _clone(generator: torch.Generator | None, seed: int, device) -> torch.Generator:
    """An independent copy per task, so each task draws what it would draw alone (stochastic schedulers too)."""
    if generator is not None:
        clone = torch.Generator(device=generator.device)
        clone.set_state(generator.get_state())
        return clone
    return torch.Generator(device=device).manual_seed(seed)


@torch.no_grad()
def generate_multitask(pipe, tasks: Mapping[str, Any], prompt: str | list[str], num_inference_steps: int = 50,
                       guidance_scale: float = 7.5, negative_prompt: str | list[str] | None = None,
                       height: int | None = None, width: int | None = None, num_images_per_prompt: int = 1,
                       generator: torch.Generator | None = None, seed: int | None = None, eta: float = 0.0,
                       shared: bool = True, output_type: str = "pil",
                       latents: torch.Tensor | None = None) -> dict[str, Any]:
    """Images for K tasks from one denoising loop: {task name: images} (a list of PIL images for output_type="pil").

    `tasks`: name -> bypass tuner file | attached bypass handle | None (the base UNet). Each task gets what a
    `pipe(prompt, ...)` call with only its bypass enabled and the same seed/generator gives; the backbone runs once
    per step on the K tasks' stacked latents (shared=False: K runs per step, for timing). `latents`: the starting
    noise (B·num_images_per_prompt, C, h, w), the same for every task, as `pipe(latents=...)` takes it.
    """
    unet = pipe.unet
    if not isinstance(num_inference_steps, int) or num_inference_steps <= 0:
        raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
    handles, loaded = _task_handles(unet, tasks)
    try:
        latents = _denoise(pipe, handles, prompt, num_inference_steps, guidance_scale, negative_prompt, height,
                           width, num_images_per_prompt, generator, seed, eta, shared, latents)
        images = {}
        for name, x in zip(tasks, latents):
            image = pipe.vae.decode(x / pipe.vae.config.scaling_factor, return_dict=False)[0]
            images[name] = pipe.image_processor.postprocess(image, output_type=output_type,
                                                            do_denormalize=[True] * image.shape[0])
        return images
    finally:
        for handle in loaded:
            handle.detach()


def _denoise(pipe, handles, prompt, steps, guidance_scale, negative_prompt, height, width, per_prompt, generator,
             seed, eta, shared, start=None) -> list[torch.Tensor]:
    """The StableDiffusionPipeline loop, one scheduler and latent trajectory per task, one UNet call per step."""
    unet, device, k = pipe.unet, pipe._execution_device, len(handles)
    height = height or unet.config.sample_size * pipe.vae_scale_factor
    width = width or unet.config.sample_size * pipe.vae_scale_factor
    cfg = guidance_scale > 1.0 and unet.config.time_cond_proj_dim is None
    text, negative = pipe.encode_prompt(prompt, device, per_prompt, cfg, negative_prompt)
    text = torch.cat([negative, text]) if cfg else text  # (R, L, D), R = 2B with guidance
    batch = text.shape[0] // (2 if cfg else 1)
    schedulers = [copy.deepcopy(pipe.scheduler) for _ in handles]
    for scheduler in schedulers:
        scheduler.set_timesteps(steps, device=device)
    if generator is None and seed is None:  # one draw for all tasks: they must start from the same noise
        seed = int(torch.randint(0, 2**62, ()))
    generators = [_clone(generator, seed, device) for _ in handles]
    latents = [pipe.prepare_latents(batch, unet.config.in_channels, height, width, text.dtype, device, g, start)
               for g in generators]
    extra = [pipe.prepare_extra_step_kwargs(g, eta) for g in generators]
    for t in schedulers[0].timesteps:
        inputs = [s.scale_model_input(torch.cat([x] * 2) if cfg else x, t) for s, x in zip(schedulers, latents)]
        if shared and all(torch.equal(inputs[0], x) for x in inputs[1:]):  # same rows (step 1): one pass feeds all K
            noise = multitask_unet_forward(unet, handles, inputs[0], t, text, broadcast=True)
        else:
            noise = multitask_unet_forward(unet, handles, torch.cat(inputs), t, text.repeat(k, 1, 1), shared=shared)
        for i, eps in enumerate(noise.chunk(k)):
            if cfg:
                uncond, cond = eps.chunk(2)
                eps = uncond + guidance_scale * (cond - uncond)
            latents[i] = schedulers[i].step(eps, t, latents[i], **extra[i], return_dict=False)[0]
    return latents
