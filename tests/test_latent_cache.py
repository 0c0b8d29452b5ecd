"""On-disk latent cache: the VAE posteriors of both mirrors, reused across runs, shared out between processes, and in
training runs the losses of a run without it."""

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file
from test_data import write_coco, write_imagefolder
from test_train import cli_args, fresh_accelerate_state  # noqa: F401 (autouse)

from restune_diffusion import data
from restune_diffusion import train as T
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


def test_the_cache_holds_each_posterior_and_its_mirror_and_items_follow_the_flips(tmp_path, vae):
    write_imagefolder(tmp_path / "d", ["a", "b", "c"])
    ds = data.load_dataset("imagefolder", tmp_path / "d", resolution=16, random_flip=True, seed=5)
    folder = build_latent_cache(ds, vae, tmp_path / "cache", batch_size=2, dtype=torch.float32)
    disk = open_latent_cache(folder, ds)
    assert (folder / "latents.bin").stat().st_size == 3 * 2 * 8 * 8 * 8 * 4  # (images, flips, 2C, h, w) fp32
    x = data.ImageTransform(16)(data.load_rgb(tmp_path / "d" / "1.png"))[None]
    with torch.no_grad():
        both = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist.parameters  # (2, 2C, h, w): image, mirror
    for flip in (0, 1):
        torch.testing.assert_close(disk.parameters[1, flip], both[flip], atol=1e-5, rtol=1e-4)
    picked = set()
    for epoch in range(8):
        disk.set_epoch(epoch)
        item = disk[1]
        assert item["caption"] == "b" and torch.equal(item["latent_parameters"], disk.parameters[1, int(ds.flip(1))])
        picked.add(ds.flip(1))
    assert picked == {True, False}


def test_second_run_reuses_the_cache_and_processes_split_the_work(tmp_path, vae, monkeypatch):
    write_imagefolder(tmp_path / "d", ["a", "b", "c", "d", "e"])
    ds = data.load_dataset("imagefolder", tmp_path / "d", resolution=16)
    calls = count_encodes(vae, monkeypatch)
    first = build_latent_cache(ds, vae, tmp_path / "cache", rank=0, num_processes=2, batch_size=8)
    assert sum(calls) == 3  # images 0, 2, 4
    with pytest.raises(ValueError, match=r"latent cache incomplete \(3 of 5"):
        open_latent_cache(first, ds)
    assert build_latent_cache(ds, vae, tmp_path / "cache", rank=1, num_processes=2) == first
    assert sum(calls) == 5
    build_latent_cache(ds, vae, tmp_path / "cache")  # a later run: nothing left to encode
    assert sum(calls) == 5
    assert len(open_latent_cache(first, ds)) == 5
    other = data.load_dataset("imagefolder", tmp_path / "d", resolution=8)
    assert build_latent_cache(other, vae, tmp_path / "cache") != first  # resolution is part of the key


def test_each_image_is_encoded_once_when_it_has_several_samples(tmp_path, vae, monkeypatch):
    write_coco(tmp_path / "coco")
    ds = data.load_dataset("coco2017", tmp_path / "coco", resolution=16, caption_mode="all")
    calls = count_encodes(vae, monkeypatch)
    cached = open_latent_cache(build_latent_cache(ds, vae, tmp_path / "cache", batch_size=4), ds)
    assert sum(calls) == 3 and len(cached) == 8  # 3 images, 8 captions
    assert data.collate_fn([cached[0], cached[1]])["latent_parameters"].shape == (2, 8, 8, 8)


def test_the_vae_fingerprint_does_not_depend_on_the_hash_seed(vae):
    from diffusers.configuration_utils import FrozenDict

    from restune_diffusion.latent_cache import vae_fingerprint

    before = vae_fingerprint(vae)
    order = vae.config["_use_default_values"]  # a list made from a set: its order follows PYTHONHASHSEED
    vae._internal_dict = FrozenDict({**vae.config, "_use_default_values": list(reversed(order))})
    assert len(order) > 1 and vae_fingerprint(vae) == before


def test_random_crop_is_refused(tmp_path, vae):
    write_imagefolder(tmp_path / "d", ["a"])
    ds = data.load_dataset("imagefolder", tmp_path / "d", resolution=16, center_crop=False)
    with pytest.raises(ValueError, match="random crop cannot be cached"):
        build_latent_cache(ds, vae, tmp_path / "cache")


def test_loader_workers_read_the_file(tmp_path, vae):
    write_imagefolder(tmp_path / "d", ["a", "b", "c", "d"])
    ds = data.load_dataset("imagefolder", tmp_path / "d", resolution=16)
    cached = open_latent_cache(build_latent_cache(ds, vae, tmp_path / "cache"), ds)
    serial = [b["latent_parameters"] for b in data.build_dataloader(cached, 2, shuffle=False)]
    parallel = [b["latent_parameters"] for b in data.build_dataloader(cached, 2, shuffle=False, num_workers=1)]
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel)) and serial[0].shape == (2, 8, 8, 8)


