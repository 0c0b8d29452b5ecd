"""handle.fuse()/unfuse() (restune_diffusion/fusion.py, issue 26): what is exact is folded in, unfuse is bit for bit,
fused K/V follow every change of what they are made of, and what cannot be fused says why."""

import collections
import logging

import pytest
import torch

from conftest import perturb, run_unet
from restune_diffusion import fusion
from restune_diffusion.attach import attach
from restune_diffusion.exports import save_diffusers_lora
from restune_diffusion.models import build_pipeline

FUSABLE = [
    ("lora", {"type": "lora", "rank": 4, "alpha": 8}),
    ("prompt", {"type": "prompt", "num_tokens": 4}),
    ("res_prompt", {"type": "res_prompt", "num_tokens": 4, "targets": ["attn1", "attn2"]}),
    ("prefix", {"type": "prefix", "num_tokens": 4}),
    ("res_prefix", {"type": "res_prefix", "num_tokens": 4}),
    ("res_tuning", [{"type": "res_adapter", "dim": 8}, {"type": "res_prompt", "num_tokens": 2}]),
    ("lora_and_prompt", [{"type": "lora", "rank": 4}, {"type": "prompt", "num_tokens": 4}]),
]
REFUSED = [
    ("res_adapter", {"type": "res_adapter", "dim": 8}, "res_adapter is non-linear"),
    ("adapter", {"type": "adapter", "dim": 8}, "adapter is non-linear"),
    ("sc_tuner", {"type": "sc_tuner", "ratio": 0.5}, "sc_tuner is non-linear"),
    ("bypass", {"type": "bypass"}, "bypass is a side network"),
    *[(kind, config, f"{kind} is built by peft") for kind, config in (
        ("dora", {"type": "dora", "rank": 4}), ("loha", {"type": "loha", "rank": 4}),
        ("lokr", {"type": "lokr", "rank": 4}), ("oft", {"type": "oft", "block_size": 8}))],
]


def snapshot(unet):
    return {k: v.clone() for k, v in unet.state_dict().items()}


def assert_same_tensors(unet, before):
    now = unet.state_dict()
    assert now.keys() == before.keys()
    assert all(torch.equal(now[k], v) for k, v in before.items()), [k for k, v in before.items()
                                                                     if not torch.equal(now[k], v)][:3]


@pytest.mark.parametrize("name,config", FUSABLE, ids=[n for n, _ in FUSABLE])
def test_fused_output_equals_unfused_and_unfuse_restores_every_tensor_bit_for_bit(unet, unet_inputs, name, config):
    handle = attach(unet, config)
    perturb(handle, std=0.1)
    before = snapshot(unet)
    unfused = run_unet(unet, unet_inputs)
    handle.fuse()
    fused = run_unet(unet, unet_inputs)
    torch.testing.assert_close(fused, unfused, rtol=0, atol=2e-6)  # fp32 round-off of W + BA vs Wx + B(Ax)
    if name.startswith("lora"):
        assert not torch.equal(unet.state_dict()[next(k for k in before if k.endswith("attn1.to_q.weight"))],
                               before[next(k for k in before if k.endswith("attn1.to_q.weight"))])
    handle.unfuse()
    assert_same_tensors(unet, before)
    assert torch.equal(run_unet(unet, unet_inputs), unfused)


