"""Generation from tuner files: the Python API and the generate.py CLI."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import restune_diffusion as rd
from restune_diffusion.sampling import make_grid

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tuner_file(tmp_path):
    sd = rd.build_tiny_sd(0)
    handle = rd.attach(sd.unet, {"type": "res_adapter", "dim": 4})
    torch.manual_seed(0)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return rd.save_tuners(tmp_path / "tuners.safetensors", handle)


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def test_load_pipeline_attaches_the_file_and_changes_images(tuner_file):
    pipe = rd.load_pipeline("tiny-random", tuners=tuner_file, device="cpu")
    handle = pipe.tuner_handles["default"]
    tuned = rd.generate_images(pipe, ["a red circle"], steps=2, height=32, width=32, progress=False)[0]
    with handle.disabled():
        base = rd.generate_images(pipe, ["a red circle"], steps=2, height=32, width=32, progress=False)[0]
    assert tuned.size == (32, 32)
    assert np.abs(pixels(tuned) - pixels(base)).max() > 0


def test_images_depend_on_their_index_not_on_the_batch_size(tuner_file):
    pipe = rd.load_pipeline("tiny-random", tuners=tuner_file, device="cpu")
    kw = dict(steps=2, height=32, width=32, progress=False)
    batched = rd.generate_images(pipe, ["a red circle", "a blue square", "a red circle"], batch_size=3, **kw)
    single = rd.generate_images(pipe, ["a red circle", "a blue square", "a red circle"], batch_size=1, **kw)
    for a, b in zip(batched, single):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1  # batched kernels round differently by one level at most
    assert np.abs(pixels(batched[0]) - pixels(batched[2])).max() > 0  # same prompt, other seed


def test_generate_cli_writes_images_and_grid(tuner_file, tmp_path):
    out = tmp_path / "samples"
    cmd = [sys.executable, str(ROOT / "generate.py"), "--pretrained_model_name_or_path", "tiny-random", "--tuners",
           str(tuner_file), "--prompt", "a red circle", "--prompt", "a blue star", "--num_images", "2",
           "--steps", "2", "--height", "32", "--width", "32", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "00002.png", "00003.png", "grid.png",
                                                   "index.json"]
    assert Image.open(out / "grid.png").size == (64, 64)


def test_generate_cli_without_prompt_says_how(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "--prompt" in result.stderr


def test_make_grid_places_images_in_rows():
    images = [Image.new("RGB", (4, 4), (i * 40, 0, 0)) for i in range(5)]
    grid = make_grid(images, cols=3)
    assert grid.size == (12, 8)
    assert grid.getpixel((4 * 1 + 1, 1)) == (40, 0, 0) and grid.getpixel((1, 5)) == (120, 0, 0)


def test_generate_cli_with_several_bypass_files_writes_one_folder_per_task(tmp_path):
    paths = []
    for task, seed in (("cats", 1), ("dogs", 2)):
        sd = rd.build_tiny_sd(0)
        handle = rd.attach(sd.unet, {"type": "bypass"}, name=task)
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in handle.trainable_parameters():
                p.add_(torch.randn_like(p) * 0.2)
        paths.append(rd.save_tuners(tmp_path / f"{task}.safetensors", handle))
    out = tmp_path / "samples"
    _generate_main()(["--pretrained_model_name_or_path", "tiny-random", "--tuners", str(paths[0]), "--tuners",
                      str(paths[1]), "--prompt", "a red circle", "--num_images", "2", "--steps", "2", "--height",
                      "32", "--width", "32", "--out", str(out)])  # generate.py's main, in this process
    assert sorted(p.name for p in out.iterdir()) == ["cats", "dogs"]
    cats, dogs = (Image.open(out / task / "00000.png") for task in ("cats", "dogs"))
    assert sorted(p.name for p in (out / "cats").iterdir())[-2:] == ["grid.png", "index.json"]
    assert np.abs(pixels(cats) - pixels(dogs)).max() > 0  # each task's own bypass


def test_generate_cli_refuses_a_task_file_with_tuners_besides_its_bypass(tmp_path, monkeypatch):
    sd = rd.build_tiny_sd(0)
    handle = rd.attach(sd.unet, [{"type": "bypass"}, {"type": "lora", "rank": 2}], name="mixed")
    mixed = rd.save_tuners(tmp_path / "mixed.safetensors", handle)
    plain = _bypass_file(tmp_path / "plain.safetensors", seed=1)
    monkeypatch.setattr("restune_diffusion.generate.load_model", None)  # refused before any model loads
    with pytest.raises(ValueError, match=rf"^{mixed}: holds lora tuners besides its bypass") as err:
        _generate_main()(["--tuners", str(mixed), "--tuners", str(plain), "--prompt", "x", "--out", str(tmp_path)])
    assert "\n" not in str(err.value)  # one line


# ---------------------------------------------------------------------------------------------------------------------
# several --tuners: names, and every flag meaning what it means for one file (issue 12 items 5, 6)
def _generate_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_cli", ROOT / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _bypass_file(path, seed: int):
    sd = rd.build_tiny_sd(0)
    handle = rd.attach(sd.unet, {"type": "bypass"})
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.2)
    path.parent.mkdir(parents=True, exist_ok=True)
    return rd.save_tuners(path, handle)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two training runs' outputs, as train_t2i.py leaves them: out/<run>/tuners.safetensors."""
    root = tmp_path_factory.mktemp("runs")
    return [_bypass_file(root / "out" / run / "tuners.safetensors", seed) for run, seed in (("dogs", 1), ("cars", 2))]


