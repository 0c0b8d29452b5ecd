"""Tuner files: round trip, the header, and clear refusals."""

import json

import pytest
import torch
from safetensors import safe_open

from conftest import run_unet
from restune_diffusion.attach import attach
from restune_diffusion.models import build_unet, tiny_unet_config, unet_fingerprint
from restune_diffusion.weights import FORMAT, load_tuners, save_tuners

CONFIG = [{"type": "res_adapter", "dim": 4, "targets": ["ff", "attn2"]}, {"type": "res_prompt", "num_tokens": 3},
          {"type": "lora", "rank": 2, "blocks": "mid"}]


@pytest.fixture
def saved(unet, tmp_path):
    handle = attach(unet, CONFIG, name="style")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = save_tuners(tmp_path / "out" / "tuners.safetensors", handle)
    return handle, path


def test_save_load_round_trip_gives_identical_outputs(saved, unet, unet_inputs):
    handle, path = saved
    expected = run_unet(unet, unet_inputs)
    handle.detach()
    loaded = load_tuners(unet, path)
    assert loaded.name == "style"
    assert torch.equal(run_unet(unet, unet_inputs), expected)


def test_file_holds_only_tuner_tensors_and_its_config(saved, unet):
    handle, path = saved
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert keys == set(handle.state_dict())
    assert not keys & set(unet.state_dict())
    assert meta["format"] == FORMAT and meta["base_fingerprint"] == unet_fingerprint(unet)
    assert [c["type"] for c in json.loads(meta["tuners"])] == ["res_adapter", "res_prompt", "lora"]
    assert int(meta["num_tensors"]) == len(keys)
    assert [p.name for p in path.parent.iterdir()] == ["tuners.safetensors"]  # no temp file left


def test_a_file_for_another_architecture_names_base_tensor_and_shapes(saved):
    _, path = saved
    other = build_unet({**tiny_unet_config(), "cross_attention_dim": 48, "block_out_channels": (32, 64, 96)})
    with pytest.raises(ValueError) as err:
        load_tuners(other, path)
    text = str(err.value)
    assert "made for another UNet architecture" in text and "block_out_channels=[32, 64, 96]" in text
    assert "shape (" in text and "in model" in text and ".weight" in text
    assert not getattr(other, "_restune_sets", {})  # nothing half-attached


@pytest.mark.parametrize("damage", ["truncate", "garbage", "plain_safetensors"])
def test_broken_or_foreign_files_are_refused_cleanly(saved, unet, tmp_path, damage):
    handle, path = saved
    handle.detach()
    bad = tmp_path / "bad.safetensors"
    if damage == "truncate":
        bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        bad.write_bytes(b"not a safetensors file at all")
    else:
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, str(bad))
    with pytest.raises(ValueError, match=str(bad)):
        load_tuners(unet, bad)
    assert not getattr(unet, "_restune_sets", {})


def test_missing_file_is_named(unet, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_tuners(unet, tmp_path / "nope.safetensors")
