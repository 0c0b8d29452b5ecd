"""Res-Tuning-Bypass: identity at init, no backbone graph, weights, dtypes, and multi-task routing/generation."""


import numpy as np
import pytest
import torch

from conftest import (
    assert_checkpointing_keeps_gradients,
    assert_step_changes_only_tuners,
    count_saved,
    perturb,
    run_unet,
)
from restune_diffusion.attach import attach, attached_sets
from restune_diffusion.models import build_pipeline, build_unet
from restune_diffusion.multitask import generate_multitask, multitask_unet_forward, route_bypasses
from restune_diffusion.sampling import SamplingSettings, generate
from restune_diffusion.tuners.bypass import BypassConfig, BypassHub
from restune_diffusion.weights import load_tuners, save_tuners

BYPASS = {"type": "bypass"}
VARIANTS = [
    ("default", BYPASS),
    ("explicit_stems", {"type": "bypass", "stems": ["mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2"]}),
    ("bilinear_3x3", {"type": "bypass", "resize": "bilinear", "projection": "3x3"}),
    ("vertical_only_dense", {"type": "bypass", "horizontal": "none", "groups": 1, "hidden_ratio": 1.0}),
]
IDS = [n for n, _ in VARIANTS]


def test_default_bypass_on_sd15_has_the_paper_parameter_count():
    handle = attach(build_unet("sd15", device="meta"), BYPASS)
    # group adapters (4 groups, hidden C/2) on both paths: 2,728,000; 1x1 projections 1280→640, 640→320: 1,024,960
    assert handle.num_parameters() == 3_752_960
    assert abs(handle.num_parameters() - 3.76e6) / 3.76e6 < 0.01


@pytest.mark.parametrize("name,config", VARIANTS, ids=IDS)
def test_identity_at_init(unet, unet_inputs, name, config):
    base = run_unet(unet, unet_inputs)
    attach(unet, config)
    assert torch.equal(run_unet(unet, unet_inputs), base)


@pytest.mark.parametrize("name,config", VARIANTS, ids=IDS)
def test_nonzero_bypass_changes_output_and_disabled_restores_base(unet, unet_inputs, name, config):
    base = run_unet(unet, unet_inputs)
    handle = attach(unet, config)
    perturb(handle)
    tuned = run_unet(unet, unet_inputs)
    assert not torch.allclose(tuned, base, atol=1e-5)
    with handle.disabled():
        assert torch.equal(run_unet(unet, unet_inputs), base)
    handle.scale = 0.0
    assert torch.equal(run_unet(unet, unet_inputs), base)
    handle.scale = 1.0
    assert torch.equal(run_unet(unet, unet_inputs), tuned)


@pytest.mark.parametrize("name,config", VARIANTS, ids=IDS)
def test_gradients_reach_only_bypass_parameters(unet, unet_inputs, name, config):
    handle = attach(unet, config)
    perturb(handle)
    unet(*unet_inputs).sample.square().mean().backward()
    assert all(p.grad is None for p in unet.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in handle.trainable_parameters())


def backbone_modules(unet):
    return [unet.conv_in, unet.time_embedding, *unet.down_blocks, unet.mid_block, *unet.up_blocks]


def test_training_forward_saves_no_backbone_activation(tiny_sd, unet_inputs):
    from restune_diffusion.models import build_tiny_sd

    plain = build_tiny_sd(0).unet  # the reference: every weight trainable
    with count_saved(plain, backbone_modules(plain)) as full:
        plain(*unet_inputs).sample.mean().backward()
    unet = tiny_sd.unet
    handle = attach(unet, BYPASS)
    perturb(handle)
    grad_modes = []
    for module in backbone_modules(unet):
        module.register_forward_pre_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    with count_saved(unet, backbone_modules(unet)) as ours:
        unet(*unet_inputs).sample.mean().backward()
    assert ours["backbone"] == 0 and not any(grad_modes)
    assert 0 < ours["all"] < full["all"] / 5, (ours, full)
    assert torch.is_grad_enabled()


