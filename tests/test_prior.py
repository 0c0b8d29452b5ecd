"""Learning a concept without forgetting the rest (issue 25; restune_diffusion/train/prior.py, the paired data set,
the loss terms of train/loss.py, setup.TunedUNet's frozen prediction) on the tiny model, CPU.

Default suite: the paired data set and its collate; prior preservation's loss by hand; base-prediction preservation
per tuner type (exactly zero at init where the init is the identity, the frozen prediction the base's, the gradient
on tuner tensors only; loha, lokr and oft slow-marked as in test_train), one backbone pass for a bypass; class images
drawn once, resumed after a crash midway, the same whatever the batch; changed class settings and bad flags refused
in one line; a run with both remedies, cached latents and accumulation, crashed and resumed, equals the straight run;
the table passes the flags through. Slow: a real kill -9 during generation; joint bypasses equal each alone; two
processes; the tiny world's pretraining prompts kept better with prior preservation than without.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_train import (  # noqa: F401 (fixtures)
    REPO,
    SMALL,
    TYPES,
    assert_same_run,
    cli_args,
    crash_after_checkpoint,
    data_dir,
    fresh_accelerate_state,
    no_models,
    randomize,
)

from restune_diffusion import train as T
from restune_diffusion.attach import attach
from restune_diffusion.data import CaptionDataset, ImageTransform, PairedDataset, Sample, build_dataloader
from restune_diffusion.models import build_tiny_sd
from restune_diffusion.train import loss as L
from restune_diffusion.train import options as OPT
from restune_diffusion.train import prior as P
from restune_diffusion.train import resume as R
from restune_diffusion.train.setup import TunedUNet

NOT_IDENTITY_AT_INIT = ("res_prefix", "prefix", "prompt")  # λ = 0.5 / bound tokens change the softmax at init
PROMPTS = ["a red circle on a white background", "a blue square on a black background"]


def prior_flags(class_dir: Path, *extra: str) -> list[str]:
    return ["--with_prior_preservation", "--class_data_dir", str(class_dir), *[x for p in PROMPTS for x in
            ("--class_prompt", p)], "--num_class_images", "3", "--class_sampling_steps", "2", *extra]


def class_args(folder: Path, **changes) -> argparse.Namespace:
    values = {"class_data_dir": str(folder), "class_prompt": list(PROMPTS), "num_class_images": 6,
              "sample_batch_size": 1, "class_scheduler": "ddim", "class_sampling_steps": 2,
              "class_guidance_scale": 7.5, "resolution": 32, "pretrained_model_name_or_path": "tiny-random"}
    return argparse.Namespace(**{**values, **changes})


def step_inputs(rows=2, class_rows=0, preserve=0, seed=0) -> L.StepInputs:
    g = torch.Generator().manual_seed(seed)
    latents, text = torch.randn(rows, 4, 8, 8, generator=g), torch.randn(rows, 77, 32, generator=g)
    noise, t = torch.randn(rows, 4, 8, 8, generator=g), torch.randint(0, 1000, (rows,), generator=g)
    states = torch.randn(preserve, 77, 32, generator=g) if preserve else None
    return L.StepInputs(latents, text, noise, t, class_rows, states)


# ---------------------------------------------------------------------------------------------------------------------
# the paired data set
def test_item_i_pairs_instance_i_with_class_item_i_mod_n_and_a_batch_is_2b_rows(tmp_path, data_dir):  # noqa: F811
    transform = ImageTransform(32)
    instance = CaptionDataset([Sample(p, ["instance"]) for p in sorted(data_dir.glob("*.png"))[:5]], transform)
    classes = CaptionDataset([Sample(p, [f"class {i}"]) for i, p in enumerate(sorted(data_dir.glob("*.png"))[5:8])],
                             transform)
    paired = PairedDataset(instance, classes)
    assert len(paired) == 5 and [paired[i]["class"]["caption"] for i in range(5)] == \
        ["class 0", "class 1", "class 2", "class 0", "class 1"]
    paired.set_epoch(1)  # the cycle goes on: over the epochs every class image is used
    assert [paired.class_index(i) for i in range(5)] == [2, 0, 1, 2, 0] and classes.epoch == instance.epoch == 1
    paired.set_epoch(0)
    batch = next(iter(build_dataloader(paired, 2, shuffle=False)))
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["class_rows"] == 2
    assert batch["captions"] == ["instance", "instance", "class 0", "class 1"]
    torch.testing.assert_close(batch["pixel_values"][2], classes[0]["pixel_values"])


# ---------------------------------------------------------------------------------------------------------------------
# the loss terms
@pytest.mark.parametrize("gamma", [None, 5.0])
def test_prior_preservation_loss_is_the_instance_half_plus_weight_times_the_class_half(gamma):
    sd = build_tiny_sd()
    randomize(attach(sd.unet, SMALL["lora"]))
    inputs, ns, w = step_inputs(rows=4, class_rows=2), sd.noise_scheduler, 0.7
    got = L.task_losses(sd.unet, ns, inputs, [L.LossTerms(gamma, prior_loss_weight=w)])[0]
    noisy = ns.add_noise(inputs.latents, inputs.noise, inputs.timesteps)
    pred = sd.unet(noisy, inputs.timesteps, inputs.text_states).sample
    per_row = F.mse_loss(pred, inputs.noise, reduction="none").mean(dim=(1, 2, 3))  # ε-prediction: target = noise
    if gamma is not None:
        per_row = per_row * L.min_snr_weights(ns, inputs.timesteps, gamma)
    torch.testing.assert_close(got, per_row[:2].mean() + w * per_row[2:].mean())


def preserved(model, ns, inputs, weight):
    return L.task_losses(model, ns, inputs, [L.LossTerms(preservation_weight=weight)])[0]


@pytest.mark.parametrize("name", TYPES)
def test_preservation_is_zero_at_init_its_frozen_prediction_the_base_and_its_gradient_on_tuners_only(name):
    sd, base = build_tiny_sd(), build_tiny_sd().unet
    handle = attach(sd.unet, SMALL[name])
    handle.keep_base_weights()  # what build_models does under --preservation_weight (a full set needs it)
    model, inputs, ns = TunedUNet(sd.unet, [handle], shared=False), step_inputs(preserve=2), sd.noise_scheduler
    if name not in NOT_IDENTITY_AT_INIT:  # the tuners add exactly zero: so does the term
        assert torch.equal(preserved(model, ns, inputs, 3.0), preserved(model, ns, inputs, 0.0))
    randomize(handle)  # the tuned model differs from the base: the term and its gradient are not zero
    tuned = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    sample, timesteps, states, p = L.model_inputs(ns, inputs)
    pred, frozen = model(sample, timesteps, states, return_dict=False, frozen_rows=p)
    with torch.no_grad():
        torch.testing.assert_close(frozen, base(sample[2:], timesteps[2:], states[2:]).sample, rtol=0, atol=1e-5)
    assert not frozen.requires_grad and all(torch.equal(v, tuned[k]) for k, v in sd.unet.state_dict().items())
    F.mse_loss(pred[2:], frozen).backward()
    trainable = {id(p) for p in handle.trainable_parameters()}
    assert all(p.grad is None for p in sd.unet.parameters() if id(p) not in trainable)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in handle.trainable_parameters())


@pytest.mark.parametrize("name,passes", [("bypass", 1), ("lora", 3)])
def test_a_bypass_takes_the_frozen_prediction_from_its_own_backbone_pass(name, passes):
    sd = build_tiny_sd()
    handle = attach(sd.unet, SMALL[name])
    calls = []
    sd.unet.mid_block.register_forward_hook(lambda *_: calls.append(1))
    inputs = step_inputs(preserve=2)
    preserved(TunedUNet(sd.unet, [handle], shared=False), sd.noise_scheduler, inputs, 1.0)
    assert len(calls) == passes  # the bypass: one; bound tuners: the frozen pass, then the rows and the kept rows


# ---------------------------------------------------------------------------------------------------------------------
# class images
def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def test_class_images_resume_after_a_crash_midway_and_do_not_depend_on_the_batch(tmp_path, monkeypatch):
    sd = build_tiny_sd()
    handle = attach(sd.unet, SMALL["lora"])
    randomize(handle)  # drawn with the tuners off: the same images as the bare base
    folder, args = tmp_path / "classes", class_args(tmp_path / "classes")
    write, written = P.atomic_write, []

    def crash_after_two(path, fn):
        if len(written) == 2:
            (path.parent / f".{path.name}.tmp99999999").write_bytes(b"half a png")  # a kill -9 mid-write
            raise KeyboardInterrupt
        written.append(path.name)
        return write(path, fn)

    monkeypatch.setattr(P, "atomic_write", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        P.make_class_images(args, sd, [handle], "base0", torch.float32, say=lambda _: None)
    monkeypatch.setattr(P, "atomic_write", write)
    first = {name: (folder / name).stat().st_mtime_ns for name in written}
    assert P.make_class_images(args, sd, [handle], "base0", torch.float32, say=lambda _: None) == 4
    assert {name: (folder / name).stat().st_mtime_ns for name in written} == first  # not drawn again
    assert not list(folder.glob(".*tmp*"))
    assert P.make_class_images(args, sd, [handle], "base0", torch.float32, say=lambda _: None) == 0
    record = json.loads((folder / P.RECORD).read_text())
    assert record["images"] == {f"class-{i:05d}.png": PROMPTS[i % 2] for i in range(6)}
    assert [s.captions[0] for s in P.class_samples(args)] == [PROMPTS[i % 2] for i in range(6)]

    other = tmp_path / "batched"  # an uninterrupted run, 4 images per call, no tuners at all
    P.make_class_images(class_args(other, sample_batch_size=4), build_tiny_sd(), [], "base0", torch.float32,
                        say=lambda _: None)
    for i in range(6):
        assert np.abs(pixels(folder / f"class-{i:05d}.png") - pixels(other / f"class-{i:05d}.png")).max() <= 1


def test_the_users_own_class_images_count_and_take_the_prompts_in_turn(tmp_path):
    folder = tmp_path / "classes"
    folder.mkdir()
    for name in ("b.png", "a.jpg"):
        Image.new("RGB", (40, 32), "red").save(folder / name)
    args = class_args(folder, num_class_images=3)
    assert P.make_class_images(args, build_tiny_sd(), [], "base0", torch.float32, say=lambda _: None) == 1
    assert [(s.path.name, s.captions) for s in P.class_samples(args)] == [
        ("a.jpg", [PROMPTS[0]]), ("b.png", [PROMPTS[1]]), ("class-00000.png", [PROMPTS[0]])]


def test_another_base_model_for_the_class_images_is_one_line_naming_the_folder(tmp_path):
    args = class_args(tmp_path / "classes", num_class_images=1)
    P.make_class_images(args, build_tiny_sd(), [], "base0", torch.float32, say=lambda _: None)
    with pytest.raises(ValueError, match=f"{tmp_path / 'classes'}: its class images were made with "
                                         "base_fingerprint 'base0', this run asks for 'base1'"):
        P.make_class_images(args, build_tiny_sd(), [], "base1", torch.float32, say=lambda _: None)


@pytest.mark.parametrize("flag,value,field", [("--class_sampling_steps", "3", "sampler.steps 2, this run asks for 3"),
                                              ("--class_prompt", "a cat", "class_prompts")])
def test_other_class_prompts_or_sampler_are_refused_before_loading(tmp_path, data_dir, no_models, capsys, flag,  # noqa: F811
                                                                  value, field):
    folder = tmp_path / "classes"
    args = class_args(folder, class_sampling_steps=2)
    folder.mkdir()
    (folder / P.RECORD).write_text(json.dumps({"version": P.RECORD_VERSION, **P.wanted(args), "images": {}}))
    argv = cli_args(tmp_path, data_dir, *prior_flags(folder))
    argv[argv.index(flag) + 1] = value
    assert T.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{folder}: its class images were made with {field}" in err[0] and flag in err[0]


@pytest.mark.parametrize("extra,message", [
    (["--with_prior_preservation", "--class_prompt", "a dog"], "--with_prior_preservation needs --class_data_dir"),
    (["--with_prior_preservation", "--class_data_dir", "c"], "--with_prior_preservation needs --class_prompt"),
    (["--with_prior_preservation", "--class_data_dir", "c", "--class_prompt", "a dog", "--enable_bucket"],
     "--with_prior_preservation with --enable_bucket"),
    (["--preservation_weight", "0.5"], "--preservation_weight 0.5 needs prompts"),
    (["--preservation_weight", "0.5", "--preservation_prompts", "missing.txt"], "missing.txt: cannot read"),
    (["--prior_loss_weight", "-1"], "--prior_loss_weight must be a number >= 0"),
    (["--num_class_images", "0"], "--num_class_images must be a positive integer"),
])
def test_bad_preservation_flags_are_one_line(tmp_path, data_dir, no_models, capsys, extra, message):  # noqa: F811
    assert T.main(cli_args(tmp_path, data_dir, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


# ---------------------------------------------------------------------------------------------------------------------
# runs
@pytest.mark.slow  # over 5 s on 2 cores: the default suite stays under 5 minutes
def test_both_remedies_with_cached_latents_and_accumulation_resume_exactly(tmp_path, data_dir, monkeypatch,  # noqa: F811
                                                                           capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    common = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--gradient_accumulation_steps", "2",
              "--preservation_prompts", str(prompts), "--preservation_weight", "2", "--prior_loss_weight", "0.5",
              "--cache_latents", *prior_flags(tmp_path / "classes")]
    T.train(T.parse_args(cli_args(tmp_path / "a", data_dir, *common)))
    assert "drawing 3 class images" in capsys.readouterr().out
    assert len(list((tmp_path / "classes" / ".restune_cache" / "latents").iterdir())) == 1  # their latents cached
    argv = cli_args(tmp_path / "b", data_dir, *common)
    crash_after_checkpoint(monkeypatch, argv, 2)
    assert "(0 drawn now)" in capsys.readouterr().out  # drawn once, reused
    T.train(T.parse_args(argv + ["--resume_from_checkpoint", "latest"]))
    assert_same_run(tmp_path / "a" / "out", tmp_path / "b" / "out", steps=4)


def test_prior_preservation_cannot_be_switched_on_at_a_resume(tmp_path, data_dir, no_models, capsys):  # noqa: F811
    saved = {"with_prior_preservation": False, "preservation_weight": 0.0}
    with pytest.raises(ValueError, match="with_prior_preservation False -> True .*class rows"):
        R.compare_settings(tmp_path, saved, {**saved, "with_prior_preservation": True})
    notes = R.compare_settings(tmp_path, saved, {**saved, "preservation_weight": 0.5})
    assert notes == ["preservation_weight: 0.0 -> 0.5 (applied from the resumed step: the loss uses it (the frozen "
                     "base's prediction is computed while it is > 0))"]


def test_the_table_passes_the_preservation_flags_to_every_row(tmp_path):
    from restune_diffusion import table

    rows = table.plan_rows(["lora", "res_tuning"], ["--pretrained_model_name_or_path", "tiny-random", "--dataset",
                                                    "demo", "--preservation_weight", "0.5", "--class_prompt", "a dog"],
                           tmp_path)
    assert [(r.args.preservation_weight, r.args.class_prompt) for r in rows] == [(0.5, ["a dog"])] * 2


# ---------------------------------------------------------------------------------------------------------------------
# slow
@pytest.mark.slow
def test_kill_9_while_drawing_class_images_then_a_rerun_draws_only_the_missing(tmp_path, data_dir):  # noqa: F811
    folder = tmp_path / "classes"
    argv = cli_args(tmp_path, data_dir, "--max_train_steps", "1", "--checkpointing_steps", "0",
                    *prior_flags(folder, "--sample_batch_size", "1", "--class_sampling_steps", "25"))
    argv[argv.index("--num_class_images") + 1] = "8"
    proc = subprocess.Popen([sys.executable, str(REPO / "train_t2i.py"), *argv], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(list(folder.glob("class-*.png"))) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    kept = {p.name: p.stat().st_mtime_ns for p in folder.glob("class-*.png")}
    assert 2 <= len(kept) < 8
    done = subprocess.run([sys.executable, str(REPO / "train_t2i.py"), *argv], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"drawing {8 - len(kept)} class images" in done.stdout
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("class-*.png") if p.name in kept} == kept
    assert len(list(folder.glob("class-*.png"))) == 8 and not list(folder.glob(".*tmp*"))


@pytest.mark.slow
def test_joint_bypasses_with_both_remedies_equal_each_trained_alone(tmp_path, data_dir):  # noqa: F811
    from test_joint import assert_same_tensors, joint_argv, reset_accelerate

    names = ("wide", "narrow")
    steps = ["--max_train_steps", "3", "--checkpointing_steps", "0", "--preservation_weight", "1",
             *prior_flags(tmp_path / "classes")]
    reset_accelerate()
    T.train(T.parse_args(joint_argv(tmp_path / "joint", data_dir, *steps, names=names)))
    for name in names:
        reset_accelerate()
        T.train(T.parse_args(joint_argv(tmp_path / name, data_dir, *steps, names=(name,))))
        joint = tmp_path / "joint" / "out" / name
        assert_same_tensors(joint / T.TUNERS_FILE, tmp_path / name / "out" / T.TUNERS_FILE)
        assert [r["loss"] for r in T.read_log(joint)] == pytest.approx(
            [r["loss"] for r in T.read_log(tmp_path / name / "out")], abs=1e-6)


@pytest.mark.slow
def test_two_processes_draw_the_class_images_once_and_train_with_both_remedies(tmp_path, data_dir):  # noqa: F811
    argv = cli_args(tmp_path, data_dir, "--max_train_steps", "2", "--checkpointing_steps", "0",
                    "--preservation_weight", "1", *prior_flags(tmp_path / "classes"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(REPO / "train_t2i.py")]
    done = subprocess.run([*torchrun, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("drawing 3 class images") == 1 and "x 2 processes" in done.stdout
    assert [r["step"] for r in T.read_log(tmp_path / "out")] == [1, 2]


@pytest.mark.slow
def test_in_the_tiny_world_both_remedies_keep_the_pretraining_prompts_better_than_none(tmp_path):
    """LoRA at a high learning rate on the star forgets the pretraining prompts within 100 steps; the same run with
    prior preservation (class images of those prompts) or base-prediction preservation keeps more of them, judged by
    the world's protocol on the same prompts and noise (measured here: 0.57 none, 0.97 prior, 0.78 prediction)."""
    from test_joint import reset_accelerate

    from restune_diffusion.models import load_model
    from restune_diffusion.weights import load_tuners
    from restune_diffusion.world import protocol
    from restune_diffusion.world.datasets import concept_train_set, write_imagefolder
    from restune_diffusion.world.report import load_judges
    from restune_diffusion.world.scene import kept_grid

    data = write_imagefolder(tmp_path / "star", concept_train_set("star"))
    prompts = [a.caption for a in kept_grid()]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    judge, _ = load_judges()
    asked = kept_grid(2)

    def kept(name: str, *remedy: str) -> float:
        reset_accelerate()
        out = tmp_path / name
        T.train(T.parse_args(["--config", str(REPO / "configs" / "tiny" / "lora.yaml"), "--no-world_report",
                              "--data_dir", str(data), "--output_dir", str(out), "--learning_rate", "1e-2",
                              "--max_train_steps", "100", "--lr_warmup_steps", "0", "--lr_scheduler", "constant",
                              "--num_validation_images", "0", *remedy]))
        sd = load_model("tiny")
        load_tuners(sd.unet, out / T.TUNERS_FILE)
        return float(protocol.hits(judge, protocol.generate(sd, [a.caption for a in asked], seed=0), asked)["all"]
                     .mean())

    none = kept("none")
    prior = kept("prior", "--with_prior_preservation", "--class_data_dir", str(tmp_path / "classes"),
                 *[x for p in prompts for x in ("--class_prompt", p)], "--num_class_images", "30",
                 "--class_sampling_steps", str(protocol.SAMPLING_STEPS), "--class_guidance_scale",
                 str(protocol.GUIDANCE_SCALE))
    prediction = kept("prediction", "--preservation_prompts", str(tmp_path / "prompts.txt"),
                      "--preservation_weight", "1")
    assert none < 0.8 and prior > none + 0.2 and prediction > none + 0.1, (none, prior, prediction)


