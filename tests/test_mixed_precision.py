"""Mixed precision on CPU (bf16): the path fp16/bf16 training and generation take on CUDA, for every shipped config."""

from pathlib import Path

import pytest
import torch
from PIL import Image

import restune_diffusion as rd

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml") if p.stem != "tiny_demo")


@pytest.mark.parametrize("name", CONFIGS)
def test_bf16_backbone_under_autocast_trains_fp32_tuners(name, unet_inputs):
    sd = rd.build_tiny_sd(0)
    unet = sd.unet
    handle = rd.attach(unet, str(ROOT / "configs" / f"{name}.yaml"))
    params = list(handle.trainable_parameters())
    if name != "full":  # accelerate's mixed precision: frozen weights in bf16, trainables kept in fp32
        for module in unet.modules():
            for p in module.parameters(recurse=False):
                if not p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)
    sample, timesteps, text = unet_inputs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = unet(sample.to(torch.bfloat16), timesteps, text.to(torch.bfloat16)).sample
    assert pred.shape == sample.shape
    torch.nn.functional.mse_loss(pred.float(), torch.zeros_like(sample)).backward()
    assert params and all(p.dtype == torch.float32 for p in params)
    grads = [p.grad for p in params]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", [c for c in CONFIGS if c != "full"])
def test_bf16_pipeline_generates_with_a_tuner_file(name, tmp_path):
    sd = rd.build_tiny_sd(0)
    handle = rd.attach(sd.unet, str(ROOT / "configs" / f"{name}.yaml"))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = rd.save_tuners(tmp_path / "t.safetensors", handle)
    pipe = rd.load_pipeline("tiny-random", tuners=path, device="cpu", dtype="bf16")
    assert pipe.unet.dtype == torch.bfloat16
    kw = dict(steps=2, height=32, width=32, progress=False)
    tuned = rd.generate_images(pipe, ["a red circle"], **kw)[0]
    with pipe.tuner_handles["default"].disabled():
        base = rd.generate_images(pipe, ["a red circle"], **kw)[0]
    assert isinstance(tuned, Image.Image) and tuned.size == (32, 32)
    assert tuned.tobytes() != base.tobytes()
