"""Several tuner sets on one UNet, each at its own weight (restune_diffusion/mixing.py, issue 26)."""

import json

import pytest
import torch

import restune_diffusion as rd
from conftest import perturb, run_unet
from restune_diffusion import mixing
from restune_diffusion.attach import attach, transformer_blocks
from restune_diffusion.generate import tuner_specs
from restune_diffusion.mixing import load_weighted, parse_weighted, set_tuner_weights

EVERY_TYPE = [
    ("lora", {"type": "lora", "rank": 4}),
    ("res_adapter", {"type": "res_adapter", "dim": 8, "targets": ["ff", "attn2"]}),
    ("adapter", {"type": "adapter", "dim": 8}),
    ("prefix", {"type": "prefix", "num_tokens": 4}),
    ("prompt", {"type": "prompt", "num_tokens": 4}),
    ("res_prefix", {"type": "res_prefix", "num_tokens": 4, "targets": ["attn1", "attn2"]}),
    ("res_prompt", {"type": "res_prompt", "num_tokens": 4, "lam": "exact"}),
    ("sc_tuner", {"type": "sc_tuner", "ratio": 0.5}),
    ("bypass", {"type": "bypass"}),
    ("full", {"type": "full"}),
]
SOFTMAX_SHARED = ("prefix", "prompt")  # weight = the tokens' share of the attention × w: weight 0 to round-off


@pytest.mark.parametrize("name,config", EVERY_TYPE, ids=[n for n, _ in EVERY_TYPE])
def test_every_tuner_type_honours_its_weight(unet, unet_inputs, name, config):
    base = run_unet(unet, unet_inputs)
    handle = attach(unet, config)
    handle.keep_base_weights()  # full: blending needs the base (load_tuners keeps it)
    perturb(handle, std=0.1)
    tuned = run_unet(unet, unet_inputs)
    handle.scale = 0.5
    half = run_unet(unet, unet_inputs)
    assert (half - base).abs().max() > 1e-5 and (half - tuned).abs().max() > 1e-5
    handle.scale = 0.0
    if name in SOFTMAX_SHARED:
        torch.testing.assert_close(run_unet(unet, unet_inputs), base, rtol=0, atol=1e-6)
    else:
        assert torch.equal(run_unet(unet, unet_inputs), base)
    handle.scale = 1.0
    assert torch.equal(run_unet(unet, unet_inputs), tuned)


