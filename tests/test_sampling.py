"""restune_diffusion/sampling.py: one settings object and argparse group, one indexed generator, one seed rule: image i
of a run is the same image whatever the batch size, the number of processes or the number of tasks, for a
deterministic (DDIM) and a stochastic ("Euler a") sampler."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import perturb
from restune_diffusion.attach import attach
from restune_diffusion.models import build_pipeline, build_tiny_sd
from restune_diffusion.multitask import generate_multitask
from restune_diffusion.sampling import (
    PROTOCOL_STRIDE,
    SamplingSettings,
    add_sampling_args,
    generate,
    image_seed,
    sampling_settings,
)

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "a blue square", "a red circle", "a green star", "a red circle"]
SAMPLERS = ["ddim", "Euler a"]
ATOL = 2e-3  # batched kernels may round the last bits differently: under a level of 255


@pytest.fixture(scope="module")
def pipe_and_tasks():
    """The tiny random SD with two bypass tasks (non-zero weights, so each changes the images)."""
    sd = build_tiny_sd(0)
    tasks = [attach(sd.unet, {"type": "bypass"}, name=name) for name in ("a", "b")]
    for i, task in enumerate(tasks):
        perturb(task, std=0.2, seed=i + 1)
    return build_pipeline(sd), tasks


def alone(pipe, tasks, task, settings, **kw):
    """Images with only `task`'s bypass enabled (None: the base UNet)."""
    for t in tasks:
        t.enabled = t is task
    try:
        return generate(pipe, PROMPTS, settings, height=16, width=16, output_type="np", **kw)[0]
    finally:
        for t in tasks:
            t.enabled = True


def test_image_seed_is_seed_times_stride_plus_index():
    assert image_seed(3, 2) == 5 and image_seed(3, 2, PROTOCOL_STRIDE) == 3_000_002
    assert SamplingSettings(seed=7, seed_stride=PROTOCOL_STRIDE).image_seed(4) == 7_000_004


@pytest.mark.parametrize("scheduler", SAMPLERS)
def test_image_i_does_not_depend_on_the_batch_size(pipe_and_tasks, scheduler):
    pipe, (a, b) = pipe_and_tasks
    settings = SamplingSettings(scheduler, steps=4, seed=3)
    by_batch = [alone(pipe, [a, b], a, settings.replace(batch_size=n)) for n in (1, 2, 5)]
    for images in by_batch[1:]:
        np.testing.assert_allclose(images, by_batch[0], rtol=0, atol=ATOL)
    assert np.abs(by_batch[0][0] - by_batch[0][2]).max() > 1e-2  # same prompt, another seed: another image


@pytest.mark.parametrize("scheduler", SAMPLERS)
def test_image_i_does_not_depend_on_the_number_of_tasks(pipe_and_tasks, scheduler):
    pipe, (a, b) = pipe_and_tasks
    settings = SamplingSettings(scheduler, steps=4, seed=3, batch_size=2)
    kw = dict(height=16, width=16, output_type="np")
    for tasks in ({"a": a}, {"a": a, "b": b}, {"b": b, "base": None, "a": a}):
        got = generate_multitask(pipe, tasks, PROMPTS, settings, **kw)
        for name, handle in tasks.items():
            np.testing.assert_allclose(got[name], alone(pipe, [a, b], handle, settings), rtol=0, atol=ATOL)
    assert np.abs(got["a"] - got["b"]).max() > 1e-2  # the tasks differ


def test_a_stochastic_sampler_draws_noise_per_image(pipe_and_tasks):
    pipe, (a, b) = pipe_and_tasks
    settings = SamplingSettings("Euler a", steps=4, seed=3, batch_size=5)
    euler_a = alone(pipe, [a, b], a, settings)
    assert np.abs(euler_a - alone(pipe, [a, b], a, settings.replace(scheduler="Euler"))).max() > 1e-2


WORKER = """
import os, sys
from pathlib import Path
from restune_diffusion.evaluation.images import generate_by_index
from restune_diffusion.models import build_pipeline, build_tiny_sd
from restune_diffusion.sampling import PROTOCOL_STRIDE, SamplingSettings

scheduler, out = sys.argv[1], Path(sys.argv[2])
settings = SamplingSettings(scheduler, steps=4, seed=3, batch_size=2, seed_stride=PROTOCOL_STRIDE)
rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
generate_by_index(build_pipeline(build_tiny_sd(0)), {prompts!r}, out, settings, resolution=16, rank=rank,
                  world=world, progress=False)
"""


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", SAMPLERS)
def test_image_i_does_not_depend_on_the_number_of_processes(tmp_path, scheduler):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(prompts=PROMPTS))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    runs = {"one": [sys.executable, str(script)],
            "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(script)]}
    for name, cmd in runs.items():
        done = subprocess.run([*cmd, scheduler, str(tmp_path / name)], env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    for i in range(len(PROMPTS)):
        one, two = (np.asarray(Image.open(tmp_path / n / f"{i:05d}.png"), dtype=np.int16) for n in runs)
        assert np.abs(one - two).max() <= 1, i  # same seed, same batch blocks: the same image


def test_one_argparse_group_gives_the_settings():
    p = argparse.ArgumentParser()
    add_sampling_args(p)
    args = p.parse_args(["--scheduler", "Euler a", "--steps", "7", "--negative_prompt", "blur", "--seed", "2"])
    assert sampling_settings(args) == SamplingSettings("Euler a", steps=7, negative_prompt="blur", seed=2)
    table = argparse.ArgumentParser()
    flags = {"steps": "--eval_steps"}
    add_sampling_args(table, flags=flags, omit=("seed",), sweep=True)
    args = table.parse_args(["--eval_steps", "3", "--guidance_scale", "2", "4"])
    assert args.guidance_scale == [2.0, 4.0] and not hasattr(args, "seed")
    settings = sampling_settings(args, flags=flags, guidance_scale=4.0, seed=9)
    assert (settings.steps, settings.guidance_scale, settings.seed) == (3, 4.0, 9)


@pytest.mark.parametrize("field, value, message", [
    ("steps", 0, "--steps: expected a positive integer, got 0"),
    ("batch_size", 1.5, "--batch_size: expected a positive integer"),
    ("seed", -1, "--seed: expected an integer >= 0"),
    ("scheduler", "LMS", "unknown sampler 'LMS'"),
])
def test_bad_settings_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingSettings(**{field: value})


def test_validation_style_sampling_keeps_the_live_dtypes_and_decodes_in_fp32():
    sd = build_tiny_sd(0)
    for module in (sd.unet, sd.vae, sd.text_encoder):
        module.to(torch.bfloat16)
    images = generate(build_pipeline(sd), ["a red circle"], SamplingSettings(steps=2), height=16, width=16,
                      amp_dtype=torch.bfloat16, fp32_decode=True)[0]
    assert images[0].size == (16, 16)
    assert sd.unet.dtype == sd.vae.dtype == sd.text_encoder.dtype == torch.bfloat16
