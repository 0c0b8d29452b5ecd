"""Shared fixtures: the tiny SD v1.5 look-alike and a fixed UNet input."""

import contextlib
import os

import pytest
import torch

from restune_diffusion.models import build_tiny_sd

# tiny models gain nothing from threads, and on a busy 2-core machine threads thrash (0.03 s -> 6 s a forward);
# subprocesses (CLI tests) inherit the variable
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture
def tiny_sd():
    """Fresh tiny components (seeded): tests may attach tuners and change weights freely."""
    return build_tiny_sd(seed=0)


@pytest.fixture
def unet(tiny_sd):
    return tiny_sd.unet


@pytest.fixture
def unet_inputs():
    """(sample (2, 4, 8, 8), timesteps, text states (2, 77, 32)) for the tiny UNet; a CFG-sized batch of 2."""
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 77, 32, generator=g))


def run_unet(unet, inputs):
    with torch.no_grad():
        return unet(*inputs).sample


def perturb(handle, std=0.05, seed=3):
    """Non-zero values everywhere (zero-init layers included) so the tuners really act."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.add_(torch.randn_like(p) * std)


@contextlib.contextmanager
def count_saved(unet, before_target):
    """Counts tensors autograd saves: in total, and while one of the modules in `before_target` runs."""
    counts, inside, hooks = {"all": 0, "backbone": 0}, [0], []
    for module in before_target:
        hooks.append(module.register_forward_pre_hook(lambda *_: inside.__setitem__(0, inside[0] + 1)))
        hooks.append(module.register_forward_hook(lambda *_: inside.__setitem__(0, inside[0] - 1)))

    def pack(t):
        counts["all"] += 1
        counts["backbone"] += inside[0] > 0
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield counts
    finally:
        for h in hooks:
            h.remove()