def test_weights_of_additive_tuners_add_up(unet):
    # LoRA on attn1's output projection and a Res-Adapter beside attn1: both add to attn1's output, so weights mix
    lora = attach(unet, {"type": "lora", "rank": 4, "targets": ["attn1"], "modules": ["to_out.0"]}, name="lora")
    adapter = attach(unet, {"type": "res_adapter", "dim": 8, "targets": ["attn1"]}, name="adapter")
    perturb(lora, std=0.2, seed=1)
    perturb(adapter, std=0.2, seed=2)
    attn = transformer_blocks(unet)[0][1].attn1
    x = torch.randn(2, 16, attn.to_q.in_features, generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def out(w_lora, w_adapter):
        set_tuner_weights(unet, ["lora", "adapter"], [w_lora, w_adapter])
        return attn(x)

    base = out(0.0, 0.0)
    with lora.disabled(), adapter.disabled():
        assert torch.equal(attn(x), base)
    d_lora, d_adapter = out(1.0, 0.0) - base, out(0.0, 1.0) - base
    assert d_lora.abs().max() > 1e-3 and d_adapter.abs().max() > 1e-3
    torch.testing.assert_close(out(0.8, 0.5) - base, 0.8 * d_lora + 0.5 * d_adapter, rtol=0, atol=1e-6)
    torch.testing.assert_close(out(-0.5, 1.5) - base, -0.5 * d_lora + 1.5 * d_adapter, rtol=0, atol=1e-6)


def test_weight_zero_for_every_set_is_the_base_exactly(unet, unet_inputs):
    base = run_unet(unet, unet_inputs)
    for i, config in enumerate([{"type": "lora", "rank": 4}, {"type": "res_adapter", "dim": 8},
                                {"type": "res_prompt", "num_tokens": 2}, {"type": "sc_tuner", "ratio": 0.5}]):
        perturb(attach(unet, config, name=f"s{i}"), std=0.1, seed=i)
    set_tuner_weights(unet, ["s0", "s1", "s2", "s3"], 0.0)
    assert torch.equal(run_unet(unet, unet_inputs), base)


@pytest.fixture
def files(tmp_path):
    """A LoRA, a Res-Adapter and two bypass tuner files made on the tiny UNet, with non-zero weights."""
    paths = {}
    for i, (name, config) in enumerate([("lora", {"type": "lora", "rank": 4}),
                                        ("adapter", {"type": "res_adapter", "dim": 4}),
                                        ("cats", {"type": "bypass"}), ("dogs", {"type": "bypass"})]):
        sd = rd.build_tiny_sd(0)
        handle = attach(sd.unet, config, name=name)
        perturb(handle, std=0.2, seed=i)
        paths[name] = rd.save_tuners(tmp_path / f"{name}.safetensors", handle)
    return paths


def test_files_load_at_their_weights_and_weights_change_without_reloading(files, unet_inputs, monkeypatch):
    unet = rd.build_tiny_sd(0).unet
    handles = load_weighted(unet, [("a", files["lora"], 0.8), ("b", files["adapter"], 0.5)])
    assert {n: h.scale for n, h in handles.items()} == {"a": 0.8, "b": 0.5}
    first = run_unet(unet, unet_inputs)
    monkeypatch.setattr(mixing, "load_tuners", lambda *a, **k: pytest.fail("a weight change reloaded a file"))
    set_tuner_weights(unet, ["a", "b"], [0.2, 1.0])
    assert not torch.equal(run_unet(unet, unet_inputs), first)
    set_tuner_weights(unet, ["a", "b"], [0.8, 0.5])
    assert torch.equal(run_unet(unet, unet_inputs), first)
    set_tuner_weights(unet, "a")  # as diffusers' set_adapters: the sets not named are off
    assert handles["a"].scale == 1.0 and handles["a"].enabled and not handles["b"].enabled
    with pytest.raises(ValueError, match=r"no tuner set named \['c'\] on this UNet; sets: \['a', 'b'\]"):
        set_tuner_weights(unet, ["a", "c"])
    with pytest.raises(ValueError, match="2 names but 1 weights"):
        set_tuner_weights(unet, ["a", "b"], [0.5])


def test_bypass_files_are_tasks_unless_mixed_and_mixed_they_add_up(files, unet_inputs):
    unet = rd.build_tiny_sd(0).unet
    with pytest.raises(ValueError, match=r"2 bypass sets \(cats, dogs\) on one UNet. Bypass files are tasks.*mix=True"):
        load_weighted(unet, [("cats", files["cats"], 1.0), ("dogs", files["dogs"], 1.0)])
    assert not rd.attached_sets(unet)  # nothing left behind
    seen = []
    unet.conv_norm_out.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    base = (run_unet(unet, unet_inputs), seen[-1])[1]
    handles = load_weighted(unet, [("cats", files["cats"], 0.7), ("dogs", files["dogs"], 0.4)], mix=True)
    run_unet(unet, unet_inputs)
    mixed = seen[-1]
    deltas = []
    for name in ("cats", "dogs"):
        set_tuner_weights(unet, name)
        run_unet(unet, unet_inputs)
        deltas.append(seen[-1] - base)
    torch.testing.assert_close(mixed - base, 0.7 * deltas[0] + 0.4 * deltas[1], rtol=0, atol=1e-6)
    set_tuner_weights(unet, ["cats", "dogs"], [0.7, 0.0])  # a bypass at weight 0 adds exactly nothing
    run_unet(unet, unet_inputs)
    with handles["dogs"].disabled():
        run_unet(unet, unet_inputs)
    assert torch.equal(seen[-1], seen[-2])


@pytest.mark.parametrize("spec,expected", [
    ("out/a.safetensors:0.8", ("out/a.safetensors", 0.8)),
    ("out/a.safetensors", ("out/a.safetensors", 1.0)),
    ("C:/runs/a.safetensors", ("C:/runs/a.safetensors", 1.0)),
    ("run:3/a.safetensors:-.5", ("run:3/a.safetensors", -0.5)),
    ("a.safetensors:1e-1", ("a.safetensors", 0.1)),
    ("a.safetensors:x", ("a.safetensors:x", 1.0)),
])
def test_the_weight_is_read_only_from_a_trailing_number(spec, expected):
    assert parse_weighted(spec) == expected


def test_a_file_whose_name_ends_in_a_number_is_not_split(tmp_path):
    odd = tmp_path / "tuners:2"
    odd.write_bytes(b"")
    assert parse_weighted(str(odd), 0.3) == (str(odd), 0.3)


def test_load_pipeline_names_and_weights_the_files(files, tmp_path):
    specs = tuner_specs([files["lora"], f"{files['adapter']}:0.5", (files["cats"], 0.25)])
    assert specs == [("lora", str(files["lora"]), 1.0), ("adapter", str(files["adapter"]), 0.5),
                     ("cats", str(files["cats"]), 0.25)]
    pipe = rd.load_pipeline("tiny-random", tuners={"x": f"{files['lora']}:0.3", "y": files["adapter"]},
                            device="cpu", scale=0.6, fuse=True)
    assert {n: h.scale for n, h in pipe.tuner_handles.items()} == {"x": 0.3, "y": 0.6}
    assert pipe.tuner_handles["x"].fused and not pipe.tuner_handles["y"].fused  # the Res-Adapter cannot fuse
    set_tuner_weights(pipe, ["x", "y"], [1.0, 0.0])
    assert pipe.tuner_handles["y"].scale == 0.0


def test_compile_unet_compiles_in_place_so_the_handles_keep_their_unet(tmp_path):
    sd = rd.build_tiny_sd(0)
    path = rd.save_tuners(tmp_path / "t.safetensors", attach(sd.unet, {"type": "lora", "rank": 4}))
    pipe = rd.load_pipeline("tiny-random", tuners=path, device="cpu", compile_mode="default")
    assert pipe.unet._compiled_call_impl is not None  # compiled lazily, at the first call
    assert rd.attached_sets(pipe.unet) == pipe.tuner_handles and pipe.tuner_handles["default"].unet is pipe.unet


def _generate(argv):
    from test_generate import _generate_main

    _generate_main()(argv)


def test_generate_cli_mixes_files_at_their_weights_and_bypass_files_are_tasks_unless_mix(files, tmp_path, capsys):
    common = ["--pretrained_model_name_or_path", "tiny-random", "--prompt", "a red circle", "--num_images", "1",
              "--steps", "2", "--height", "32", "--width", "32", "--device", "cpu"]
    mixed = tmp_path / "mixed"
    _generate([*common, "--tuners", f"{files['lora']}:0.5", "--tuners", f"{files['adapter']}:0.8", "--fuse",
               "--out", str(mixed)])
    assert "fuse: lora: lora folded into" in capsys.readouterr().out
    record = json.loads((mixed / "index.json").read_text())[0]
    assert record["tuners"] == [str(files["lora"]), str(files["adapter"])] and record["scale"] == [0.5, 0.8]
    tasks = tmp_path / "tasks"
    _generate([*common, "--tuners", str(files["lora"]), "--tuners", f"{files['cats']}:0.5", "--tuners",
               str(files["dogs"]), "--out", str(tasks)])
    assert sorted(p.name for p in tasks.iterdir()) == ["cats", "dogs"]
    record = json.loads((tasks / "cats" / "index.json").read_text())[0]
    assert record["tuners"] == [str(files["lora"]), str(files["cats"])] and record["scale"] == [1.0, 0.5]
    one = tmp_path / "one"
    _generate([*common, "--tuners", str(files["cats"]), "--tuners", str(files["dogs"]), "--mix", "--out", str(one)])
    assert (one / "00000.png").is_file() and not (one / "cats").exists()
