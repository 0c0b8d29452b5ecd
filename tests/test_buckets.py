"""Aspect-ratio buckets (restune_diffusion/data/buckets.py; kohya's --enable_bucket): the table, which bucket an image
goes to and what it loses, one bucket per batch (on N processes too), the order as a function of (seed, epoch), and
training runs with buckets: resume, the latent cache, 2 processes, kill -9."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_data import write_image
from test_train import REPO, assert_same_run, cli_args, crash_after_checkpoint, fresh_accelerate_state  # noqa: F401 (autouse)

from restune_diffusion import data
from restune_diffusion import train as T
from restune_diffusion.data import BucketSpec, BucketTable, kept_fraction

# (w, h) of a mixed-aspect folder at resolution 32 (buckets 16..64 px in steps of 8): portrait, landscape, square and
# extreme images at a bucket's exact aspect ratio, and three off-aspect ones
EXACT = [(24, 40), (48, 80), (36, 60), (40, 24), (60, 36), (80, 48), (32, 32), (50, 50), (64, 64), (64, 16),
         (128, 32), (16, 64)]
OFF = [(30, 45), (70, 40), (45, 30)]


def write_mixed(root, sizes=EXACT + OFF):
    rows = []
    for i, size in enumerate(sizes):
        write_image(root / f"{i:02d}.png", size=size, seed=i)
        rows.append(json.dumps({"file_name": f"{i:02d}.png", "text": f"a shape {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def bucketed(root, **options):
    return data.load_dataset("imagefolder", root, resolution=32, enable_bucket=True, scan_cache=False,
                             progress=False, **options)


def test_the_bucket_table_at_512_is_kohyas():
    table = BucketTable(BucketSpec(512))  # kohya's defaults: 256..1024 in steps of 64, budget 512 x 512
    assert table.spec.as_dict() == {"resolution": 512, "min_bucket_reso": 256, "max_bucket_reso": 1024,
                                    "bucket_reso_steps": 64}
    tall = [(256, 1024), (256, 960), (256, 896), (256, 832), (320, 768), (320, 704), (384, 640), (448, 576)]
    assert table.sizes == sorted({*tall, (512, 512), *((h, w) for w, h in tall)})
    assert all(w * h <= 512 * 512 and w % 64 == 0 == h % 64 for w, h in table.sizes)


@pytest.mark.parametrize("options,message", [
    ({"bucket_reso_steps": 12}, "--bucket_reso_steps must be a positive multiple of 8"),
    ({"min_bucket_reso": 20}, "--min_bucket_reso must be a positive multiple of --bucket_reso_steps 8"),
    ({"max_bucket_reso": 24}, r"--resolution 32 must lie within --min_bucket_reso 16 \.\. --max_bucket_reso 24"),
])
def test_bucket_flags_are_checked_before_the_scan(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        bucketed(tmp_path / "nothing-here", **options)


def test_each_image_goes_to_its_nearest_bucket_and_loses_only_the_rounding(tmp_path):
    ds = bucketed(write_mixed(tmp_path / "mixed"))
    table = ds.buckets
    for i, sample in enumerate(ds.samples):
        bucket = ds.target_size(i)
        assert ds[i]["pixel_values"].shape == (3, bucket[1], bucket[0])
        best = max(kept_fraction(sample.size, b) for b in table.sizes)
        assert kept_fraction(sample.size, bucket) == best  # no other bucket keeps more
        if sample.size in EXACT:  # the bucket's aspect ratio: at most the 1 px of the floor is cropped
            assert tuple(w - b for w, b in zip(data.cover_size(sample.size, bucket), bucket)) in ((0, 0), (1, 0),
                                                                                                 (0, 1))
    assert {ds.target_size(i) for i in range(len(EXACT))} == {(24, 40), (40, 24), (32, 32), (64, 16), (16, 64)}
    centre = data.load_dataset("imagefolder", tmp_path / "mixed", resolution=32, scan_cache=False, progress=False)
    kept = np.mean([kept_fraction(s.size, ds.target_size(i)) for i, s in enumerate(ds.samples)])
    square = np.mean([kept_fraction(s.size, (32, 32)) for s in centre.samples])
    assert kept > 0.97 and square < 0.75  # what buckets keep vs a centre crop


def test_sizes_come_from_the_scan_cache_without_decoding(tmp_path, monkeypatch):
    root = write_mixed(tmp_path / "mixed")
    first = data.load_dataset("imagefolder", root, resolution=32, enable_bucket=True, progress=False)

    def decoded(*_args, **_kwargs):
        raise AssertionError("an image was read to find its size")

    monkeypatch.setattr(data.scan, "image_problem", decoded)
    again = data.load_dataset("imagefolder", root, resolution=32, enable_bucket=True, progress=False)
    assert again.report.num_decoded == 0
    assert [s.size for s in again.samples] == [s.size for s in first.samples] == EXACT + OFF


def test_an_exif_rotated_photo_is_bucketed_as_it_is_seen(tmp_path):
    root = tmp_path / "photo"
    write_image(root / "turned.jpg", size=(40, 24), seed=1, fmt="JPEG")
    with Image.open(root / "turned.jpg") as im:
        exif = im.getexif()
        exif[0x0112] = 6  # rotate 90: shown 24 wide, 40 tall
        im.save(root / "turned.jpg", exif=exif)
    (root / "metadata.jsonl").write_text('{"file_name": "turned.jpg", "text": "a photo"}\n')
    for mode in ("decode", "header"):
        ds = bucketed(root, scan_mode=mode)
        assert ds.samples[0].size == (24, 40) == data.load_rgb(root / "turned.jpg").size
        assert ds.target_size(0) == (24, 40) and ds[0]["pixel_values"].shape == (3, 40, 24)


def test_every_batch_holds_one_bucket_and_an_epoch_covers_every_item_once(tmp_path):
    ds = bucketed(write_mixed(tmp_path / "mixed"))
    loader = data.build_dataloader(ds, 2, seed=3)
    for epoch in (0, 1):
        loader.batch_sampler.sampler.set_epoch(epoch)
        batches = list(loader.batch_sampler)
        assert sorted(i for b in batches for i in b) == list(range(len(ds)))
        assert all(len({ds.target_size(i) for i in b}) == 1 for b in batches)
        assert len(batches) == len(loader.batch_sampler)
    shapes = [tuple(batch["pixel_values"].shape[2:]) for batch in loader]  # collated: one size per batch
    assert len(set(shapes)) == 5


def test_the_order_is_a_function_of_seed_and_epoch(tmp_path):
    ds = bucketed(write_mixed(tmp_path / "mixed"))

    def order(seed, epoch):
        sampler = data.build_dataloader(ds, 2, seed=seed).batch_sampler
        sampler.sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 1) == order(0, 1)
    assert order(0, 1) != order(0, 2) and order(0, 1) != order(1, 1)


@pytest.mark.parametrize("num_processes", [2, 3])
def test_on_n_processes_every_step_is_one_bucket_on_every_process(tmp_path, num_processes):
    from accelerate.data_loader import BatchSamplerShard

    ds = bucketed(write_mixed(tmp_path / "mixed"))
    sampler = data.build_dataloader(ds, 2, seed=0, num_processes=num_processes).batch_sampler
    shards = [list(BatchSamplerShard(sampler, num_processes, p)) for p in range(num_processes)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == len(sampler) // num_processes
    for step in zip(*shards):
        assert len({ds.target_size(i) for batch in step for i in batch}) == 1  # one bucket across processes
        assert len({len(batch) for batch in step}) == 1
    seen = [i for shard in shards for batch in shard for i in batch]
    assert set(seen) == set(range(len(ds)))
    assert len(seen) - len(ds) <= (num_processes - 1) * len(sampler.groups())  # padding within each bucket


# ---------------------------------------------------------------------------------------------------------------------
# training runs
BUCKET_FLAGS = ("--enable_bucket", "--gradient_accumulation_steps", "2", "--validation_split", "0.2", "--use_ema",
                "--validation_steps", "2")


def test_a_bucketed_run_writes_the_table_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    root = write_mixed(tmp_path / "mixed")
    common = ["--max_train_steps", "6", "--checkpointing_steps", "2", *BUCKET_FLAGS]
    T.train(T.parse_args(cli_args(tmp_path / "a", root, *common)))
    out = capsys.readouterr().out
    assert "aspect-ratio buckets (pixel budget 32x32, sides 16..64 in steps of 8): 5 in use" in out
    table = json.loads((tmp_path / "a" / "out" / data.BUCKET_FILE).read_text())
    assert sum(r["images"] for r in table["buckets"]) == len(EXACT + OFF) and table["bucket_reso_steps"] == 8
    assert any(r.get("val_loss") is not None for r in T.read_log(tmp_path / "a" / "out"))

    argv = cli_args(tmp_path / "b", root, *common)
    crash_after_checkpoint(monkeypatch, argv, 4)
    T.train(T.parse_args(argv + ["--resume_from_checkpoint", "latest"]))
    assert_same_run(tmp_path / "a" / "out", tmp_path / "b" / "out", steps=6)
    ema_a, ema_b = (load_file(tmp_path / p / "out" / "tuners_ema.safetensors") for p in "ab")
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


def test_a_change_of_bucket_settings_is_refused_on_resume(tmp_path, capsys):
    root = write_mixed(tmp_path / "mixed")
    argv = cli_args(tmp_path, root, "--max_train_steps", "2", "--checkpointing_steps", "2", "--enable_bucket")
    T.train(T.parse_args(argv))
    assert T.main(argv + ["--max_train_steps", "4", "--bucket_reso_steps", "16", "--min_bucket_reso", "16",
                          "--resume_from_checkpoint", "latest"]) == 2
    assert "bucket_reso_steps" in capsys.readouterr().err


def test_the_latent_cache_with_buckets_equals_no_cache(tmp_path):
    root = write_mixed(tmp_path / "mixed")
    losses = {}
    for name, extra in (("plain", []), ("cached", ["--cache_latents"])):
        T.train(T.parse_args(cli_args(tmp_path / name, root, "--max_train_steps", "4", "--checkpointing_steps", "0",
                                      "--enable_bucket", *extra)))
        losses[name] = [r["loss"] for r in T.read_log(tmp_path / name / "out")]
    (folder,) = (root / ".restune_cache" / "latents").iterdir()
    files = sorted(p.name for p in folder.glob("latents-*.bin"))
    assert files == ["latents-16x64.bin", "latents-24x40.bin", "latents-32x32.bin", "latents-40x24.bin",
                     "latents-64x16.bin"]
    torch.testing.assert_close(torch.tensor(losses["cached"]), torch.tensor(losses["plain"]), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_torchrun_two_processes_train_one_bucket_per_step_and_resume_exactly(tmp_path):
    root = write_mixed(tmp_path / "mixed")
    probe = tmp_path / "probe.py"  # each rank logs the shape of every batch it trains on
    probe.write_text(
        "import os, sys\n"
        "import restune_diffusion.train as T\n"
        "import restune_diffusion.train.loop as LOOP\n"
        "step = LOOP.micro_step\n"
        "def logged(run, batch, epoch, index):\n"
        "    with open(sys.argv[1] + os.environ['RANK'], 'a') as f:\n"
        "        f.write(f\"{epoch} {index} {tuple(batch['pixel_values'].shape)}\\n\")\n"
        "    return step(run, batch, epoch, index)\n"
        "LOOP.micro_step = logged\n"
        "sys.exit(T.main(sys.argv[2:]))\n")
    argv = cli_args(tmp_path, root, "--max_train_steps", "6", "--checkpointing_steps", "2", "--enable_bucket")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(probe),
                str(tmp_path / "shapes-")]
    done = subprocess.run([*torchrun, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [(tmp_path / f"shapes-{r}").read_text().splitlines() for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 6 and ranks[0] == ranks[1]  # same bucket, same batch size, every step
    out = tmp_path / "out"
    straight, log = load_file(out / T.TUNERS_FILE), T.read_log(out)
    for name in ("checkpoint-4", "checkpoint-6"):
        subprocess.run(["rm", "-r", str(out / name)], check=True)
    resumed = subprocess.run([*torchrun, *argv, "--resume_from_checkpoint", "latest"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = load_file(out / T.TUNERS_FILE)
    assert all(torch.equal(straight[k], again[k]) for k in straight) and T.read_log(out) == log


@pytest.mark.slow
def test_kill_9_then_resume_with_buckets_equals_the_uninterrupted_run(tmp_path):
    root = write_mixed(tmp_path / "mixed")
    common = ["--max_train_steps", "10", "--checkpointing_steps", "2", "--enable_bucket", "--cache_latents"]
    script = str(REPO / "train_t2i.py")
    straight = subprocess.run([sys.executable, script, *cli_args(tmp_path / "a", root, *common)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    argv = cli_args(tmp_path / "b", root, *common)
    out = tmp_path / "b" / "out"
    proc = subprocess.Popen([sys.executable, script, *argv], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (out / "checkpoint-4" / T.STATE_FILE).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / T.TUNERS_FILE).exists()
    resumed = subprocess.run([sys.executable, script, *argv, "--resume_from_checkpoint", "latest"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(tmp_path / "a" / "out", out, steps=10)
