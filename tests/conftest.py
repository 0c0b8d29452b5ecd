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


def assert_checkpointing_keeps_gradients(unet, inputs, handle, atol=1e-6):
    """Gradient checkpointing on the UNet gives every tuner tensor the same, non-zero gradient as without."""
    unet(*inputs).sample.square().mean().backward()
    plain = [p.grad.clone() for p in handle.trainable_parameters()]
    for p in handle.trainable_parameters():
        p.grad = None
    unet.enable_gradient_checkpointing()
    unet.train()
    unet(*inputs).sample.square().mean().backward()
    for g0, p in zip(plain, handle.trainable_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0
        torch.testing.assert_close(p.grad, g0, rtol=1e-4, atol=atol)


def assert_step_changes_only_tuners(unet, inputs, handle, every=True):
    """One AdamW step: every tuner tensor moves (every=False: some; fixed buffers stay), the UNet stays bit-for-bit
    (its own tensors: peft-built tuners sit in the UNet's tree while attached)."""
    tuner_storage = {v.data_ptr() for v in handle.state_dict().values()}
    before = {k: v.clone() for k, v in unet.state_dict().items() if v.data_ptr() not in tuner_storage}
    tuner_before = {k: v.clone() for k, v in handle.state_dict().items()}
    opt = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-2)
    unet(*inputs).sample.square().mean().backward()
    opt.step()
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items() if k in before)
    moved = [not torch.equal(v, tuner_before[k]) for k, v in handle.state_dict().items()]
    assert all(moved) if every else any(moved)