def test_in_memory_lora_fuse_equals_diffusers_fuse_lora_of_the_exported_file(tiny_sd, tmp_path):
    pytest.importorskip("peft")
    handle = attach(tiny_sd.unet, {"type": "lora", "rank": 4, "alpha": 8})
    perturb(handle, std=0.1)
    save_diffusers_lora(tmp_path, handle)
    handle.fuse()
    ours = snapshot(tiny_sd.unet)
    handle.unfuse()
    handle.detach()
    pipe = build_pipeline(tiny_sd)
    pipe.load_lora_weights(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")
    pipe.fuse_lora()
    theirs = {k.replace(".base_layer", ""): v for k, v in pipe.unet.state_dict().items() if "lora_" not in k}
    assert theirs.keys() == ours.keys()
    changed = [k for k in ours if k.endswith(("to_q.weight", "to_out.0.weight"))]
    assert changed and all(torch.equal(theirs[k], ours[k]) for k in ours), \
        [k for k in ours if not torch.equal(theirs[k], ours[k])][:3]


@pytest.mark.parametrize("name,config,reason", REFUSED, ids=[n for n, _, _ in REFUSED])
def test_what_cannot_be_fused_is_refused_with_the_reason(unet, name, config, reason):
    handle = attach(unet, config)
    before = snapshot(unet)
    with pytest.raises(ValueError, match=f"tuner set 'default' cannot be fused: {reason}") as err:
        handle.fuse()
    assert "\n" not in str(err.value) and not handle.fused
    assert_same_tensors(unet, before)


def test_a_set_fusing_partly_says_what_stays_a_branch(unet, unet_inputs, caplog):
    handle = attach(unet, [{"type": "res_adapter", "dim": 8}, {"type": "res_prompt", "num_tokens": 2}])
    with caplog.at_level(logging.INFO, logger="restune_diffusion.attach"):
        plan = handle.fuse()
    assert plan["res_prompt"].startswith("K/V of") and plan["res_adapter"].startswith("not fused: non-linear")
    assert "res_adapter not fused: non-linear" in caplog.text


def test_full_fine_tuning_is_in_the_weights_already(unet, unet_inputs):
    handle = attach(unet, {"type": "full"})
    assert handle.fuse() == {"full": "in the UNet's weights already"}
    handle.unfuse()


def test_scale_and_enabled_changes_apply_while_fused(unet, unet_inputs):
    base = run_unet(unet, unet_inputs)
    handle = attach(unet, {"type": "lora", "rank": 4})
    perturb(handle, std=0.1)
    handle.scale = 0.5
    half = run_unet(unet, unet_inputs)
    handle.scale = 1.0
    handle.fuse()
    handle.scale = 0.5
    torch.testing.assert_close(run_unet(unet, unet_inputs), half, rtol=0, atol=2e-6)
    with handle.disabled():
        torch.testing.assert_close(run_unet(unet, unet_inputs), base, rtol=0, atol=2e-6)
    handle.scale = 0.0
    assert torch.equal(run_unet(unet, unet_inputs), base)  # W + 0·BA = W: the original bits


def test_two_fused_loras_on_one_projection_unfuse_in_any_order(unet, unet_inputs):
    before = snapshot(unet)
    a, b = attach(unet, {"type": "lora", "rank": 4}, name="a"), attach(unet, {"type": "lora", "rank": 2}, name="b")
    perturb(a, std=0.1, seed=1)
    perturb(b, std=0.1, seed=2)
    both = run_unet(unet, unet_inputs)
    with a.disabled():
        only_b = run_unet(unet, unet_inputs)
    a.fuse()
    b.fuse()
    torch.testing.assert_close(run_unet(unet, unet_inputs), both, rtol=0, atol=4e-6)
    a.unfuse()  # the first one fused goes first: b's delta stays in the weights
    torch.testing.assert_close(run_unet(unet, unet_inputs), both, rtol=0, atol=4e-6)
    with a.disabled():
        torch.testing.assert_close(run_unet(unet, unet_inputs), only_b, rtol=0, atol=4e-6)
    b.unfuse()
    assert_same_tensors(unet, before)
    a.fuse()
    a.detach()  # detaching a fused set takes its delta out too
    b.detach()
    assert_same_tensors(unet, before)


def test_a_fused_set_refuses_to_train(unet, unet_inputs):
    handle = attach(unet, {"type": "lora", "rank": 4})
    handle.fuse()
    with pytest.raises(RuntimeError, match="is fused into the UNet's weights: its tensors get no gradient"):
        unet(*unet_inputs).sample.sum().backward()


# ---------------------------------------------------------------------------------------------------------------------
# cached K/V: used, and invalidated by everything they are made of


def count_kv(monkeypatch, cls):
    calls = []
    compute = cls.compute_kv
    monkeypatch.setattr(cls, "compute_kv", lambda self, attn: calls.append(1) or compute(self, attn))
    return calls


def test_fused_prompt_kv_are_computed_once_not_at_every_step(unet, unet_inputs, monkeypatch):
    from restune_diffusion.tuners.prompt import Prompt

    handle = attach(unet, {"type": "prompt", "num_tokens": 4})
    calls = count_kv(monkeypatch, Prompt)
    run_unet(unet, unet_inputs)
    per_step = len(calls)
    assert per_step == 7  # the tiny UNet's transformer blocks: one attn1 each
    handle.fuse()
    for _ in range(3):
        run_unet(unet, unet_inputs)
    assert len(calls) == 2 * per_step  # once at the first fused step, then from the cache
    handle.unfuse()
    run_unet(unet, unet_inputs)
    assert len(calls) == 3 * per_step


def test_unfused_sets_add_nothing_to_the_hot_path(unet, unet_inputs):
    handle = attach(unet, [{"type": "lora", "rank": 4}, {"type": "res_prompt", "num_tokens": 2}])
    run_unet(unet, unet_inputs)
    assert not [m for m in unet.modules() if fusion.RECORD in m.__dict__]  # no weight record, no cache
    assert all(getattr(t, "kv_cache", None) is None for _, _, t in handle._attn)
    assert all(not getattr(t, "fused", False) for _, t in handle._residuals)


@pytest.mark.parametrize("change", ["own tokens in place", "own scale", "lora on W_k: its scale",
                                    "lora on W_k: its tensors", "lora on W_k: disabled", "lora on W_k: detached",
                                    "lora attached on W_k", "W_k in place"])
def test_fused_kv_follow_every_change_of_what_they_are_made_of(unet, unet_inputs, change):
    prompt = attach(unet, {"type": "res_prompt", "num_tokens": 4, "lam_value": 0.5}, name="prompt")
    perturb(prompt, std=0.1)
    lora = None
    if change != "lora attached on W_k":
        lora = attach(unet, {"type": "lora", "rank": 4, "modules": ["to_k", "to_v"]}, name="lora")
        perturb(lora, std=0.1, seed=5)
    prompt.fuse()
    run_unet(unet, unet_inputs)  # fills the caches

    def make_change():
        nonlocal lora
        with torch.no_grad():
            if change == "own tokens in place":
                for name, p in prompt.module.named_parameters():
                    if name.endswith("tokens"):
                        p.mul_(1.5)
            elif change == "own scale":
                prompt.scale = 0.3
            elif change == "lora on W_k: its scale":
                lora.scale = 0.3
            elif change == "lora on W_k: its tensors":
                for p in lora.trainable_parameters():
                    p.mul_(2.0)
            elif change == "lora on W_k: disabled":
                lora.disable()
            elif change == "lora on W_k: detached":
                lora.detach()
            elif change == "lora attached on W_k":
                lora = attach(unet, {"type": "lora", "rank": 4, "modules": ["to_k", "to_v"]}, name="lora")
                perturb(lora, std=0.1, seed=5)
            elif change == "W_k in place":
                unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_k.weight.mul_(1.1)

    make_change()
    got = run_unet(unet, unet_inputs)
    prompt.unfuse()
    expected = run_unet(unet, unet_inputs)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)


class CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """The aten ops a forward dispatches, by name."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def aten_ops(unet, inputs) -> collections.Counter:
    with CountOps() as counter:
        run_unet(unet, inputs)
    return counter.ops


def test_a_fused_lora_runs_exactly_the_base_models_ops_and_fused_kv_drop_their_projections(unet, unet_inputs):
    base = aten_ops(unet, unet_inputs)
    lora = attach(unet, {"type": "lora", "rank": 4}, name="lora")
    perturb(lora, std=0.1)
    assert sum(aten_ops(unet, unet_inputs).values()) > sum(base.values())
    lora.fuse()
    assert aten_ops(unet, unet_inputs) == base  # the LoRA row's fused cost is the base's, op for op
    prompt = attach(unet, {"type": "prompt", "num_tokens": 4}, name="prompt")
    unfused = aten_ops(unet, unet_inputs)
    prompt.fuse()
    aten_ops(unet, unet_inputs)  # fills the caches
    fused = aten_ops(unet, unet_inputs)
    assert sum((unfused - fused).values()) >= 2 * 7 and not fused - unfused  # W_k, W_v on the tokens of 7 attn1


def test_a_full_set_reweighted_under_a_fused_lora_keeps_both_exact(unet, unet_inputs):
    before = snapshot(unet)
    full = attach(unet, {"type": "full"}, name="full")
    full.keep_base_weights()
    perturb(full, std=0.01)
    lora = attach(unet, {"type": "lora", "rank": 4}, name="lora")
    perturb(lora, std=0.1, seed=4)
    full.scale = 0.5
    unfused = run_unet(unet, unet_inputs)
    full.scale = 1.0
    lora.fuse()
    full.scale = 0.5  # rewrites the UNet's weights under the fused LoRA's delta, which is added back after
    torch.testing.assert_close(run_unet(unet, unet_inputs), unfused, rtol=0, atol=2e-6)
    lora.unfuse()
    assert torch.equal(run_unet(unet, unet_inputs), unfused)
    lora.fuse()
    full.detach()
    lora.detach()
    assert_same_tensors(unet, before)



def test_a_full_set_saves_its_own_weights_at_any_weight_and_under_fused_sets(unet):
    full = attach(unet, {"type": "full"}, name="full")
    full.keep_base_weights()
    perturb(full, std=0.01)
    own = {k: v.clone() for k, v in full.state_dict().items()}
    lora = attach(unet, {"type": "lora", "rank": 4}, name="lora")
    perturb(lora, std=0.1, seed=4)
    lora.fuse()
    full.scale = 0.3
    assert all(torch.equal(full.state_dict()[k], v) for k, v in own.items())
    full.scale = 1.0
    assert all(torch.equal(full.state_dict()[k], v) for k, v in own.items())
