"""The attach mechanism and the paper's bound = unbound equivalences (float64, tiny UNet)."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from conftest import run_unet
from restune_diffusion.attach import TunedAttnProcessor, attach, attached_sets, transformer_blocks


def copy_tokens(src_handle, dst_handle, src_kind, dst_kind):
    """Give the unbound tuners the bound tuners' weights (same keys but for the tuner type)."""
    src = src_handle.state_dict()
    state = {k: src[k.replace(f".{dst_kind}.", f".{src_kind}.")] for k in dst_handle.state_dict()}
    dst_handle.load_state_dict(state)


def randomize(handle, std=0.5):
    torch.manual_seed(5)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.copy_(torch.randn_like(p) * std)


@pytest.mark.parametrize("bound,unbound,targets", [
    ("prefix", "res_prefix", ["attn1", "attn2"]),
    ("prompt", "res_prompt", ["attn1", "attn2"]),
])
def test_res_prefix_and_prompt_with_exact_lambda_equal_the_bound_forms(unet, unet_inputs, bound, unbound, targets):
    unet.double()
    inputs = tuple(x.double() if x.is_floating_point() else x for x in unet_inputs)
    h_bound = attach(unet, {"type": bound, "num_tokens": 5, "targets": targets}, name="bound")
    h_bound.to(torch.float64)
    randomize(h_bound)
    expected = run_unet(unet, inputs)
    h_bound.disable()
    h_res = attach(unet, {"type": unbound, "num_tokens": 5, "targets": targets, "lam": "exact"}, name="res")
    h_res.to(torch.float64)
    copy_tokens(h_bound, h_res, bound, unbound)
    got = run_unet(unet, inputs)
    h_res.disable()
    base = run_unet(unet, inputs)
    assert (expected - base).abs().max() > 1e-3  # the prefix really acts
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_res_adapter_on_ff_equals_the_parallel_adapter(unet):
    handle = attach(unet, {"type": "res_adapter", "dim": 8, "targets": ["ff"], "blocks": [0]})
    randomize(handle, 0.1)
    ff = transformer_blocks(unet)[0][1].ff
    adapter = handle.module.get_submodule(f"{transformer_blocks(unet)[0][0]}.ff.res_adapter")
    x = torch.randn(2, 16, ff.net[0].proj.in_features)
    with torch.no_grad():
        hooked = ff(x)
        with handle.disabled():
            parallel = ff(x) + adapter.up(torch.nn.functional.gelu(adapter.down(x)))
    torch.testing.assert_close(hooked, parallel, rtol=0, atol=1e-6)


def test_sdpa_and_plain_processor_give_the_same_result(unet, unet_inputs):
    handle = attach(unet, [{"type": "res_prefix", "num_tokens": 3, "targets": ["attn1", "attn2"]},
                           {"type": "prefix", "num_tokens": 3, "blocks": "up"}])
    randomize(handle, 0.3)
    sdpa = run_unet(unet, unet_inputs)
    unet.set_attn_processor(AttnProcessor())
    plain = run_unet(unet, unet_inputs)
    torch.testing.assert_close(plain, sdpa, rtol=1e-4, atol=1e-5)
    tuned = [p for p in unet.attn_processors.values() if isinstance(p, TunedAttnProcessor)]
    assert tuned and all(p.backend == "math" for p in tuned)


def test_replacing_processors_after_attach_keeps_the_tuners(unet, unet_inputs):
    # PITFALLS (diffusers #2459): enabling another kernel after installing tuners must not drop them silently
    handle = attach(unet, {"type": "res_prompt", "num_tokens": 3})
    randomize(handle, 0.3)
    tuned = run_unet(unet, unet_inputs)
    count = sum(len(p.entries) for p in unet.attn_processors.values() if isinstance(p, TunedAttnProcessor))
    unet.set_attn_processor(AttnProcessor2_0())
    torch.testing.assert_close(run_unet(unet, unet_inputs), tuned, rtol=0, atol=1e-6)
    after = sum(len(p.entries) for p in unet.attn_processors.values() if isinstance(p, TunedAttnProcessor))
    assert after == count == 7  # one per self-attention of the tiny UNet


def test_an_unknown_kernel_after_attach_raises_instead_of_dropping_tuners(unet, unet_inputs):
    attach(unet, {"type": "res_prefix", "num_tokens": 2})

    class Custom(AttnProcessor2_0.__base__):
        def __call__(self, attn, hidden_states, *args, **kwargs):
            return hidden_states

    unet.set_attn_processor(Custom())
    with pytest.raises(ValueError, match="Custom is not supported under tuners"):
        run_unet(unet, unet_inputs)


