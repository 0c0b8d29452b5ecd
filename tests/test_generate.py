"""Generation from tuner files: the Python API and the generate.py CLI."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import restune_diffusion as rd
from restune_diffusion.generate import make_grid

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
    pipe = rd.load_pipeline("tiny", tuners=tuner_file, device="cpu")
    handle = pipe.tuner_handles["default"]
    tuned = rd.generate_images(pipe, ["a red circle"], steps=2, height=32, width=32, progress=False)[0]
    with handle.disabled():
        base = rd.generate_images(pipe, ["a red circle"], steps=2, height=32, width=32, progress=False)[0]
    assert tuned.size == (32, 32)
    assert np.abs(pixels(tuned) - pixels(base)).max() > 0


def test_images_depend_on_their_index_not_on_the_batch_size(tuner_file):
    pipe = rd.load_pipeline("tiny", tuners=tuner_file, device="cpu")
    kw = dict(steps=2, height=32, width=32, progress=False)
    batched = rd.generate_images(pipe, ["a red circle", "a blue square", "a red circle"], batch_size=3, **kw)
    single = rd.generate_images(pipe, ["a red circle", "a blue square", "a red circle"], batch_size=1, **kw)
    for a, b in zip(batched, single):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1  # batched kernels round differently by one level at most
    assert np.abs(pixels(batched[0]) - pixels(batched[2])).max() > 0  # same prompt, other seed


def test_generate_cli_writes_images_and_grid(tuner_file, tmp_path):
    out = tmp_path / "samples"
    cmd = [sys.executable, str(ROOT / "generate.py"), "--pretrained_model_name_or_path", "tiny", "--tuners",
           str(tuner_file), "--prompt", "a red circle", "--prompt", "a blue star", "--num_images", "2",
           "--steps", "2", "--height", "32", "--width", "32", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "00002.png", "00003.png", "grid.png"]
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
    cmd = [sys.executable, str(ROOT / "generate.py"), "--tuners", str(paths[0]), "--tuners", str(paths[1]),
           "--prompt", "a red circle", "--num_images", "2", "--steps", "2", "--height", "32", "--width", "32",
           "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["cats", "dogs"]
    cats, dogs = (Image.open(out / task / "00000.png") for task in ("cats", "dogs"))
    assert sorted(p.name for p in (out / "cats").iterdir())[-1] == "grid.png"
    assert np.abs(pixels(cats) - pixels(dogs)).max() > 0  # each task's own bypass