def test_no_feature_stays_referenced_and_grad_mode_survives_an_exception(unet, unet_inputs):
    handle = attach(unet, BYPASS)
    run = BypassHub.of(unet).run_of(handle)
    unet(*unet_inputs)
    assert run.feats == {}

    def fail(*_):
        raise RuntimeError("boom")

    hook = unet.up_blocks[1].register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        unet(*unet_inputs)
    hook.remove()
    assert torch.is_grad_enabled() and run.feats == {}


def test_gradient_checkpointing_changes_nothing(unet, unet_inputs):
    handle = attach(unet, BYPASS)
    perturb(handle)
    assert_checkpointing_keeps_gradients(unet, unet_inputs, handle, atol=1e-7)


def test_optimizer_step_changes_only_bypass_tensors(unet, unet_inputs):
    handle = attach(unet, BYPASS)
    perturb(handle)
    assert_step_changes_only_tuners(unet, unet_inputs, handle)


def test_save_load_round_trip_gives_identical_outputs(unet, unet_inputs, tmp_path):
    handle = attach(unet, {"type": "bypass", "stems": ["mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2"],
                           "resize": "bilinear"}, name="task")
    perturb(handle)
    expected = run_unet(unet, unet_inputs)
    path = save_tuners(tmp_path / "task.safetensors", handle)
    handle.detach()
    assert BypassHub.of(unet) is None and "_restune_no_grad" not in unet.__dict__
    loaded = load_tuners(unet, path)
    assert loaded.configs[0].resize == "bilinear"
    assert torch.equal(run_unet(unet, unet_inputs), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_backbone_with_fp32_bypass(unet, unet_inputs, dtype):
    base_out = run_unet(unet.to(dtype), tuple(x.to(dtype) if x.is_floating_point() else x for x in unet_inputs))
    handle = attach(unet, BYPASS)
    x, t, e = unet_inputs
    assert torch.equal(run_unet(unet, (x.to(dtype), t, e.to(dtype))), base_out)  # identity survives the round trip
    perturb(handle)
    out = unet(x.to(dtype), t, e.to(dtype)).sample
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().square().mean().backward()
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
               for p in handle.trainable_parameters())


@pytest.mark.parametrize("config,message", [
    ({"stems": ["mid_block", "up_blocks.7"]}, "bypass.stems: the UNet has no module 'up_blocks.7'"),
    ({"groups": 3}, "bypass.groups=3 must divide"),
    ({"projection": "none"}, "bypass.projection='none' but the width changes 64→32"),
    ({"stems": ["mid_block", "up_blocks.0"]}, "the last stem up_blocks.0 gives 64 channels but conv_norm_out takes 32"),
])
def test_bad_configs_name_the_field(unet, config, message):
    with pytest.raises(ValueError, match=message):
        attach(unet, {"type": "bypass", **config})
    assert BypassHub.of(unet) is None and not attached_sets(unet)


@pytest.mark.parametrize("config,field", [({"stems": []}, "bypass.stems"), ({"resize": "cubic"}, "bypass.resize"),
                                          ({"vertical": "none"}, "bypass.vertical"),
                                          ({"hidden_ratio": 0}, "bypass.hidden_ratio")])
def test_config_validation(config, field):
    with pytest.raises(ValueError, match=field):
        BypassConfig(**config)


def test_two_enabled_bypasses_without_a_route_are_an_error(unet, unet_inputs):
    attach(unet, BYPASS, name="a")
    b = attach(unet, BYPASS, name="b")
    with pytest.raises(RuntimeError, match="bypass sets a, b are all enabled"):
        run_unet(unet, unet_inputs)
    assert torch.is_grad_enabled()
    b.disable()
    run_unet(unet, unet_inputs)
    with pytest.raises(ValueError, match="share the target"):
        attach(unet, {"type": "bypass", "target": "conv_out", "stems": ["mid_block"]}, name="c")


