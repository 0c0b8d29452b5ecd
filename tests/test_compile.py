"""torch.compile of a tuned UNet (issue 26): one graph (fullgraph=True: a graph break is an error), the eager output,
and no recompile when a tuner's weight changes.

All slow-marked (-m slow; .ci/run runs them): dynamo alone (backend "eager": tracing, graph breaks and guards; 6-15 s)
on one UNet carrying every mechanism at once and on multi-task routing; then inductor, as users compile
(`compile_unet`), one test per tuner type; about two minutes each on one CPU thread, most of it generating and
building C++ kernels.
"""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from conftest import perturb, run_unet
from restune_diffusion.attach import attach
from restune_diffusion.mixing import compile_unet, mix_bypasses, set_tuner_weights
from restune_diffusion.multitask import multitask_unet_forward

# inductor vs eager on the tiny UNet (outputs of magnitude ~1): fp32 kernels fuse and reorder sums
ATOL, RTOL = 1e-5, 1e-4
EVERY_TYPE = [
    ("lora", {"type": "lora", "rank": 4}),
    ("res_adapter", {"type": "res_adapter", "dim": 8, "targets": ["attn1", "attn2", "ff", "block"]}),
    ("adapter", {"type": "adapter", "dim": 8}),
    ("prefix", {"type": "prefix", "num_tokens": 4}),
    ("prompt", {"type": "prompt", "num_tokens": 4}),
    ("res_prefix", {"type": "res_prefix", "num_tokens": 4, "targets": ["attn1", "attn2"], "lam": "exact"}),
    ("res_prompt", {"type": "res_prompt", "num_tokens": 4, "targets": ["attn1", "attn2"]}),
    ("sc_tuner", {"type": "sc_tuner", "ratio": 0.5}),
    ("bypass", {"type": "bypass"}),
    ("full", {"type": "full"}),
]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.slow  # over 8 s on 2 cores: the default suite stays under 5 minutes
def test_a_unet_with_every_mechanism_compiles_to_one_graph_and_a_weight_change_does_not_recompile(unet, unet_inputs):
    sets = {"lora": {"type": "lora", "rank": 4},
            "res_tuning": [{"type": "res_adapter", "dim": 8}, {"type": "res_prompt", "num_tokens": 2}],
            "prefix": {"type": "prefix", "num_tokens": 3, "targets": ["attn2"]},
            "sc": {"type": "sc_tuner", "ratio": 0.5}, "cats": {"type": "bypass"}, "dogs": {"type": "bypass"}}
    handles = {name: attach(unet, config, name=name) for name, config in sets.items()}
    for i, handle in enumerate(handles.values()):
        perturb(handle, std=0.1, seed=i)
    mix_bypasses(unet)
    weights = {"lora": 1.0, "res_tuning": 1.0, "prefix": 0.7, "sc": 1.0, "cats": 1.0, "dogs": 0.5}
    set_tuner_weights(unet, list(weights), list(weights.values()))
    eager = run_unet(unet, unet_inputs)
    unet.compile(fullgraph=True, backend="eager")  # fullgraph: any graph break raises
    torch.testing.assert_close(run_unet(unet, unet_inputs), eager, rtol=0, atol=1e-6)
    assert graphs() == 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        for weights in ({"lora": 0.3, "res_tuning": 0.5, "prefix": 0.2, "sc": -1.0, "cats": 0.0, "dogs": 2.0},
                        {"lora": 0.0, "res_tuning": 0.0, "prefix": 0.4, "sc": 0.0, "cats": 0.0, "dogs": 0.0}):
            set_tuner_weights(unet, list(weights), list(weights.values()))
            compiled = run_unet(unet, unet_inputs)
            unet._compiled_call_impl, impl = None, unet._compiled_call_impl
            eager = run_unet(unet, unet_inputs)
            unet._compiled_call_impl = impl
            torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-6)
    assert graphs() == 1


