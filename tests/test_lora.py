"""The LoRA baseline: peft-compatible count and diffusers-loadable export."""

import pytest
import torch

from conftest import run_unet
from restune_diffusion.attach import attach
from restune_diffusion.exports import save_diffusers_lora
from restune_diffusion.models import build_pipeline, build_unet


def test_our_lora_counts_as_peft_lora_on_sd15():
    pytest.importorskip("peft")
    from peft import LoraConfig

    ours = attach(build_unet("sd15", device="meta"), "configs/lora.yaml").num_parameters()
    unet = build_unet("sd15", device="meta")
    unet.add_adapter(LoraConfig(r=50, lora_alpha=50, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    peft_count = sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)
    assert ours == peft_count == 9_964_800


def test_exported_lora_loads_in_diffusers_and_gives_our_outputs(tiny_sd, unet_inputs, tmp_path):
    pytest.importorskip("peft")
    base = run_unet(tiny_sd.unet, unet_inputs)
    handle = attach(tiny_sd.unet, {"type": "lora", "rank": 4, "alpha": 8})
    torch.manual_seed(0)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours = run_unet(tiny_sd.unet, unet_inputs)
    save_diffusers_lora(tmp_path, handle)
    handle.detach()
    pipe = build_pipeline(tiny_sd)
    pipe.load_lora_weights(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")
    theirs = run_unet(pipe.unet, unet_inputs)
    assert (ours - base).abs().max() > 1e-3
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