@pytest.mark.slow
def test_the_forgetting_bench_quick_mode_runs_end_to_end(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench" / "forgetting_tiny.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "forgetting-tiny.json").read_text())
    for method in ("lora", "res_tuning"):
        assert [(p["remedy"], p["weight"]) for p in result["methods"][method]["points"]] == [
            ("none", 0.0), ("prior", 1.0), ("prediction", 1.0), ("scale", 0.5)]
    record = json.loads((tmp_path / "forgetting-inputs" / "class_images" / P.RECORD).read_text())
    assert len(record["images"]) == 4 and record["sampler"]["steps"] == 20
    logs = [p.read_text() for p in (tmp_path / "quality-tiny-runs").glob("*/train.log")]
    assert sum("class images from" in text for text in logs) == 8  # the prior runs: 2 methods x 2 concepts x 2 seeds
    assert sum("base-prediction preservation (weight 1)" in text for text in logs) == 8


def test_the_forgetting_bench_reads_the_lrs_the_quality_sweep_chose(tmp_path):
    """`--methods tiny_demo` needs only default-job-sweep.json; another method needs quality-tiny-sweep.json (written
    when the quality bench's sweep ends) or the finished quality-tiny.json."""
    sys.path.insert(0, str(REPO))
    from bench import forgetting_tiny as F_

    (tmp_path / "default-job-sweep.json").write_text(json.dumps({"chosen_lr": 0.01}))
    assert F_.chosen_lrs(tmp_path, [F_.DEFAULT_JOB]) == {F_.DEFAULT_JOB: 0.01}
    with pytest.raises(FileNotFoundError, match="quality-tiny-sweep.json: run bench/quality_tiny.py --stage sweep"):
        F_.chosen_lrs(tmp_path, [F_.DEFAULT_JOB, "lora"])
    (tmp_path / "quality-tiny.json").write_text(json.dumps({"rows": {"lora": {"lr": 0.003}}}))
    assert F_.chosen_lrs(tmp_path, [F_.DEFAULT_JOB, "lora"]) == {F_.DEFAULT_JOB: 0.01, "lora": 0.003}
    with pytest.raises(ValueError, match=r"no chosen learning rate for \['adapter'\]"):
        F_.chosen_lrs(tmp_path, ["adapter"])
    # the sweep's own file, written as soon as the sweep ends, is read before the finished table
    from bench import quality_tiny as Q

    score = lambda a: {"all": a, "shape": a, "n": 528}  # noqa: E731
    Q.write_sweep(tmp_path, {"lora": {0.001: score(0.2), 0.003: score(0.5), 0.01: score(0.4)}}, ["star", "heart"], 400)
    Q.write_sweep(tmp_path, {"adapter": {0.1: score(0.1), 0.3: score(0.3)}}, ["star", "heart"], 400)
    written = json.loads((tmp_path / "quality-tiny-sweep.json").read_text())["methods"]
    assert written["lora"]["note"] == "interior" and "end" in written["adapter"]["note"]
    assert F_.chosen_lrs(tmp_path, ["lora", "adapter"]) == {"lora": 0.003, "adapter": 0.3}