def test_named_sets_enable_disable_and_detach_independently(unet, unet_inputs):
    base = run_unet(unet, unet_inputs)
    a = attach(unet, {"type": "res_prefix", "num_tokens": 2}, name="a")
    b = attach(unet, {"type": "res_adapter", "dim": 4}, name="b")
    randomize(a, 0.3)
    randomize(b, 0.3)
    both = run_unet(unet, unet_inputs)
    b.disable()
    only_a = run_unet(unet, unet_inputs)
    b.enable()
    a.detach()
    only_b = run_unet(unet, unet_inputs)
    assert set(attached_sets(unet)) == {"b"}
    assert len({tuple(t.flatten()[:4].tolist()) for t in (base, both, only_a, only_b)}) == 4
    b.detach()
    assert torch.equal(run_unet(unet, unet_inputs), base)
    with pytest.raises(ValueError, match="already attached"):
        attach(unet, {"type": "lora"}, name="x") and attach(unet, {"type": "lora"}, name="x")


def test_scale_multiplies_the_residual_branch(unet, unet_inputs):
    base = run_unet(unet, unet_inputs)
    handle = attach(unet, {"type": "res_adapter", "dim": 4})
    randomize(handle, 0.1)
    full = run_unet(unet, unet_inputs) - base
    handle.scale = 0.0
    assert torch.equal(run_unet(unet, unet_inputs), base)
    handle.scale = 1.0
    assert full.abs().max() > 0


@pytest.mark.parametrize("config,message", [
    ({"type": "res_adapter", "dim": -1}, "res_adapter.dim must be a positive int, got -1"),
    ({"type": "res_adapter", "bottleneck": 3}, r"unknown field\(s\) \['bottleneck'\]; valid fields are"),
    ({"type": "nope"}, "unknown tuner 'nope'; known tuners are"),
    ({"type": "res_prefix", "targets": ["ff"]}, "res_prefix.targets must be a non-empty list"),
    ({"type": "res_prompt", "lam": "fixed"}, "res_prompt.lam must be"),
    ({"type": "lora", "blocks": "nothing_matches_this"}, "lora.blocks='nothing_matches_this' matches no"),
    ({"type": "lora", "blocks": [99]}, r"lora.blocks: positions must be ints in \[0, 7\)"),
])
def test_bad_configs_name_the_field(unet, config, message):
    with pytest.raises(ValueError, match=message):
        attach(unet, config)
    assert not any(isinstance(p, TunedAttnProcessor) for p in unet.attn_processors.values())
    assert attached_sets(unet) == {}


