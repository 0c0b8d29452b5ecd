"""On-disk latent cache: equals the in-memory one, reused across runs, shared out between processes."""

import pytest
import torch
from test_data import write_imagefolder

from restune_diffusion import data
from restune_diffusion.latent_cache import build_latent_cache, open_latent_cache


@pytest.fixture
def vae(tiny_sd):
    return tiny_sd.vae


def count_encodes(vae, monkeypatch):
    calls = []
    original = vae.encode

    def encode(x):
        calls.append(x.shape[0])
        return original(x)

    monkeypatch.setattr(vae, "encode", encode)
    return calls


def test_disk_cache_equals_memory_cache_for_both_flips(tmp_path, vae):
    write_imagefolder(tmp_path / "d", ["a", "b", "c"])
    ds = data.load_dataset("imagefolder", tmp_path / "d", resolution=16, random_flip=True, seed=5)
    memory = data.cache_latents(ds, vae, batch_size=2)
    folder = build_latent_cache(ds, vae, tmp_path / "cache", batch_size=2, dtype=torch.float32)
    disk = open_latent_cache(folder, ds, vae.config.scaling_factor)
    assert (folder / "latents.bin").stat().st_size == 3 * 2 * 8 * 8 * 8 * 4  # (images, flips, 2C, h, w) fp32
    for i in range(3):
        for flip in (0, 1):
            torch.testing.assert_close(disk.parameters[i, flip], memory.parameters[i, flip])
        assert torch.equal(disk[i]["latents"], memory[i]["latents"]) and disk[i]["caption"] == memory[i]["caption"]


def test_second_run_reuses_the_cache_and_processes_split_the_work(tmp_path, vae, monkeypatch):
    write_imagefolder(tmp_path / "d", ["a", "b", "c", "d", "e"])
    ds = data.load_dataset("imagefolder", tmp_path / "d", resolution=16)
    calls = count_encodes(vae, monkeypatch)
    first = build_latent_cache(ds, vae, tmp_path / "cache", rank=0, num_processes=2, batch_size=8)
    assert sum(calls) == 3  # images 0, 2, 4
    with pytest.raises(ValueError, match=r"latent cache incomplete \(3 of 5"):
        open_latent_cache(first, ds, 0.18)
    assert build_latent_cache(ds, vae, tmp_path / "cache", rank=1, num_processes=2) == first
    assert sum(calls) == 5
    build_latent_cache(ds, vae, tmp_path / "cache")  # a later run: nothing left to encode
    assert sum(calls) == 5
    assert len(open_latent_cache(first, ds, 0.18)) == 5
    other = data.load_dataset("imagefolder", tmp_path / "d", resolution=8)
    assert build_latent_cache(other, vae, tmp_path / "cache") != first  # resolution is part of the key


def test_random_crop_is_refused(tmp_path, vae):
    write_imagefolder(tmp_path / "d", ["a"])
    ds = data.load_dataset("imagefolder", tmp_path / "d", resolution=16, center_crop=False)
    with pytest.raises(ValueError, match="random crop cannot be cached"):
        build_latent_cache(ds, vae, tmp_path / "cache")


def test_loader_workers_read_the_file(tmp_path, vae):
    write_imagefolder(tmp_path / "d", ["a", "b", "c", "d"])
    ds = data.load_dataset("imagefolder", tmp_path / "d", resolution=16)
    cached = open_latent_cache(build_latent_cache(ds, vae, tmp_path / "cache"), ds, 0.18)
    serial = [b["latents"] for b in data.build_dataloader(cached, 2, shuffle=False)]
    parallel = [b["latents"] for b in data.build_dataloader(cached, 2, shuffle=False, num_workers=1)]
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel)) and serial[0].shape == (2, 4, 8, 8)