def test_world_runs_train_each_run_with_exactly_its_own_remedy(tmp_path):
    """configs/tiny_demo.yaml ships a remedy; the benches' runs turn a config's remedy off and add their own, and a
    config's remedy keys are not part of a run's key (runs measured before the default job had one keep theirs)."""
    sys.path.insert(0, str(REPO))
    from bench import world_runs as W

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle on a white background\n")
    job = lambda extra: {"spec": {"method": W.DEFAULT_JOB, "lr": 0.01, "seed": 3, "steps": 40,  # noqa: E731
                                  "extra": list(extra)}, "data": str(tmp_path)}
    none = T.parse_args(W.train_argv(job(()), tmp_path / "o"))
    assert none.preservation_weight == 0 and not none.with_prior_preservation and none.learning_rate == 0.01
    assert OPT.preservation_prompts(none) is None and none.max_train_steps == 40 and none.lr_warmup_steps == 10
    pred = T.parse_args(W.train_argv(job(("--preservation_prompts", str(prompts), "--preservation_weight", "2")),
                                     tmp_path / "o"))
    assert pred.preservation_weight == 2 and OPT.preservation_prompts(pred) == ["a red circle on a white background"]
    text = W.config_text(W.DEFAULT_JOB)
    assert "preservation" not in text and "class_prompt" not in text and "res_adapter" in text
    assert T.parse_args([]).preservation_weight > 0  # the default job itself keeps its remedy


