"""Model loading and the tiny model."""

import shutil

import pytest
import torch

from conftest import run_unet
from restune_diffusion.models import build_pipeline, build_tiny_sd, build_unet, load_model, load_sd15, save_components


def test_tiny_model_has_the_sd15_pattern(tiny_sd):
    unet = tiny_sd.unet
    names = {n for n, _ in unet.named_modules()}
    assert {"mid_block.attentions.0", "down_blocks.0.attentions.0", "up_blocks.1.attentions.0"} <= names
    assert len(set(unet.config.block_out_channels)) >= 2
    assert tiny_sd.tokenizer.model_max_length == 77
    ids = tiny_sd.tokenizer("a red circle on a blue background").input_ids
    assert len(ids) == 2 + 7  # one token per word of the tiny vocabulary, plus start/end


def test_tiny_model_is_seeded():
    a, b = build_tiny_sd(3), build_tiny_sd(3)
    assert all(torch.equal(x, y) for x, y in zip(a.unet.parameters(), b.unet.parameters()))


def test_load_sd15_round_trips_a_saved_folder(tiny_sd, tmp_path, unet_inputs):
    save_components(tiny_sd, tmp_path / "sd")
    loaded = load_sd15(tmp_path / "sd")
    torch.testing.assert_close(run_unet(loaded.unet, unet_inputs), run_unet(tiny_sd.unet, unet_inputs),
                               rtol=0, atol=1e-5)
    assert loaded.tokenizer("a red circle").input_ids == tiny_sd.tokenizer("a red circle").input_ids
    assert load_model(str(tmp_path / "sd")).name == str(tmp_path / "sd")


def test_incomplete_folder_names_what_is_missing(tiny_sd, tmp_path):
    save_components(tiny_sd, tmp_path / "sd")
    shutil.rmtree(tmp_path / "sd" / "unet")
    with pytest.raises(FileNotFoundError, match="missing unet/"):
        load_sd15(tmp_path / "sd")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_sd15(tmp_path / "nowhere")


def test_sd15_architecture_on_meta_has_859_5_m_parameters():
    assert sum(p.numel() for p in build_unet("sd15", device="meta").parameters()) == 859_520_964


def test_pipeline_from_components_generates(tiny_sd):
    pipe = build_pipeline(tiny_sd)
    image = pipe("a red circle", num_inference_steps=2, height=32, width=32,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_tiny_is_the_shipped_pretrained_base_and_tiny_random_the_seeded_one():
    from restune_diffusion.models import TINY_ASSETS

    pretrained, random = load_model("tiny"), load_model("tiny-random")
    assert pretrained.name == "tiny" and random.name == "tiny-random"
    assert pretrained.unet.config.sample_size == 8 and pretrained.vae.config.sample_size == 32
    assert pretrained.tokenizer.model_max_length == 16  # captions are 9 tokens: 77 would only cost time
    assert all(torch.equal(a, b) for a, b in zip(random.unet.parameters(), build_tiny_sd(0).unet.parameters()))
    assert all((TINY_ASSETS / s).is_dir() for s in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"))


def test_tiny_without_its_files_says_how_to_make_them(tmp_path, monkeypatch):
    import restune_diffusion.models as models

    monkeypatch.setattr(models, "TINY_ASSETS", tmp_path / "tiny_sd")
    with pytest.raises(FileNotFoundError, match=r"tiny_sd: the pretrained tiny base is missing .*tools/pretrain_tiny"):
        load_model("tiny")