# ---------------------------------------------------------------------------------------------------------------------
# multi-task (restune_diffusion/multitask.py)


@pytest.fixture
def two_tasks(unet):
    a, b = attach(unet, BYPASS, name="a"), attach(unet, {**BYPASS, "resize": "bilinear"}, name="b")
    perturb(a, seed=1)
    perturb(b, seed=2)
    return a, b


def solo(unet, handle, inputs, sets):
    """The output with only `handle` enabled (None: the base UNet)."""
    for h in sets:
        h.enabled = h is handle
    try:
        return run_unet(unet, inputs)
    finally:
        for h in sets:
            h.enabled = True


def count_calls(unet):
    calls = []
    unet.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def test_one_backbone_pass_gives_each_task_its_solo_output(unet, two_tasks):
    a, b = two_tasks
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(2, 4, 8, 8, generator=g) for _ in range(3)]
    t, e = torch.tensor([10, 700]), torch.randn(2, 77, 32, generator=g)
    calls = count_calls(unet)
    out = multitask_unet_forward(unet, [a, b, None], torch.cat(xs), t.repeat(3), e.repeat(3, 1, 1))
    assert len(calls) == 1
    for chunk, handle, x in zip(out.chunk(3), [a, b, None], xs):
        torch.testing.assert_close(chunk, solo(unet, handle, (x, t, e), two_tasks), rtol=0, atol=1e-5)
    calls.clear()
    separate = multitask_unet_forward(unet, [a, b, None], torch.cat(xs), t.repeat(3), e.repeat(3, 1, 1), shared=False)
    assert len(calls) == 3
    torch.testing.assert_close(separate, out, rtol=0, atol=1e-5)


def test_broadcast_feeds_every_bypass_from_one_pass_on_shared_input(unet, two_tasks, unet_inputs):
    calls = count_calls(unet)
    out = multitask_unet_forward(unet, [a := two_tasks[0], two_tasks[1]], *unet_inputs, broadcast=True)
    assert len(calls) == 1 and out.shape[0] == 4
    assert torch.equal(out[:2], solo(unet, a, unet_inputs, two_tasks))  # same backbone rows: bit for bit
    assert torch.equal(out[2:], solo(unet, two_tasks[1], unet_inputs, two_tasks))


def test_route_rejects_non_bypass_sets_and_nesting(unet, two_tasks):
    other = attach(unet, {"type": "res_adapter", "dim": 4}, name="adapter")
    with pytest.raises(ValueError, match="has no bypass"):
        with route_bypasses(unet, [two_tasks[0], other]):
            pass
    with route_bypasses(unet, list(two_tasks)):
        with pytest.raises(RuntimeError, match="already active"):
            with route_bypasses(unet, list(two_tasks)):
                pass
    assert BypassHub.of(unet).route is None


def test_a_task_set_with_tuners_besides_its_bypass_is_refused_naming_it(tiny_sd, tmp_path, unet_inputs):
    # one backbone pass serves every task, so a task's LoRA would act on every task's rows: refused, not spread
    unet = tiny_sd.unet
    mixed = attach(unet, [BYPASS, {"type": "lora", "rank": 2}], name="mixed")
    perturb(mixed, seed=1)
    other = attach(unet, BYPASS, name="other")
    with pytest.raises(ValueError, match=r"^tuner set 'mixed': holds lora tuners besides its bypass"):
        multitask_unet_forward(unet, [mixed, other], *unet_inputs, broadcast=True)
    path = save_tuners(tmp_path / "mixed.safetensors", mixed)
    mixed.detach()
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'mixed.safetensors'}: holds lora tuners besides its bypass"):
        generate_multitask(build_pipeline(tiny_sd), {"mixed": path, "other": other}, "a cat", steps=1, height=16,
                           width=16)
    assert set(attached_sets(unet)) == {"other"}  # the file's set is gone again


