"""The README's Python snippets run as written, on the tiny model (paths swapped for test files)."""

import re
from pathlib import Path

import torch
from PIL import Image

import restune_diffusion as rd
from restune_diffusion.attach import attached_sets

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def snippet(marker: str) -> str:
    found = [s for s in SNIPPETS if marker in s]
    assert len(found) == 1, f"README: expected one python block with {marker!r}, found {len(found)}"
    return found[0]


def tuner_file(path: Path, config, seed: int) -> Path:
    sd = rd.build_tiny_sd(0)
    handle = rd.attach(sd.unet, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return rd.save_tuners(path, handle)


def run(code: str, replace: dict[str, str], namespace: dict) -> dict:
    for old, new in replace.items():
        assert old in code, f"README snippet no longer contains {old!r}"
        code = code.replace(old, new)
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace


def test_readme_has_the_python_snippets_this_file_runs():
    assert len(SNIPPETS) == 5  # the fifth, the example metric file, runs in test_metrics.py


def test_load_pipeline_snippet_generates_with_the_tuners(tmp_path):
    path = tuner_file(tmp_path / "t.safetensors", {"type": "res_adapter", "dim": 4}, seed=0)
    ns = run(snippet('tuners="out/res_tuning/tuners.safetensors")'), {"/models/stable-diffusion-v1-5": "tiny-random",
                                           "out/res_tuning/tuners.safetensors": str(path),
                                           "num_inference_steps=50": "num_inference_steps=2"}, {})
    assert isinstance(ns["image"], Image.Image)
    assert "default" in ns["pipe"].tuner_handles


def test_attach_snippet_trains_saves_and_detaches(tmp_path, unet):
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    saved = tmp_path / "tuners.safetensors"
    ns = run(snippet("handle = attach(unet"), {"configs/res_tuning.yaml": str(ROOT / "configs/res_tuning.yaml"),
                                              '"tuners.safetensors"': repr(str(saved))}, {"unet": unet})
    assert ns["optimizer"].param_groups[0]["params"]
    assert saved.is_file() and not attached_sets(unet)
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    handle = rd.load_tuners(unet, saved)
    assert sum(p.numel() for p in handle.trainable_parameters()) > 0


def test_multitask_snippet_gives_one_image_list_per_task(tmp_path):
    bypass = {"type": "bypass"}
    dogs = tuner_file(tmp_path / "dogs.safetensors", bypass, seed=1)
    cars = tuner_file(tmp_path / "cars.safetensors", bypass, seed=2)
    pipe = rd.load_pipeline("tiny-random", device="cpu")
    ns = run(snippet("generate_multitask"), {"out/dogs/tuners.safetensors": str(dogs),
                                             "out/cars/tuners.safetensors": str(cars),
                                             "steps=50": "steps=2"}, {"pipe": pipe})
    images = ns["images"]
    assert list(images) == ["dogs", "cars"]
    assert all(len(v) == 1 and isinstance(v[0], Image.Image) for v in images.values())


def test_mixing_snippet_loads_at_weights_fuses_reweights_and_unfuses(tmp_path):
    lora = tuner_file(tmp_path / "lora.safetensors", {"type": "lora", "rank": 4}, seed=1)
    res = tuner_file(tmp_path / "res.safetensors", {"type": "res_adapter", "dim": 4}, seed=2)
    ns = run(snippet("set_tuner_weights(pipe"), {"/models/stable-diffusion-v1-5": "tiny-random",
                                                "out/lora/tuners.safetensors": str(lora),
                                                "out/res_tuning/tuners.safetensors": str(res),
                                                "num_inference_steps=50": "num_inference_steps=2"}, {})
    handles = ns["pipe"].tuner_handles
    assert isinstance(ns["image"], Image.Image)
    assert {n: h.scale for n, h in handles.items()} == {"lora": 0.5, "res": 1.0}
    assert not handles["lora"].fused


def test_every_config_in_the_readme_table_exists_and_every_config_is_in_it():
    named = set(re.findall(r"^\| `(\w+)\.yaml` \|", README, flags=re.M))
    assert named == {p.stem for p in (ROOT / "configs").glob("*.yaml")}
