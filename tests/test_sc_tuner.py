"""SC-Tuner (SCEdit) on the skip connections: identity at init, skip-only edits, no encoder graph, weights, dtypes."""

import pytest
import torch

from conftest import (
    assert_checkpointing_keeps_gradients,
    assert_step_changes_only_tuners,
    count_saved,
    perturb,
    run_unet,
)
from restune_diffusion.attach import attach
from restune_diffusion.models import build_unet
from restune_diffusion.tuners.sc_tuner import SCTunerConfig, skip_connections
from restune_diffusion.weights import load_tuners, save_tuners

SC = {"type": "sc_tuner", "ratio": 0.5}


def test_sd15_skips_and_scedit_parameter_count():
    unet = build_unet("sd15", device="meta")
    assert [s[3] for s in skip_connections(unet)] == [1280] * 5 + [640] * 3 + [320] * 4
    handle = attach(unet, {"type": "sc_tuner", "ratio": 1.0})
    assert handle.num_parameters() == 19_680_000  # Σ 2C² + 2C over the 12 skips = SCEdit's 19.68 M


def test_identity_at_init(unet, unet_inputs):
    base = run_unet(unet, unet_inputs)
    attach(unet, SC)
    assert torch.equal(run_unet(unet, unet_inputs), base)


def test_nonzero_tuners_change_output_and_disabled_or_zero_scale_restores_base(unet, unet_inputs):
    base = run_unet(unet, unet_inputs)
    handle = attach(unet, SC)
    perturb(handle)
    tuned = run_unet(unet, unet_inputs)
    assert not torch.allclose(tuned, base, atol=1e-5)
    with handle.disabled():
        assert torch.equal(run_unet(unet, unet_inputs), base)
    handle.scale = 0.0
    assert torch.equal(run_unet(unet, unet_inputs), base)


def test_only_the_skip_channels_are_edited(unet):
    handle = attach(unet, SC)
    perturb(handle)
    path, resnet, hidden, skip = skip_connections(unet)[1]
    tuner = handle.module.get_submodule(f"{path}.sc_tuner")
    seen = []
    resnet.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))  # runs after the tuner's hook
    x = torch.randn(2, hidden + skip, 4, 4)
    with torch.no_grad():
        resnet(x, torch.randn(2, unet.time_embedding.linear_2.out_features))
        expected = x[:, hidden:] + tuner(x[:, hidden:].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert torch.equal(seen[0][:, :hidden], x[:, :hidden])
    torch.testing.assert_close(seen[0][:, hidden:], expected, rtol=0, atol=1e-6)
    assert not torch.allclose(seen[0][:, hidden:], x[:, hidden:])


def test_gradients_reach_only_tuners_and_the_encoder_runs_without_a_graph(unet, unet_inputs):
    handle = attach(unet, SC)
    perturb(handle)
    encoder = [unet.conv_in, unet.time_embedding, *unet.down_blocks, unet.mid_block]
    modes = {"encoder": [], "decoder": []}
    for m in encoder:
        m.register_forward_pre_hook(lambda *_: modes["encoder"].append(torch.is_grad_enabled()))
    for m in unet.up_blocks:
        m.register_forward_pre_hook(lambda *_: modes["decoder"].append(torch.is_grad_enabled()))
    with count_saved(unet, encoder) as saved:
        unet(*unet_inputs).sample.square().mean().backward()
    assert saved["backbone"] == 0 and saved["all"] > 0
    assert not any(modes["encoder"]) and all(modes["decoder"]) and torch.is_grad_enabled()
    assert all(p.grad is None for p in unet.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in handle.trainable_parameters())


@pytest.mark.parametrize("other", ["same_set", "other_set", "input_requires_grad"])
def test_the_encoder_keeps_its_graph_when_something_there_trains(unet, unet_inputs, other):
    if other == "same_set":
        handle = attach(unet, [SC, {"type": "res_adapter", "dim": 4, "blocks": "down"}])
        adapters = [p for k, p in handle.module.named_parameters() if "res_adapter" in k]
    else:
        handle = attach(unet, SC)
        adapters = list(attach(unet, {"type": "res_adapter", "dim": 4, "blocks": "down"}, "enc").module.parameters())
    perturb(handle)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in adapters:
            p.add_(torch.randn_like(p) * 0.05)
    x, t, e = unet_inputs
    if other == "input_requires_grad":  # e.g. a text encoder that trains too
        e = e.clone().requires_grad_(True)
    modes = []
    unet.down_blocks[0].register_forward_pre_hook(lambda *_: modes.append(torch.is_grad_enabled()))
    unet(x, t, e).sample.square().mean().backward()
    assert modes == [True]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters)


def test_gradient_checkpointing_changes_nothing(unet, unet_inputs):
    handle = attach(unet, SC)
    perturb(handle)
    assert_checkpointing_keeps_gradients(unet, unet_inputs, handle, atol=1e-7)


def test_optimizer_step_changes_only_tuner_tensors(unet, unet_inputs):
    handle = attach(unet, SC)
    perturb(handle)
    assert_step_changes_only_tuners(unet, unet_inputs, handle)


def test_save_load_round_trip_gives_identical_outputs(unet, unet_inputs, tmp_path):
    handle = attach(unet, SC, name="edit")
    perturb(handle)
    expected = run_unet(unet, unet_inputs)
    path = save_tuners(tmp_path / "sc.safetensors", handle)
    handle.detach()
    assert "_restune_no_grad" not in unet.__dict__
    loaded = load_tuners(unet, path)
    assert loaded.configs[0].ratio == 0.5
    assert torch.equal(run_unet(unet, unet_inputs), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_backbone_with_fp32_tuners(unet, unet_inputs, dtype):
    unet.to(dtype)
    handle = attach(unet, SC)
    perturb(handle)
    x, t, e = unet_inputs
    out = unet(x.to(dtype), t, e.to(dtype)).sample
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().square().mean().backward()
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
               for p in handle.trainable_parameters())


@pytest.mark.parametrize("config,field", [({"ratio": 0}, "sc_tuner.ratio"), ({"act": "tanh"}, "sc_tuner.act")])
def test_config_validation(config, field):
    with pytest.raises(ValueError, match=field):
        SCTunerConfig(**config)