def test_generate_multitask_equals_the_pipeline_run_per_task(tiny_sd, tmp_path):
    unet = tiny_sd.unet
    a = attach(unet, BYPASS, name="a")
    perturb(a, std=0.2, seed=1)
    b = attach(unet, {**BYPASS, "resize": "bilinear"}, name="b")
    perturb(b, std=0.2, seed=2)
    path = save_tuners(tmp_path / "b.safetensors", b)
    b.detach()
    pipe = build_pipeline(tiny_sd)
    settings = SamplingSettings(steps=3, guidance_scale=5.0, seed=11)
    kw = dict(height=16, width=16, output_type="np")
    calls = count_calls(unet)
    got = generate_multitask(pipe, {"a": a, "b": path, "base": None}, "a red circle", settings, **kw)
    assert len(calls) == 3  # one backbone pass per step for three tasks
    assert set(attached_sets(unet)) == {"a"}  # the set loaded from the file is gone again

    def reference():  # the one sampling path, one task
        return generate(pipe, ["a red circle"], settings, **kw)[0]

    expected = {"a": reference()}
    a.disable()
    expected["base"] = reference()
    load_tuners(unet, path, name="b")
    expected["b"] = reference()
    for name, images in got.items():
        assert images.shape == (1, 16, 16, 3)
        np.testing.assert_allclose(images, expected[name], rtol=0, atol=1e-5)
    assert np.abs(expected["a"] - expected["base"]).max() > 1e-3  # the tasks really differ


def test_generate_multitask_separate_passes_agree_and_returns_pil(tiny_sd):
    unet = tiny_sd.unet
    a, b = attach(unet, BYPASS, name="a"), attach(unet, BYPASS, name="b")
    perturb(a, std=0.2, seed=1)
    perturb(b, std=0.2, seed=2)
    pipe = build_pipeline(tiny_sd, scheduler="dpm")  # a multistep scheduler: its history must be per task
    kw = dict(steps=3, guidance_scale=5.0, seed=5, height=16, width=16)  # scheduler None: the pipeline's own
    shared = generate_multitask(pipe, {"a": a, "b": b}, ["a cat", "a dog"], output_type="np", **kw)
    calls = count_calls(unet)
    separate = generate_multitask(pipe, {"a": a, "b": b}, ["a cat", "a dog"], output_type="np", shared=False, **kw)
    assert len(calls) == 6
    for name in ("a", "b"):
        np.testing.assert_allclose(shared[name], separate[name], rtol=0, atol=1e-5)
    pil = generate_multitask(pipe, {"a": a}, "a cat", steps=2, seed=0, height=16, width=16)
    assert len(pil["a"]) == 1 and pil["a"][0].size == (16, 16)


def test_routed_training_keeps_the_activations_of_one_bypass_not_k(unet, unet_inputs):
    """Joint training (K bypasses, one backbone pass): each bypass is recomputed in the backward from its detached
    features, so what autograd keeps grows with K only by the tail after the target, and each bypass still gets
    the gradient it gets when trained alone."""
    handles = [attach(unet, BYPASS, name=f"t{i}") for i in range(4)]
    for i, handle in enumerate(handles):
        perturb(handle, seed=i + 1)

    def saved_bytes(k: int) -> int:
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        for h in handles:
            h.module.zero_grad(set_to_none=True)
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        with route_bypasses(unet, handles[:k], broadcast=True), hooks:
            out = unet(*unet_inputs).sample  # (k·B, ...)
            sum(rows.square().mean() for rows in out.chunk(k)).backward()
        return total[0]

    one = saved_bytes(1)
    alone = [p.grad.clone() for p in handles[0].trainable_parameters()]
    four = saved_bytes(4)
    assert four < 2 * one, (one, four)  # before: every bypass's activations were kept, about 4x
    for g, p in zip(alone, handles[0].trainable_parameters()):
        assert p.grad is not None and g.abs().sum() > 0
        torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-7)