def test_yaml_config_file_attaches(unet, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tuners:\n  - type: res_adapter\n    dim: 4\n    blocks: up\n")
    handle = attach(unet, path)
    # up path of the tiny UNet: 2 blocks of width 64, 2 of width 32; down (C·4 + 4) + up (4·C + C) each
    assert handle.num_parameters() == 2 * (2 * 4 * 64 + 4 + 64) + 2 * (2 * 4 * 32 + 4 + 32)
    path.write_text("tuners: []\nextra: 1\n")
    with pytest.raises(ValueError, match="unknown section"):
        attach(unet, path, name="other")


# ---------------------------------------------------------------------------------------------------------------------
# masks (issue 12 items 1 and 4)

ATTN_TUNERS = ["prefix", "prompt", "res_prefix", "res_prompt"]


@pytest.mark.parametrize("kind", ATTN_TUNERS)
def test_encoder_attention_mask_with_tuners_on_attn2(unet, unet_inputs, kind):
    # diffusers pads the mask to the KEY length (77 text tokens), not the query length (64 latent pixels)
    sample, t, text = unet_inputs
    keep = torch.zeros(2, 77)
    keep[:, :10] = 1.0
    handle = attach(unet, {"type": kind, "num_tokens": 3, "targets": ["attn2"]})
    randomize(handle, 0.3)
    with torch.no_grad():
        masked = unet(sample, t, text, encoder_attention_mask=keep).sample
        cut = unet(sample, t, text[:, :10]).sample  # masking the padding = leaving it out
    torch.testing.assert_close(masked, cut, rtol=1e-4, atol=1e-5)


def attn2_call(unet, mask, seed=0):
    g = torch.Generator().manual_seed(seed)
    attn = transformer_blocks(unet)[0][1].attn2
    x = torch.randn(2, 16, attn.to_q.in_features, generator=g)  # (B, N, C)
    text = torch.randn(2, 12, attn.to_k.in_features, generator=g)  # (B, M, D)
    with torch.no_grad():
        return attn(x, encoder_hidden_states=text, attention_mask=mask)


@pytest.mark.parametrize("processor", [AttnProcessor2_0, AttnProcessor])
@pytest.mark.parametrize("config", [
    {"type": "prefix", "num_tokens": 3, "targets": ["attn2"]},
    {"type": "prompt", "num_tokens": 3, "targets": ["attn2"]},
    {"type": "res_prefix", "num_tokens": 3, "targets": ["attn2"], "lam_value": 0.5},
    {"type": "res_prompt", "num_tokens": 3, "targets": ["attn2"], "lam_value": 0.5},
    {"type": "res_prefix", "num_tokens": 3, "targets": ["attn2"], "lam": "exact"},
    {"type": "res_prompt", "num_tokens": 3, "targets": ["attn2"], "lam": "exact"},
], ids=lambda c: f"{c['type']}-{c.get('lam', 'learnable')}" if isinstance(c, dict) else c.__name__)
def test_boolean_masks_act_like_additive_masks(unet, config, processor):
    unet.set_attn_processor(processor())
    keep = torch.ones(2, 1, 12, dtype=torch.bool)  # (B, 1, M), True = attend
    keep[0, :, 7:] = False
    keep[1, :, 4:] = False
    additive = torch.zeros(2, 1, 12).masked_fill(~keep, -10000.0)
    handle = attach(unet, config)
    randomize(handle, 0.3)
    got, expected = attn2_call(unet, keep), attn2_call(unet, additive)
    with handle.disabled():
        base = attn2_call(unet, additive)
    assert (expected - base).abs().max() > 1e-3  # the tuner really acts
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# processor swaps with several sets (issue 12 items 2 and 3)


def tuner_count(unet) -> int:
    return sum(len(p.entries) for p in unet.attn_processors.values() if isinstance(p, TunedAttnProcessor))


@pytest.mark.parametrize("kernel", [AttnProcessor, AttnProcessor2_0])
def test_swap_after_detaching_one_set_keeps_the_other(unet, unet_inputs, kernel):
    base = run_unet(unet, unet_inputs)
    a = attach(unet, {"type": "res_prefix", "num_tokens": 2, "targets": ["attn1", "attn2"]}, name="a")
    b = attach(unet, {"type": "res_prompt", "num_tokens": 2, "targets": ["attn1"]}, name="b")
    randomize(a, 0.3)
    randomize(b, 0.3)
    with a.disabled():
        only_b = run_unet(unet, unet_inputs)
    a.detach()
    before = tuner_count(unet)
    unet.set_attn_processor(kernel())
    got = run_unet(unet, unet_inputs)
    assert tuner_count(unet) == before == 7  # b's res_prompt on every self-attention
    assert (got - base).abs().max() > 1e-3
    torch.testing.assert_close(got, only_b, rtol=1e-4, atol=1e-5)
    b.detach()
    assert not any(isinstance(p, TunedAttnProcessor) for p in unet.attn_processors.values())
    torch.testing.assert_close(run_unet(unet, unet_inputs), base, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel", [AttnProcessor, AttnProcessor2_0])
def test_attach_after_a_swap_wraps_the_new_kernel_once(unet, unet_inputs, kernel):
    a = attach(unet, {"type": "res_prefix", "num_tokens": 2, "targets": ["attn1", "attn2"]}, name="a")
    randomize(a, 0.3)
    unet.set_attn_processor(kernel())
    b = attach(unet, {"type": "prefix", "num_tokens": 2, "targets": ["attn1"]}, name="b")
    randomize(b, 0.3)
    both = run_unet(unet, unet_inputs)
    processors = list(unet.attn_processors.values())
    assert all(isinstance(p, TunedAttnProcessor) and not isinstance(p.base, TunedAttnProcessor) for p in processors)
    assert tuner_count(unet) == 14 + 7
    a.detach()
    b.detach()
    base = run_unet(unet, unet_inputs)
    a2 = attach(unet, {"type": "res_prefix", "num_tokens": 2, "targets": ["attn1", "attn2"]}, name="a")
    b2 = attach(unet, {"type": "prefix", "num_tokens": 2, "targets": ["attn1"]}, name="b")
    a2.load_state_dict(a.state_dict())
    b2.load_state_dict(b.state_dict())
    assert (both - base).abs().max() > 1e-3
    torch.testing.assert_close(run_unet(unet, unet_inputs), both, rtol=1e-4, atol=1e-5)