def test_the_remedy_table_shows_each_remedys_best_weight_and_its_training_cost():
    sys.path.insert(0, str(REPO))
    from bench import forgetting_tiny as F_

    def pt(remedy, weight, drawn, kept, cpu):
        v = lambda x: {"mean": x, "ci95": [x, x]}  # noqa: E731
        return {"remedy": remedy, "weight": weight, "concept_drawn": v(drawn), "all_right": v(drawn), "kept": v(kept),
                "heldout_combos": v(kept), "train_cpu_seconds": cpu}

    points = [pt("none", 0.0, 0.4, 0.1, 100.0), pt("prior", 0.5, 0.3, 0.5, 150.0), pt("prior", 2.0, 0.1, 0.95, 150.0),
              pt("prediction", 0.5, 0.35, 0.9, 200.0), pt("prediction", 2.0, 0.05, 0.99, 200.0),
              pt("scale", 0.5, 0.0, 0.9, 100.0), pt("scale", 0.75, 0.2, 0.6, 100.0)]
    info = {"lr": 0.01, "ceiling": 0.8, "points": points}
    info["best"] = F_.best_corner(points, info["ceiling"])
    row = F_.remedy_table({"methods": {"lora": info}}).splitlines()[2]
    # distances to the corner: prior 0.5 0.80 < prior 2 0.88; prediction 0.5 0.58 < 2 0.94; scale 0.75 0.85 < 0.5 1.00
    assert row == ("| lora | 0.800 | 0.400 / 0.100 | 0.5: 0.300 / 0.500 (1.5x) | 0.5: 0.350 / 0.900 (2.0x) "
                   "| 0.75: 0.200 / 0.600 | base-prediction preservation 0.5 |")


