"""The LoRA baseline: peft-compatible count, diffusers-loadable and kohya/A1111 exports."""

import pytest
import torch
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

from conftest import run_unet
from restune_diffusion.attach import attach
from restune_diffusion.exports import save_diffusers_lora, save_kohya_lora
from restune_diffusion.models import build_pipeline, build_unet
from restune_diffusion.tuners.lora import export_diffusers_lora, export_kohya_lora


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


def lora_with_weights(unet, alpha=8):
    handle = attach(unet, {"type": "lora", "rank": 4, "alpha": alpha})
    torch.manual_seed(0)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return handle


def test_kohya_names_are_diffusers_own_conversion(unet):
    handle = lora_with_weights(unet, alpha=8)
    ours, metadata = export_kohya_lora(handle)
    theirs = convert_state_dict_to_kohya(export_diffusers_lora(handle))
    assert sorted(ours) == sorted(theirs) and len(ours) == 7 * 2 * 4 * 3  # 14 attentions × 4 projections × 3 keys
    assert next(iter(ours)).startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_")
    for key in ours:
        if key.endswith("lora_down.weight"):
            assert torch.equal(ours[key], theirs[key])
        if key.endswith("lora_up.weight"):  # diffusers' conversion writes alpha = rank, with the scale folded in B
            alpha = ours[key.replace("lora_up.weight", "alpha")]
            torch.testing.assert_close(ours[key] * alpha / 4, theirs[key] * theirs[key.replace("lora_up.weight",
                                                                                             "alpha")] / 4)
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "8"


def test_kohya_file_loads_in_diffusers_and_gives_our_outputs(tiny_sd, unet_inputs, tmp_path):
    pytest.importorskip("peft")
    from safetensors import safe_open

    base = run_unet(tiny_sd.unet, unet_inputs)
    handle = lora_with_weights(tiny_sd.unet, alpha=2)  # alpha != rank: the file's alpha carries the scale
    ours = run_unet(tiny_sd.unet, unet_inputs)
    path = save_kohya_lora(tmp_path / "tiny_lora.safetensors", handle, base_model="tiny-random")
    handle.detach()
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_sd_model_name"] == "tiny-random"
    pipe = build_pipeline(tiny_sd)
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name)
    theirs = run_unet(pipe.unet, unet_inputs)
    assert (ours - base).abs().max() > 1e-3
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
