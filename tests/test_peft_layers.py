"""The baselines built by peft (restune_diffusion/tuners/peft_layers.py: DoRA, LoHa, LoKr, OFT) beyond the generic
case table of test_tuners.py: parameter counts on SD v1.5, the DoRA file diffusers reads, scale, and living beside
other tuner sets."""

from pathlib import Path

import numpy as np
import pytest
import torch

import restune_diffusion as rd
from conftest import perturb, run_unet
from restune_diffusion import report
from restune_diffusion.attach import attach
from restune_diffusion.exports import save_diffusers_lora
from restune_diffusion.models import build_pipeline

REPO = Path(__file__).resolve().parents[1]
# SD v1.5 rows (configs/<name>.yaml): DoRA at the LoRA row's rank, LoHa at its budget, LoKr factor 4 at its rank,
# OFT with peft's default blocks of 32
SD15_PARAMS = {"dora": 10_064_640, "loha": 9_964_800, "lokr": 2_445_248, "oft": 1_541_568}


@pytest.mark.parametrize("name", list(SD15_PARAMS))
def test_the_report_counts_each_peft_row_on_sd15_on_the_meta_device(name, capsys):
    assert report.main([str(REPO / "configs" / f"{name}.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == f"trainable_params={SD15_PARAMS[name]}"
    assert f"{name} " in out  # the per-type table names the type


@pytest.mark.parametrize("name", list(SD15_PARAMS))
def test_each_peft_row_has_a_tiny_world_config_that_attaches(name, unet):
    unet.eval()  # generation's UNet: peft makes its layers in train mode, attach keeps them in the UNet's mode
    handle = attach(unet, REPO / "configs" / "tiny" / f"{name}.yaml")
    assert handle.num_parameters() > 0
    assert not any(m.training for m in unet.modules())  # LoHa/LoKr's train-mode dropout draw breaks torch.compile
    handle.detach()
    handle = attach(unet.train(), REPO / "configs" / "tiny" / f"{name}.yaml")
    assert all(m.training for m in unet.modules())


def test_dora_exported_in_diffusers_naming_loads_as_dora_and_gives_our_outputs(tiny_sd, unet_inputs, tmp_path):
    base = run_unet(tiny_sd.unet, unet_inputs)
    handle = attach(tiny_sd.unet, {"type": "dora", "rank": 4, "alpha": 8})
    perturb(handle, std=0.1)
    ours = run_unet(tiny_sd.unet, unet_inputs)
    save_diffusers_lora(tmp_path, handle)
    handle.detach()
    assert torch.equal(run_unet(tiny_sd.unet, unet_inputs), base)
    pipe = build_pipeline(tiny_sd)
    pipe.load_lora_weights(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")
    assert pipe.unet.peft_config["default_0"].use_dora
    theirs = run_unet(pipe.unet, unet_inputs)
    assert (ours - base).abs().max() > 1e-3
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name,config", [("loha", {"type": "loha", "rank": 2}),
                                         ("lokr", {"type": "lokr", "rank": 4})])
def test_scale_multiplies_the_weight_change(unet, unet_inputs, name, config):
    base = run_unet(unet, unet_inputs)
    handle = attach(unet, config)
    perturb(handle)
    tuned = run_unet(unet, unet_inputs)
    handle.scale = 0.0
    torch.testing.assert_close(run_unet(unet, unet_inputs), base, rtol=0, atol=1e-6)
    handle.scale = 0.5
    half = run_unet(unet, unet_inputs)
    assert not torch.allclose(half, base, atol=1e-5) and not torch.allclose(half, tuned, atol=1e-5)
    handle.scale = 1.0
    assert torch.equal(run_unet(unet, unet_inputs), tuned)


def test_oft_has_no_strength_to_scale(unet, unet_inputs):
    handle = attach(unet, {"type": "oft", "block_size": 8})
    handle.scale = 0.5
    with pytest.raises(ValueError, match=r"oft at down_blocks\.0\..*attn1\.to_q: has no strength to scale"):
        run_unet(unet, unet_inputs)


def test_oft_block_size_must_divide_every_width(unet):
    with pytest.raises(ValueError, match=r"oft\.block_size: 24 does not divide the width 32 of down_blocks"):
        attach(unet, {"type": "oft", "block_size": 24})
    assert not any("oft" in n for n, _ in unet.named_modules())  # nothing left behind


def test_a_second_peft_set_on_the_same_module_is_refused_and_other_sets_live_beside(unet, unet_inputs):
    base = run_unet(unet, unet_inputs)
    dora = attach(unet, {"type": "dora", "rank": 2}, name="a")
    with pytest.raises(ValueError, match=r"loha: down_blocks\..*to_q already carries a peft-built tuner"):
        attach(unet, {"type": "loha", "rank": 2}, name="b")
    adapter = attach(unet, {"type": "res_adapter", "dim": 4, "targets": ["ff"]}, name="c")
    assert all(p.requires_grad for p in dora.trainable_parameters()) and dora.num_parameters() > 0
    with pytest.raises(ValueError, match="already carries a peft-built tuner"):
        attach(unet, {"type": "lokr", "rank": 2, "blocks": "up", "targets": ["attn2"], "modules": ["to_out.0"]})
    perturb(dora)
    perturb(adapter)
    both = run_unet(unet, unet_inputs)
    with dora.disabled():
        only_adapter = run_unet(unet, unet_inputs)
    assert not torch.allclose(only_adapter, both, atol=1e-5)
    dora.detach()
    torch.testing.assert_close(run_unet(unet, unet_inputs), only_adapter, rtol=0, atol=0)
    adapter.detach()
    assert torch.equal(run_unet(unet, unet_inputs), base)


@pytest.mark.parametrize("name", list(SD15_PARAMS))
def test_a_peft_tuner_file_generates_and_disabled_gives_the_base_images(name, tmp_path):
    sd = rd.build_tiny_sd(0)
    handle = rd.attach(sd.unet, REPO / "configs" / "tiny" / f"{name}.yaml")
    perturb(handle, std=0.2)
    path = rd.save_tuners(tmp_path / "tuners.safetensors", handle)
    pipe = rd.load_pipeline("tiny-random", tuners=path, device="cpu")
    loaded = pipe.tuner_handles["default"]
    tuned = rd.generate_images(pipe, ["a red circle"], steps=2, height=32, width=32, progress=False)[0]
    with loaded.disabled():
        base = rd.generate_images(pipe, ["a red circle"], steps=2, height=32, width=32, progress=False)[0]
    loaded.detach()
    again = rd.generate_images(pipe, ["a red circle"], steps=2, height=32, width=32, progress=False)[0]
    assert np.abs(np.asarray(tuned, np.int16) - np.asarray(base, np.int16)).max() > 0
    assert np.array_equal(np.asarray(base), np.asarray(again))


def test_mixed_precision_training_casts_the_backbone_and_keeps_peft_tuners_fp32(tiny_sd):
    from types import SimpleNamespace

    from restune_diffusion.train.setup import freeze_and_cast

    handle = attach(tiny_sd.unet, {"type": "dora", "rank": 2})
    freeze_and_cast(SimpleNamespace(gradient_checkpointing=False), tiny_sd, [handle], torch.bfloat16)
    assert tiny_sd.unet.conv_in.weight.dtype == torch.bfloat16
    layer = tiny_sd.unet.get_submodule(next(iter(handle.state_dict())).split(".dora.")[0])
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in handle.trainable_parameters())


@pytest.mark.parametrize("name,config", [("dora", {"type": "dora", "rank": 2**30}),
                                         ("loha", {"type": "loha", "rank": 2**30}),
                                         ("oft", {"type": "oft", "block_size": 2**20})])
def test_a_huge_size_in_a_peft_file_header_fails_on_the_meta_device_without_allocating(unet, tmp_path, name,
                                                                                       config):
    import json
    import time

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    small = {"dora": {"rank": 2}, "loha": {"rank": 2}, "oft": {"block_size": 8}}[name]
    path = rd.save_tuners(tmp_path / "t.safetensors", attach(rd.build_tiny_sd(0).unet, {"type": name, **small}))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    entry = {**json.loads(meta["tuners"])[0], **{k: v for k, v in config.items() if k != "type"}}
    bomb = tmp_path / "bomb.safetensors"
    save_file(load_file(str(path)), str(bomb), metadata={**meta, "tuners": json.dumps([entry])})
    start = time.perf_counter()
    with pytest.raises(ValueError, match="bomb.safetensors"):
        rd.load_tuners(unet, bomb)
    assert time.perf_counter() - start < 10
    assert not any(type(m).__module__.startswith("peft") for m in unet.modules())  # nothing left on the UNet