@pytest.mark.slow  # over 5 s on 2 cores: the default suite stays under 5 minutes
def test_multitask_routing_compiles_without_graph_breaks(unet, unet_inputs):
    a, b = attach(unet, {"type": "bypass"}, name="a"), attach(unet, {"type": "bypass"}, name="b")
    perturb(a, seed=1)
    perturb(b, seed=2)
    x, t, text = unet_inputs
    eager = multitask_unet_forward(unet, [a, b], torch.cat([x, x]), t.repeat(2), text.repeat(2, 1, 1))
    unet.compile(fullgraph=True, backend="eager")
    compiled = multitask_unet_forward(unet, [a, b], torch.cat([x, x]), t.repeat(2), text.repeat(2, 1, 1))
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-6)
    with torch._dynamo.config.patch(error_on_recompile=True):
        a.scale = 0.5
        multitask_unet_forward(unet, [a, b], torch.cat([x, x]), t.repeat(2), text.repeat(2, 1, 1))


@pytest.mark.slow
@pytest.mark.parametrize("name,config", EVERY_TYPE, ids=[n for n, _ in EVERY_TYPE])
def test_inductor_compiled_unet_equals_eager_per_tuner_type(unet, unet_inputs, name, config):
    handle = attach(unet, config)
    handle.keep_base_weights()
    perturb(handle, std=0.1)
    if name in ("prefix", "prompt"):
        handle.scale = 0.8  # their weight 1 skips a logit bias: moving away from 1 (or back) recompiles once
    eager = run_unet(unet, unet_inputs)
    compile_unet(unet)
    torch.testing.assert_close(run_unet(unet, unet_inputs), eager, rtol=RTOL, atol=ATOL)
    assert graphs() == 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        handle.scale = 0.5
        compiled = run_unet(unet, unet_inputs)
    assert graphs() == 1
    if name != "full" and any(not what.startswith("not fused") for what in handle.fusable().values()):
        handle.fuse()  # fusing changes guarded state once (a flag, a cache): one recompile, then none
        fused = run_unet(unet, unet_inputs)
        with torch._dynamo.config.patch(error_on_recompile=True):
            handle.scale = 0.25
            run_unet(unet, unet_inputs)
            handle.scale = 0.5
            torch.testing.assert_close(run_unet(unet, unet_inputs), fused, rtol=0, atol=0)
    unet._compiled_call_impl = None
    torch.testing.assert_close(compiled, run_unet(unet, unet_inputs), rtol=RTOL, atol=ATOL)


PEFT_TYPES = [("dora", {"type": "dora", "rank": 4}), ("loha", {"type": "loha", "rank": 2}),
              ("lokr", {"type": "lokr", "rank": 4, "factor": 4}), ("oft", {"type": "oft", "block_size": 16})]


@pytest.mark.slow  # dynamo traces peft's layers: 20-30 s each on 2 cores
@pytest.mark.parametrize("name,config", PEFT_TYPES, ids=[n for n, _ in PEFT_TYPES])
def test_peft_built_baselines_compile_to_one_graph_for_generation(unet, unet_inputs, name, config):
    """DoRA traces through peft's weight lookup only with tuners/dora.py's stand-in (without it: a graph break at
    `str.startswith` in every layer); LoHa and LoKr trace in eval mode, as generation runs (in train mode their
    module dropout draws torch.rand(1) and branches on it: data-dependent)."""
    unet.eval()  # as pipelines load it; the peft layers attached to it are made eval too (peft makes them train)
    handle = attach(unet, {**config, "targets": ["attn1", "attn2"], "modules": ["to_q", "to_k", "to_v", "to_out.0"]})
    perturb(handle, std=0.1)
    assert not any(m.training for m in unet.modules())
    eager = run_unet(unet, unet_inputs)
    unet.compile(fullgraph=True, backend="eager")  # fullgraph: any graph break raises
    torch.testing.assert_close(run_unet(unet, unet_inputs), eager, rtol=0, atol=1e-6)
    assert graphs() == 1
    if name != "oft":  # OFT has no scaling to change (a scale other than 1 is refused)
        # DoRA reads the weight as a tensor (no recompile); LoHa / LoKr as a float (one recompile per new weight)
        with torch._dynamo.config.patch(error_on_recompile=name == "dora"):
            handle.scale = 0.5
            compiled = run_unet(unet, unet_inputs)
        assert graphs() == (1 if name == "dora" else 2)
        unet._compiled_call_impl = None
        torch.testing.assert_close(compiled, run_unet(unet, unet_inputs), rtol=0, atol=1e-6)
        assert not torch.allclose(compiled, eager, atol=1e-4)  # the weight took effect