def _images(folder, n):
    return [pixels(Image.open(folder / f"{i:05d}.png")) for i in range(n)]


def _close(a, b, levels=2):
    return all(np.abs(x - y).max() <= levels for x, y in zip(a, b, strict=True))


def test_readme_multitask_command_with_two_tuners_safetensors_names_tasks_by_run_folder(two_runs, tmp_path):
    out = tmp_path / "samples"
    _generate_main()(["--pretrained_model_name_or_path", "tiny-random", "--tuners", str(two_runs[0]), "--tuners",
                      str(two_runs[1]), "--prompt", "a photo of a dog", "--num_images", "1", "--steps", "2", "--out",
                      str(out)])  # the README's command, through generate.py's main in this process
    assert sorted(p.name for p in out.iterdir()) == ["cars", "dogs"]
    assert Image.open(out / "dogs" / "00000.png").size == (32, 32)  # the tiny model's native size, as the demo


def test_task_names_flag_names_the_folders_and_is_checked(two_runs, tmp_path):
    from restune_diffusion.generate import task_names

    assert task_names(two_runs) == ["dogs", "cars"]
    assert task_names(["a/x.safetensors", "b/y.safetensors"]) == ["x", "y"]
    assert task_names(two_runs, ["a", "b"]) == ["a", "b"]
    with pytest.raises(ValueError, match="--task_names"):
        task_names(two_runs, ["a", "a"])
    with pytest.raises(ValueError, match="--task_names"):
        task_names(["r/tuners.safetensors", "r/../r/tuners.safetensors"])
    _generate_main()(["--pretrained_model_name_or_path", "tiny-random", "--tuners", str(two_runs[0]), "--tuners",
                      str(two_runs[1]), "--task_names", "one",
                      "--task_names", "two", "--prompt", "x", "--num_images", "1", "--steps", "2",
                      "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]


@pytest.fixture(scope="module")
def multitask_runs(two_runs, tmp_path_factory):
    """generate.py outputs with both files and with one, over the flags of the single-tuner path."""
    root = tmp_path_factory.mktemp("flags")
    main = _generate_main()
    common = ["--prompt", "a red circle", "--prompt", "a blue square", "--num_images", "2", "--steps", "2",
              "--seed", "5", "--pretrained_model_name_or_path", "tiny-random"]
    both = ["--tuners", str(two_runs[0]), "--tuners", str(two_runs[1])]
    runs = {
        "multi_b4": both + ["--batch_size", "4"],
        "multi_b1": both + ["--batch_size", "1"],
        "multi_neg": both + ["--negative_prompt", "a green star"],
        "multi_scale0": both + ["--scale", "0"],
        "multi_euler_a": both + ["--scheduler", "Euler a", "--steps", "4", "--batch_size", "3"],
        "single_dogs_euler_a": ["--tuners", str(two_runs[0]), "--scheduler", "Euler a", "--steps", "4"],
        "single_dogs_4": ["--tuners", str(two_runs[0]), "--steps", "4"],
        "single_dogs": ["--tuners", str(two_runs[0]), "--batch_size", "1"],
        "single_dogs_neg": ["--tuners", str(two_runs[0]), "--negative_prompt", "a green star"],
        "single_base": [],
    }
    for name, flags in runs.items():
        main(common + flags + ["--out", str(root / name)])
    return root


def test_multitask_images_equal_single_tuner_images_and_ignore_batch_size(multitask_runs):
    r = multitask_runs
    single = _images(r / "single_dogs", 4)
    assert _close(_images(r / "multi_b4" / "dogs", 4), single)
    assert _close(_images(r / "multi_b1" / "dogs", 4), single)
    assert not _close(_images(r / "multi_b4" / "cars", 4), single)  # the other task's own bypass


def test_multitask_images_equal_single_tuner_images_with_a_stochastic_sampler(multitask_runs):
    """"Euler a" draws noise at every step: image i draws it from its own generator whatever the tasks beside it
    and the batch (before issue 24, several files drew one stream per batch, unlike one file)."""
    r = multitask_runs
    single = _images(r / "single_dogs_euler_a", 4)
    assert _close(_images(r / "multi_euler_a" / "dogs", 4), single)
    assert not _close(single, _images(r / "single_dogs_4", 4))  # the sampler matters


def test_multitask_negative_prompt_means_what_it_means_for_one_file(multitask_runs):
    r = multitask_runs
    negative = _images(r / "multi_neg" / "dogs", 4)
    assert _close(negative, _images(r / "single_dogs_neg", 4))
    assert not _close(negative, _images(r / "multi_b4" / "dogs", 4))


def test_multitask_scale_zero_gives_the_base_model_for_every_task(multitask_runs):
    r = multitask_runs
    base = _images(r / "single_base", 4)
    assert _close(_images(r / "multi_scale0" / "dogs", 4), base)
    assert _close(_images(r / "multi_scale0" / "cars", 4), base)


# ---------------------------------------------------------------------------------------------------------------------
# defaults follow the model; non-finite latents never become silent black images (issue 12.8, 13.8)
def test_default_size_is_the_models_native_resolution():
    from restune_diffusion.models import native_resolution
    from restune_diffusion.sampling import image_size

    pipe = rd.load_pipeline("tiny-random", device="cpu")
    assert native_resolution(pipe) == 32 == pipe.vae.config.sample_size  # what the demo trains at, not 16
    assert image_size(pipe, None, None) == (32, 32)
    assert image_size(pipe, 48, None) == (48, 32)


def test_non_finite_latents_raise_a_named_error_instead_of_black_images(tuner_file):
    from restune_diffusion.sampling import NonFiniteImagesError

    pipe = rd.load_pipeline("tiny-random", tuners=tuner_file, device="cpu")
    with torch.no_grad():
        next(iter(pipe.tuner_handles["default"].trainable_parameters())).fill_(float("nan"))
    with pytest.raises(NonFiniteImagesError, match=r"2 of 2 images .*NaN/Inf.*\[0, 1\]"):
        rd.generate_images(pipe, ["a", "b"], steps=2, progress=False)


# ---------------------------------------------------------------------------------------------------------------------
# samplers by name, metadata, continued numbering (issue 17, generate.py)
def test_samplers_by_the_names_users_know():
    from diffusers import (
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    from restune_diffusion.samplers import make_scheduler, sampler_label

    config = rd.build_tiny_sd(0).noise_scheduler.config
    assert type(make_scheduler("Euler", config)) is EulerDiscreteScheduler
    assert type(make_scheduler("Euler a", config)) is EulerAncestralDiscreteScheduler
    assert type(make_scheduler("unipc", config)) is UniPCMultistepScheduler
    dpm = make_scheduler("DPM++ 2M Karras", config)
    assert type(dpm) is DPMSolverMultistepScheduler and dpm.config.use_karras_sigmas
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.solver_order == 2
    assert make_scheduler("euler", config, karras=True).config.use_karras_sigmas
    assert sampler_label("dpm++-2m_karras") == "DPM++ 2M Karras"
    with pytest.raises(ValueError, match="no Karras sigmas"):
        make_scheduler("Euler a Karras", config)
    with pytest.raises(ValueError, match=r"unknown sampler 'LMS'.*Euler a"):
        make_scheduler("LMS", config)


def test_png_metadata_index_json_and_a_rerun_continues_numbering(tuner_file, tmp_path):
    out = tmp_path / "samples"
    args = ["--pretrained_model_name_or_path", "tiny-random", "--tuners", str(tuner_file), "--prompt", "a red circle",
            "--num_images", "2", "--steps", "2",
            "--scheduler", "Euler a", "--seed", "7", "--negative_prompt", "blur", "--out", str(out)]
    _generate_main()(args)
    _generate_main()(args)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00000.png", "00001.png", "00002.png", "00003.png", "grid.png", "grid_00002.png", "index.json"]
    assert np.array_equal(pixels(Image.open(out / "00000.png")), pixels(Image.open(out / "00002.png")))  # seeded
    assert not np.array_equal(pixels(Image.open(out / "00000.png")), pixels(Image.open(out / "00001.png")))
    text = Image.open(out / "00001.png").text
    assert text["parameters"].startswith("a red circle\nNegative prompt: blur\nSteps: 2, Sampler: Euler a, "
                                         "CFG scale: 7.5, Seed: 8, Size: 32x32")
    meta = json.loads(text["restune"])
    assert (meta["seed"], meta["sampler"], meta["tuners"]) == (8, "Euler a", str(tuner_file))
    index = json.loads((out / "index.json").read_text())
    assert [e["file"] for e in index] == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert index[3]["seed"] == 8 and len(index[0]["tuners_sha256"]) == 64