# ---------------------------------------------------------------------------------------------------------------------
# in training runs (train_t2i.py --cache_latents)
@pytest.fixture
def shapes(tmp_path):
    return data.make_demo_dataset(tmp_path / "shapes", num_images=8, resolution=32)


def train_run(tmp_path, data_dir, name, *extra):
    T.train(T.parse_args(cli_args(tmp_path / name, data_dir, "--max_train_steps", "4", "--checkpointing_steps", "0",
                                  *extra)))
    out = tmp_path / name / "out"
    return [r["loss"] for r in T.read_log(out)], load_file(out / T.TUNERS_FILE)


def count_class_encodes(monkeypatch):
    calls, original = [], AutoencoderKL.encode

    def encode(self, x, *args, **kwargs):
        calls.append(x.shape[0])
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", encode)
    return calls


def test_a_run_writes_the_cache_a_second_run_reuses_it_and_both_equal_a_run_without(tmp_path, shapes, monkeypatch):
    calls = count_class_encodes(monkeypatch)
    plain_losses, plain = train_run(tmp_path, shapes, "plain")  # center crop and random flips (cli_args)
    assert sum(calls) == 8  # 4 steps of batch 2, encoded in the step
    first_losses, first = train_run(tmp_path, shapes, "first", "--cache_latents")
    folders = list((shapes / ".restune_cache" / "latents").iterdir())
    assert len(folders) == 1 and sum(calls) == 8 + 2 * 8  # each image and its mirror, once; none in the steps
    second_losses, second = train_run(tmp_path, shapes, "second", "--cache_latents")
    assert sum(calls) == 24  # nothing encoded: the cache was reused
    assert second_losses == first_losses and all(torch.equal(first[k], second[k]) for k in first)
    # the cached posterior is sampled with the draws an encode takes: the numbers of a run without the cache
    torch.testing.assert_close(torch.tensor(first_losses), torch.tensor(plain_losses), rtol=1e-5, atol=1e-6)
    for k in plain:
        torch.testing.assert_close(first[k], plain[k], rtol=1e-4, atol=1e-6)


def test_latent_cache_dir_and_random_crop_in_a_run(tmp_path, shapes, capsys):
    train_run(tmp_path, shapes, "a", "--cache_latents", "--latent_cache_dir", str(tmp_path / "latents"))
    assert len(list((tmp_path / "latents").iterdir())) == 1 and not (shapes / ".restune_cache" / "latents").exists()
    assert T.main(cli_args(tmp_path / "b", shapes, "--cache_latents", "--no-center_crop")) == 2
    assert "--cache_latents: random crop cannot be cached" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_processes_share_the_encoding_and_match_the_uncached_run(tmp_path, shapes):
    import subprocess
    import sys

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train_t2i.py"]
    losses = {}
    for name, extra in (("cached", ["--cache_latents"]), ("plain", [])):
        argv = cli_args(tmp_path / name, shapes, "--max_train_steps", "3", "--checkpointing_steps", "0", *extra)
        done = subprocess.run([*torchrun, *argv], cwd=T.__file__.rsplit("/restune_diffusion/", 1)[0],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        losses[name] = [r["loss"] for r in T.read_log(tmp_path / name / "out")]
    (folder,) = (shapes / ".restune_cache" / "latents").iterdir()
    assert (folder / "done.bin").read_bytes() == b"\x01" * 8  # both ranks' shares written
    torch.testing.assert_close(torch.tensor(losses["cached"]), torch.tensor(losses["plain"]), rtol=1e-5, atol=1e-6)


def _mapped(name: str) -> bool:
    with open("/proc/self/maps") as f:
        return any(line.rstrip().endswith(name) for line in f)


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
def test_the_cache_file_is_never_mapped_so_resident_memory_cannot_grow_with_it(tmp_path, vae, monkeypatch):
    write_imagefolder(tmp_path / "d", ["a", "b", "c", "d", "e"])
    ds = data.load_dataset("imagefolder", tmp_path / "d", resolution=16)
    seen = []
    original = vae.encode

    def encode(x):  # between batches: the rows of the batch before are written
        seen.append(_mapped("latents.bin"))
        return original(x)

    monkeypatch.setattr(vae, "encode", encode)
    folder = build_latent_cache(ds, vae, tmp_path / "cache", batch_size=2)
    assert seen == [False, False, False]  # before: np.memmap r+, whose written pages stay resident
    cached = open_latent_cache(folder, ds)
    for i in range(len(cached)):
        cached[i]
    assert not _mapped("latents.bin")
