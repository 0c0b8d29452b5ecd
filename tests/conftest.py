"""Shared fixtures: the tiny SD v1.5 look-alike and a fixed UNet input."""

import pytest
import torch

from restune_diffusion.models import build_tiny_sd


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
