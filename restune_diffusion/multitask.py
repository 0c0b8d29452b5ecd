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

`generate_multitask` runs the K tasks through diffusers' pipeline as K copies of one batch (sampling.sample), so
each task's image i has the seed rule, sampler noise and guidance of image i generated alone. `shared=False` runs
the K tasks as K separate backbone passes, with the same result: the baseline for timing.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from restune_diffusion.sampling import SamplingSettings, generate, uses_guidance
from restune_diffusion.tuners.bypass import BypassHub
from restune_diffusion.weights import load_tuners


def check_bypass_only(types: Iterable[str], what: str) -> None:
    """A task is a bypass and nothing else: one backbone pass serves every task and only bypasses are routed per
    task, so any other tuner of a task's set would act on every task's rows. Refused in one line naming `what`."""
    others = sorted(set(types) - {"bypass"})
    if others:
        raise ValueError(f"{what}: holds {' + '.join(others)} tuners besides its bypass; multi-task mode runs one "
                         "backbone pass for every task and routes only bypasses, so they would act on every task's "
                         "images. Generate with this file on its own")


def _hub(unet, handles: Sequence) -> BypassHub:
    hub = BypassHub.of(unet)
    if hub is None:
        raise ValueError("handles: this UNet has no bypass attached; attach or load_tuners bypass sets first")
    if not handles:
        raise ValueError("handles: expected at least one task (a bypass handle, or None for the base UNet)")
    for handle in handles:
        if handle is not None:
            hub.run_of(handle)
            check_bypass_only((c.type for c in handle.configs), f"tuner set '{handle.name}'")
    return hub


@contextlib.contextmanager
def route_bypasses(unet, handles: Sequence, broadcast: bool = False) -> Iterator[None]:
    """Inside: a UNet forward sends batch slice k (of K equal slices) through bypass handles[k] (None: the base UNet).
    broadcast=True: the input is one slice shared by all tasks, and the output has K times its rows. Inside, the
    handles' enabled flags are ignored and bypass sets not routed do nothing; non-bypass tuner sets act on every row
    (a routed set holding anything besides its bypass is refused: check_bypass_only)."""
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
                path, task = task, load_tuners(unet, task, name=f"multitask:{name}")
                loaded.append(task)
                check_bypass_only((c.type for c in task.configs), os.fspath(path))
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


class TaskRouter(nn.Module):
    """The UNet as a StableDiffusionPipeline sees it when its batch holds K tasks' copies of the same images
    (sampling.sample with copies=K): the rows come as [guidance half g][task k][image b] (g: unconditional then
    conditional), and task k's rows go through bypass handles[k]. Where every task's rows are equal (the first
    denoising step), one backbone pass on one task's rows feeds all K bypasses; otherwise the backbone runs once on
    all K·B rows. Classifier-free guidance and the sampler step stay the pipeline's."""

    def __init__(self, unet, handles: Sequence, groups: int, shared: bool = True):
        super().__init__()
        self.unet, self.handles, self.groups, self.shared = unet, list(handles), groups, shared

    config = property(lambda self: self.unet.config)
    dtype = property(lambda self: self.unet.dtype)
    device = property(lambda self: self.unet.device)

    def _task_major(self, x, back: bool = False):
        """[g][k][b] rows -> [k][g][b] (back=True: the other way)."""
        if not torch.is_tensor(x) or x.ndim == 0:
            return x
        outer = (len(self.handles), self.groups) if back else (self.groups, len(self.handles))
        return x.unflatten(0, (*outer, -1)).transpose(0, 1).flatten(0, 2)

    def forward(self, sample, timestep, encoder_hidden_states, return_dict: bool = False, **kwargs):
        k = len(self.handles)
        x, t, text = (self._task_major(v) for v in (sample, timestep, encoder_hidden_states))
        if self.shared and all(torch.equal(c, x.chunk(k)[0]) for c in x.chunk(k)[1:]):  # same rows: step 1
            out = multitask_unet_forward(self.unet, self.handles, x.chunk(k)[0], _first(t, k), text.chunk(k)[0],
                                         broadcast=True, **kwargs)
        else:
            out = multitask_unet_forward(self.unet, self.handles, x, t, text, shared=self.shared, **kwargs)
        return (self._task_major(out, back=True),)


def _first(timestep, k: int):
    return timestep.chunk(k)[0] if torch.is_tensor(timestep) and timestep.ndim > 0 else timestep


def generate_multitask(pipe, tasks: Mapping[str, Any], prompts: str | Sequence[str],
                       settings: SamplingSettings | None = None, *, shared: bool = True, output_type: str = "pil",
                       height: int | None = None, width: int | None = None, progress: bool = False,
                       **fields) -> dict[str, list]:
    """Images for K tasks from one denoising loop: {task name: images} (PIL, or (N, H, W, 3) floats for
    output_type="np"). Image i of each task is what sampling.generate gives with only that task's bypass enabled:
    the same seed rule, sampler, guidance and negative prompt (sampling.SamplingSettings, or its fields as keywords).

    `tasks`: name -> bypass tuner file | attached bypass handle | None (the base UNet); files are loaded here and
    detached after. The backbone runs once per step for all K tasks (shared=False: K runs, for timing).
    """
    settings = (settings or SamplingSettings(scheduler=None)).replace(**fields)  # None: the pipeline's sampler
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    handles, loaded = _task_handles(pipe.unet, tasks)
    try:
        router = TaskRouter(pipe.unet, handles, 2 if uses_guidance(pipe, settings) else 1, shared)
        images = generate(pipe, prompts, settings, copies=len(handles), unet=router, height=height, width=width,
                          output_type=output_type, progress=progress)
        return dict(zip(tasks, images))
    finally:
        for handle in loaded:
            handle.detach()
