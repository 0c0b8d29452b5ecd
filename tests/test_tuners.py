"""Every tuner type crossed with the generic behaviours (peft's case table x behaviour)."""

import pytest
import torch

from conftest import assert_checkpointing_keeps_gradients, assert_step_changes_only_tuners, perturb, run_unet
from restune_diffusion.attach import attach
from restune_diffusion.models import build_tiny_sd
from restune_diffusion.weights import load_tuners, save_tuners

# (name, config) rows; small sizes for the tiny UNet
CASES = [
    ("res_adapter_ff", {"type": "res_adapter", "dim": 8, "targets": ["ff"]}),
    ("res_adapter_all_ops", {"type": "res_adapter", "dim": 8, "targets": ["attn1", "attn2", "ff", "block"],
                             "scale": "channel"}),
    ("res_prefix", {"type": "res_prefix", "num_tokens": 4, "targets": ["attn1", "attn2"]}),
    ("res_prefix_fixed", {"type": "res_prefix", "num_tokens": 4, "lam": "fixed", "lam_value": 0.5}),
    ("res_prompt", {"type": "res_prompt", "num_tokens": 4, "targets": ["attn1", "attn2"]}),
    ("lora", {"type": "lora", "rank": 4}),
    ("adapter", {"type": "adapter", "dim": 8}),
    ("res_tuning_combo", [{"type": "res_adapter", "dim": 8, "blocks": "up"},
                          {"type": "res_prefix", "num_tokens": 2, "blocks": [0, 1]}]),
    ("dora", {"type": "dora", "rank": 4}),
    ("loha", {"type": "loha", "rank": 2}),
    ("lokr", {"type": "lokr", "rank": 4, "factor": 4}),
    ("oft", {"type": "oft", "block_size": 8}),
    ("full", {"type": "full"}),
]
IDS = [name for name, _ in CASES]
BOUND_SOFTMAX = [("prefix", {"type": "prefix", "num_tokens": 4}), ("prompt", {"type": "prompt", "num_tokens": 4})]


@pytest.mark.parametrize("name,config", CASES, ids=IDS)
def test_identity_at_init(unet, unet_inputs, name, config):
    base = run_unet(unet, unet_inputs)
    attach(unet, config)
    assert torch.equal(run_unet(unet, unet_inputs), base)


@pytest.mark.parametrize("name,config", BOUND_SOFTMAX, ids=[n for n, _ in BOUND_SOFTMAX])
def test_bound_prefix_and_prompt_move_the_output_at_init(unet, unet_inputs, name, config):
    # the bound forms share the backbone's softmax, so any prefix/prompt changes it: what Res-Tuning unbinds
    base = run_unet(unet, unet_inputs)
    attach(unet, config)
    assert not torch.allclose(run_unet(unet, unet_inputs), base, atol=1e-4)


@pytest.mark.parametrize("name,config", CASES + BOUND_SOFTMAX, ids=IDS + [n for n, _ in BOUND_SOFTMAX])
def test_nonzero_tuners_change_output_and_disabled_restores_base(unet, unet_inputs, name, config):
    base = run_unet(unet, unet_inputs)
    handle = attach(unet, config)
    perturb(handle)
    tuned = run_unet(unet, unet_inputs)
    assert not torch.allclose(tuned, base, atol=1e-5)
    if name != "full":  # full fine-tuning has no separate base to fall back to
        with handle.disabled():
            assert torch.equal(run_unet(unet, unet_inputs), base)
    assert torch.equal(run_unet(unet, unet_inputs), tuned)


@pytest.mark.parametrize("name,config", CASES + BOUND_SOFTMAX, ids=IDS + [n for n, _ in BOUND_SOFTMAX])
def test_gradients_reach_only_tuner_parameters(unet, unet_inputs, name, config):
    handle = attach(unet, config)
    perturb(handle)  # zero-init layers would starve the layers before them of gradient at step 0
    unet(*unet_inputs).sample.square().mean().backward()
    trainable = {id(p) for p in handle.trainable_parameters()}
    assert trainable
    for n, p in unet.named_parameters():
        if id(p) not in trainable:
            assert p.grad is None, f"backbone parameter {n} got a gradient"
    for p in handle.trainable_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("name,config", CASES[:-1] + BOUND_SOFTMAX, ids=IDS[:-1] + [n for n, _ in BOUND_SOFTMAX])
def test_optimizer_step_changes_only_tuner_tensors(unet, unet_inputs, name, config):
    handle = attach(unet, config)
    perturb(handle)
    assert_step_changes_only_tuners(unet, unet_inputs, handle, every=False)


@pytest.mark.parametrize("name,config", CASES + BOUND_SOFTMAX, ids=IDS + [n for n, _ in BOUND_SOFTMAX])
def test_detach_restores_outputs_bit_for_bit(unet, unet_inputs, name, config):
    base = run_unet(unet, unet_inputs)
    keys = list(unet.state_dict())
    processors = dict(unet.attn_processors)
    flags = [p.requires_grad for p in unet.parameters()]
    tensors = {k: v.clone() for k, v in unet.state_dict().items()}
    modules = dict(unet.named_modules())
    handle = attach(unet, config)
    if name != "full":
        perturb(handle)
    handle.detach()
    assert torch.equal(run_unet(unet, unet_inputs), base)
    assert list(unet.state_dict()) == keys
    assert all(torch.equal(v, tensors[k]) for k, v in unet.state_dict().items())
    assert all(m is modules[n] for n, m in unet.named_modules()) and len(modules) == len(dict(unet.named_modules()))
    assert all(unet.attn_processors[k] is v for k, v in processors.items())
    assert [p.requires_grad for p in unet.parameters()] == flags


@pytest.mark.parametrize("name,config", CASES, ids=IDS)
def test_save_then_load_into_a_fresh_unet_gives_the_same_output(unet, unet_inputs, tmp_path, name, config):
    handle = attach(unet, config)
    perturb(handle)
    tuned = run_unet(unet, unet_inputs)
    save_tuners(tmp_path / "t.safetensors", handle)
    fresh = build_tiny_sd(seed=0).unet
    loaded = load_tuners(fresh, tmp_path / "t.safetensors")
    assert torch.equal(run_unet(fresh, unet_inputs), tuned)
    assert loaded.state_dict().keys() == handle.state_dict().keys()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name,config", CASES[:-1] + BOUND_SOFTMAX, ids=IDS[:-1] + [n for n, _ in BOUND_SOFTMAX])
def test_half_precision_backbone_with_fp32_tuners(unet, unet_inputs, name, config, dtype):
    unet.to(dtype)
    handle = attach(unet, config)
    perturb(handle)
    assert all(p.dtype == torch.float32 for p in handle.trainable_parameters())
    x, t, e = unet_inputs
    out = unet(x.to(dtype), t, e.to(dtype)).sample
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in handle.trainable_parameters())


@pytest.mark.parametrize("name,config", CASES + BOUND_SOFTMAX, ids=IDS + [n for n, _ in BOUND_SOFTMAX])
def test_gradient_checkpointing_gives_every_tuner_a_gradient(unet, unet_inputs, name, config):
    handle = attach(unet, config)
    perturb(handle)
    assert_checkpointing_keeps_gradients(unet, unet_inputs, handle)