def test_a_remedy_runs_key_is_the_same_in_a_checkout_elsewhere(tmp_path):
    """The remedy flags name files under the bench's output folder; a run's key holds them relative to it, so a clone
    at another path finds the runs measured here (the training still gets the real paths)."""
    sys.path.insert(0, str(REPO))
    from bench import world_runs as W

    keys, argvs = [], []
    for where in ("a", "b"):
        out = tmp_path / where / "results"
        runner = W.Runner(out, 1, "world", quick=True)
        flags = ("--preservation_prompts", str(out / "forgetting-inputs" / "p.txt"), "--preservation_weight", "2")
        job = runner.job("lora", "star", 0.01, 0, 4, 0, (1, 1, 1), extra=flags)
        keys.append(Path(job["folder"]).parent.name)
        argvs.append(W.train_argv(job, out / "o"))
    assert keys[0] == keys[1]
    assert str(tmp_path / "b" / "results" / "forgetting-inputs" / "p.txt") in argvs[1]
    assert W.portable(["--x", "/elsewhere/p.txt", "0.5"], tmp_path) == ["--x", "/elsewhere/p.txt", "0.5"]
    relative = os.path.relpath(tmp_path / "a" / "p.txt")  # a relative --out: the same key
    absolute = str(tmp_path / "a" / "p.txt")
    assert W.portable([relative], tmp_path) == W.portable([absolute], tmp_path) == ["<out>/a/p.txt"]
