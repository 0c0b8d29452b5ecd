"""The training loop (restune_diffusion/train/, train_t2i.py) on the tiny model, CPU.

Default suite: the loss step per tuner, min-SNR weights, gradient checkpointing, dtypes after validation, options,
checkpoint bookkeeping, named data errors, in-process runs (resume == uninterrupted, nan loss, LoRA export), and
train_t2i.py in subprocesses (kill -9 + resume, torchrun with 2 processes); the default job on 2 steps (its
500-step run is slow-marked, as are the loss and loop rows of loha, lokr and oft).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from restune_diffusion import train as T
from restune_diffusion.attach import attach
from restune_diffusion.data import make_demo_dataset
from restune_diffusion.models import build_tiny_sd, load_model
from restune_diffusion.train import checkpoints as C
from restune_diffusion.train import loop as LOOP
from restune_diffusion.train import loss as L
from restune_diffusion.train import options as OPT
from restune_diffusion.train import outputs as O
from restune_diffusion.train import run as RUN
from restune_diffusion.train import validation as V
from restune_diffusion.weights import load_tuners, read_tuner_file

REPO = Path(__file__).resolve().parents[1]
SMALL = {  # one row per tuner type, toy sizes
    "res_adapter": {"type": "res_adapter", "dim": 4, "targets": ["ff"]},
    "res_prefix": {"type": "res_prefix", "num_tokens": 2, "targets": ["attn1"], "lam_value": 0.5},
    "res_prompt": {"type": "res_prompt", "num_tokens": 2, "targets": ["attn1"]},
    "lora": {"type": "lora", "rank": 2},
    "adapter": {"type": "adapter", "dim": 4, "targets": ["ff"]},
    "prefix": {"type": "prefix", "num_tokens": 2},
    "prompt": {"type": "prompt", "num_tokens": 2},
    "full": {"type": "full"},
    "bypass": {"type": "bypass"},
    "sc_tuner": {"type": "sc_tuner", "ratio": 0.5},
    "dora": {"type": "dora", "rank": 2},
    "loha": {"type": "loha", "rank": 2},
    "lokr": {"type": "lokr", "rank": 2},
    "oft": {"type": "oft", "block_size": 8},
}
# the loop does not depend on the tuner type: of the peft-built rows, dora (with its diffusers export) stays in the
# default suite, the other three run with -m slow (test_tuners and test_peft_layers check each in the default suite)
TYPES = [pytest.param(n, marks=pytest.mark.slow) if n in ("loha", "lokr", "oft") else n for n in SMALL]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator; accelerate keeps process-wide singletons."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """16 captioned shapes at 32 px, an imagefolder with metadata.jsonl."""
    return make_demo_dataset(tmp_path_factory.mktemp("data") / "shapes", num_images=16, resolution=32)


def write_config(path: Path, tuners: list, **sections) -> Path:
    path.write_text(yaml.safe_dump({"tuners": tuners, **sections}))
    return path


def cli_args(tmp_path: Path, data_dir: Path, *extra: str, tuners=None) -> list[str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = write_config(tmp_path / "config.yaml", tuners or [SMALL["res_adapter"], SMALL["res_prompt"]])
    return ["--config", str(config), "--pretrained_model_name_or_path", "tiny-random", "--dataset", "imagefolder",
            "--data_dir", str(data_dir), "--resolution", "32", "--center_crop", "--random_flip",
            "--train_batch_size", "2", "--learning_rate", "1e-3", "--lr_scheduler", "cosine", "--lr_warmup_steps", "2",
            "--num_validation_images", "0", "--output_dir", str(tmp_path / "out"), *extra]


def fixed_batch(seed: int = 0, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 8, 8, generator=g)
    text = torch.randn(batch, 77, 32, generator=g)
    return latents, text, torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([100, 600][:batch])


def randomize(handle, std=0.05):
    """Non-zero values everywhere (zero-init up-projections and λ = 0 would hide gradients upstream of them)."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.add_(torch.randn_like(p) * std)


# ---------------------------------------------------------------------------------------------------------------------
# the loss and the step
@pytest.mark.parametrize("name", TYPES)
def test_a_few_steps_of_each_tuner_reduce_the_loss_on_a_fixed_batch(name):
    sd = build_tiny_sd()
    torch.manual_seed(0)
    handle = attach(sd.unet, SMALL[name])
    optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-3 if name == "full" else 1e-2)
    batch = fixed_batch()
    losses = []
    for _ in range(20):
        loss = L.diffusion_loss(sd.unet, sd.noise_scheduler, *batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 2e-3 and losses[-1] == min(losses), losses


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_equal_the_closed_form(prediction_type):
    sd = build_tiny_sd()
    sd.noise_scheduler.register_to_config(prediction_type=prediction_type)
    timesteps = torch.tensor([0, 10, 100, 500, 999])
    gamma = 5.0
    alpha_bar = sd.noise_scheduler.alphas_cumprod[timesteps].double()
    snr = alpha_bar / (1 - alpha_bar)
    expected = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64))
    expected = expected / snr if prediction_type == "epsilon" else expected / (snr + 1)
    got = L.min_snr_weights(sd.noise_scheduler, timesteps, gamma)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)
    noisiest = 1.0 if prediction_type == "epsilon" else float(snr[-1] / (snr[-1] + 1))  # SNR < γ: no clipping
    assert got[0] < 1 and got[-1] == pytest.approx(noisiest)


def test_v_prediction_loss_targets_the_velocity():
    sd = build_tiny_sd()
    sd.noise_scheduler.register_to_config(prediction_type="v_prediction")
    latents, text, noise, t = fixed_batch()
    target = sd.noise_scheduler.get_velocity(latents, noise, t)
    zero_unet = lambda *a, **k: (torch.zeros_like(latents),)  # noqa: E731 - predicts 0: loss = mean(target²)
    loss = L.diffusion_loss(zero_unet, sd.noise_scheduler, latents, text, noise, t)
    torch.testing.assert_close(loss, target.pow(2).mean())


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("name", ["res_adapter", "res_prefix", "res_prompt", "lora", "adapter", "prefix", "prompt"])
def test_every_trainable_tensor_gets_a_gradient_with_and_without_checkpointing(name, checkpointing):
    sd = build_tiny_sd()
    handle = attach(sd.unet, SMALL[name])
    randomize(handle)
    if checkpointing:
        sd.unet.enable_gradient_checkpointing()
    sd.unet.train()
    L.diffusion_loss(sd.unet, sd.noise_scheduler, *fixed_batch()).backward()
    starved = [n for n, p in handle.module.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not starved


def test_a_step_after_validation_keeps_trainables_fp32_on_a_bf16_backbone():
    sd = build_tiny_sd()
    for module in (sd.unet, sd.vae, sd.text_encoder):
        module.to(torch.bfloat16)  # what build_models does under --mixed_precision bf16
    handle = attach(sd.unet, [SMALL["res_adapter"], SMALL["lora"]])
    optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-3)
    grid = V.generate_grid(sd, ["a red circle"], 2, 16, 0, torch.bfloat16, torch.device("cpu"))
    assert grid.size == (32, 16)
    assert sd.unet.dtype == sd.vae.dtype == sd.text_encoder.dtype == torch.bfloat16
    latents, text, noise, t = (x.to(torch.bfloat16) if x.is_floating_point() else x for x in fixed_batch())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = L.diffusion_loss(sd.unet, sd.noise_scheduler, latents, text, noise, t)
    loss.backward()
    optimizer.step()
    params = handle.trainable_parameters()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in params)
    assert all(torch.isfinite(p).all() for p in params)


# ---------------------------------------------------------------------------------------------------------------------
# options
def test_the_demo_config_is_configs_tiny_demo_yaml():
    assert OPT.DEMO_CONFIG == REPO / "configs" / "tiny_demo.yaml" and T.parse_args([]).config == str(OPT.DEMO_CONFIG)


def test_no_arguments_means_the_tiny_demo():
    args = T.parse_args([])
    assert (args.pretrained_model_name_or_path, args.dataset, args.config_name) == ("tiny", "imagefolder", "tiny_demo")
    assert args.output_dir == os.path.join("outputs", "tiny_demo") and args.world_report  # the tiny world's concept
    assert args.data_dir == os.path.join("outputs", "tiny_demo", "concept_data")
    assert [t["type"] for t in args.tuners] == ["res_adapter", "res_prompt"]
    # the forgetting bench's best remedy: base-prediction preservation on the world's 30 pretraining prompts
    from restune_diffusion.world.scene import kept_grid

    assert args.preservation_weight == 0.5 and not args.with_prior_preservation
    assert OPT.preservation_prompts(args) == [a.caption for a in kept_grid()]
    assert T.parse_args(["--preservation_weight", "0"]).preservation_weight == 0  # off from the command line


def test_flags_given_override_the_yaml_and_others_do_not(tmp_path):
    config = write_config(tmp_path / "c.yaml", [SMALL["lora"]], train={
        "learning_rate": "1e-4", "mixed_precision": False, "gradient_checkpointing": True, "train_batch_size": 3,
        "validation_prompt": "a cat"}, data={"dataset": "demo", "resolution": 64})
    args = T.parse_args(["--config", str(config), "--pretrained_model_name_or_path", "tiny", "--train_batch_size",
                         "5", "--no-gradient_checkpointing", "--validation_prompt", "x", "--validation_prompt", "y"])
    assert args.learning_rate == 1e-4 and args.mixed_precision == "no"  # YAML 1.1: "1e-4" is a str, `no` is false
    assert (args.train_batch_size, args.gradient_checkpointing, args.resolution) == (5, False, 64)
    assert args.validation_prompt == ["x", "y"] and args.adam_beta1 == 0.9


@pytest.mark.parametrize("section,body,message", [
    ("train", {"learnin_rate": 1e-4}, "unknown key(s) ['learnin_rate'] in section train:; valid keys are"),
    ("data", {"learning_rate": 1e-4}, "unknown key(s) ['learning_rate'] in section data:"),
    ("train", {"train_batch_size": 2.5}, "train_batch_size must be an integer, got 2.5"),
    ("train", {"lr_scheduler": "cosin"}, "lr_scheduler must be one of"),
])
def test_bad_yaml_keys_are_named(tmp_path, section, body, message):
    config = write_config(tmp_path / "c.yaml", [SMALL["lora"]], **{section: body})
    with pytest.raises(ValueError) as err:
        T.parse_args(["--config", str(config), "--pretrained_model_name_or_path", "tiny", "--dataset", "demo"])
    assert message in str(err.value) and "c.yaml" in str(err.value)


def test_a_config_without_a_model_or_tuners_is_an_error(tmp_path):
    config = write_config(tmp_path / "c.yaml", [SMALL["lora"]])
    with pytest.raises(ValueError, match="--pretrained_model_name_or_path"):
        T.parse_args(["--config", str(config), "--dataset", "demo"])
    (tmp_path / "d.yaml").write_text("train: {seed: 1}\n")
    with pytest.raises(ValueError, match="no tuners: section"):
        T.parse_args(["--config", str(tmp_path / "d.yaml")])


# ---------------------------------------------------------------------------------------------------------------------
# checkpoint bookkeeping
def make_checkpoint(root: Path, name: str, complete: bool = True) -> Path:
    path = root / name
    path.mkdir(parents=True)
    if complete:
        (path / T.STATE_FILE).write_text(json.dumps({"global_step": int(name.split("-")[1].split(".")[0])}))
    return path


def test_latest_is_the_highest_complete_step_never_a_half_written_folder(tmp_path):
    for name in ("checkpoint-4", "checkpoint-10", "checkpoint-2"):
        make_checkpoint(tmp_path, name)
    make_checkpoint(tmp_path, ".checkpoint-12.tmp")  # killed during save_state: never renamed
    make_checkpoint(tmp_path, "checkpoint-14", complete=False)  # no state file
    assert C.find_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-10"  # by integer, not by string
    assert C.find_checkpoint(tmp_path / "empty", "latest") is None
    assert C.find_checkpoint(tmp_path, "checkpoint-4") == tmp_path / "checkpoint-4"
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        C.find_checkpoint(tmp_path, str(tmp_path / "checkpoint-14"))
    with pytest.raises(FileNotFoundError, match="checkpoint-2, checkpoint-4, checkpoint-10"):
        C.find_checkpoint(tmp_path, "checkpoint-99")


def test_total_limit_prunes_to_the_newest_by_step(tmp_path):
    for step in (2, 4, 6, 8, 10):
        make_checkpoint(tmp_path, f"checkpoint-{step}")
    make_checkpoint(tmp_path, ".checkpoint-12.tmp")
    C.prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-8"]


# ---------------------------------------------------------------------------------------------------------------------
# named errors from the CLI, before any model is loaded
@pytest.fixture
def no_models(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("models were loaded before the data error")

    monkeypatch.setattr(RUN, "build_models", fail)


def test_a_corrupt_image_is_named_before_loading_models(tmp_path, data_dir, no_models, capsys):
    bad = tmp_path / "data"
    shutil.copytree(data_dir, bad)
    (bad / "00003.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    assert T.main(cli_args(tmp_path, bad)) == 2
    err = capsys.readouterr().err
    assert "00003.png: cannot read image" in err and "--skip_bad_images" in err


def test_a_bad_annotation_is_named(tmp_path, no_models, capsys):
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "train2017").mkdir()
    (coco / "annotations" / "captions_train2017.json").write_text('{"images": []}')
    assert T.main(cli_args(tmp_path, coco)[:-2] + ["--dataset", "coco2017", "--output_dir", str(tmp_path)]) == 2
    assert "captions_train2017.json: missing 'images' or 'annotations'" in capsys.readouterr().err


@pytest.mark.parametrize("kind,message", [("auto", "no images found"), ("imagefolder", "no metadata.jsonl")])
def test_an_empty_folder_is_named(tmp_path, no_models, capsys, kind, message):
    (tmp_path / "empty").mkdir()
    argv = cli_args(tmp_path, tmp_path / "empty") + ["--dataset", kind]
    assert T.main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_missing_resume_path_is_an_error_not_a_fresh_start(tmp_path, data_dir, no_models, capsys):
    assert T.main(cli_args(tmp_path, data_dir, "--resume_from_checkpoint", str(tmp_path / "nope"))) == 2
    assert "--resume_from_checkpoint" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only message")
def test_xformers_without_a_gpu_says_what_is_needed(tmp_path, data_dir, capsys):
    argv = cli_args(tmp_path, data_dir, "--enable_xformers_memory_efficient_attention", "--max_train_steps", "1")
    assert T.main(argv) == 2
    err = capsys.readouterr().err
    assert "--enable_xformers_memory_efficient_attention needs xformers and a CUDA GPU" in err and "SDPA" in err


# ---------------------------------------------------------------------------------------------------------------------
# in-process runs
class Stop(Exception):
    pass


def crash_after_checkpoint(monkeypatch, argv: list[str], step: int) -> None:
    """An in-process run of `argv` that stops right after writing checkpoint-`step`, as a crash would; accelerate's
    process-wide state reset for the next run."""
    from accelerate.state import AcceleratorState, GradientState

    save = LOOP.save_checkpoint

    def save_then_die(run):
        path = save(run)
        if run.global_step == step:
            raise Stop
        return path

    monkeypatch.setattr(LOOP, "save_checkpoint", save_then_die)
    with pytest.raises(Stop):
        T.train(T.parse_args(argv))
    monkeypatch.setattr(LOOP, "save_checkpoint", save)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path, data_dir, monkeypatch):
    common = ["--max_train_steps", "8", "--checkpointing_steps", "2", "--gradient_accumulation_steps", "2",
              "--snr_gamma", "5", "--noise_offset", "0.05"]
    straight = T.train(T.parse_args(cli_args(tmp_path / "a", data_dir, *common)))
    args = cli_args(tmp_path / "b", data_dir, *common)
    crash_after_checkpoint(monkeypatch, args, 6)  # mid-epoch (4 steps per epoch)
    resumed = T.train(T.parse_args(args + ["--resume_from_checkpoint", "latest"]))
    assert_same_run(tmp_path / "a" / "out", tmp_path / "b" / "out", steps=8)
    assert (straight["global_step"], resumed["global_step"], resumed["steps_run"]) == (8, 8, 2)


def assert_same_run(a: Path, b: Path, steps: int):
    """Tuner tensors, optimizer moments, LR schedule, global step and the per-step losses agree exactly."""
    for name in (T.TUNERS_FILE, f"checkpoint-{steps}/{T.TUNERS_FILE}"):
        ta, tb = load_file(a / name), load_file(b / name)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    oa, ob = (torch.load(p / f"checkpoint-{steps}" / "optimizer.bin", weights_only=True) for p in (a, b))
    for key, state in oa["state"].items():
        assert state["step"] == ob["state"][key]["step"]
        assert torch.equal(state["exp_avg"], ob["state"][key]["exp_avg"])
        assert torch.equal(state["exp_avg_sq"], ob["state"][key]["exp_avg_sq"])
    sa, sb = (torch.load(p / f"checkpoint-{steps}" / "scheduler.bin", weights_only=True) for p in (a, b))
    assert sa["last_epoch"] == sb["last_epoch"] and sa["_last_lr"] == sb["_last_lr"]
    assert json.loads((b / f"checkpoint-{steps}" / T.STATE_FILE).read_text())["global_step"] == steps
    la, lb = (T.read_log(p) for p in (a, b))
    assert [r["step"] for r in lb] == list(range(1, steps + 1)) and la == lb


@pytest.mark.parametrize("name", TYPES)
def test_the_training_loop_trains_and_exports_every_tuner_type(tmp_path, data_dir, name):
    # 6 steps: a bypass chain of zero-init tuners opens one stem per step, from the target back (4 stems in tiny)
    argv = cli_args(tmp_path, data_dir, "--max_train_steps", "6", "--checkpointing_steps", "0", tuners=[SMALL[name]])
    summary = T.train(T.parse_args(argv))
    sd = build_tiny_sd()
    handle = load_tuners(sd.unet, tmp_path / "out" / T.TUNERS_FILE)
    assert summary["global_step"] == 6 and summary["trainable_params"] == handle.num_parameters() > 0
    initial = attach(build_tiny_sd().unet, SMALL[name]).state_dict()
    trained = handle.state_dict()
    assert trained.keys() == initial.keys()
    if name == "full":  # the tiny model's seeded weights are the starting point
        assert any(not torch.equal(trained[k], initial[k]) for k in trained)
    zero_init = [k for k, v in initial.items() if v.is_floating_point() and not v.any()]
    assert all(trained[k].any() for k in zero_init), "zero-initialised tensors did not train"


@pytest.mark.slow  # over 5 s on 2 cores: the default suite stays under 5 minutes
def test_lora_run_with_validation_exports_both_formats(tmp_path, data_dir):
    argv = cli_args(tmp_path, data_dir, "--max_train_steps", "2", "--validation_steps", "1", "--validation_prompt",
                    "a red circle", "--num_validation_images", "2", "--checkpointing_steps", "0",
                    tuners=[SMALL["lora"]])
    summary = T.train(T.parse_args(argv))
    out = tmp_path / "out"
    for name in ("validation/step-1.png", "validation/step-2.png", "samples.png", "loss.png", "losses.json"):
        assert (out / name).is_file(), name
    lora = load_file(out / O.LORA_FILE)
    tensors, _ = read_tuner_file(out / T.TUNERS_FILE)
    assert len(lora) == len(tensors) and all(k.startswith("unet.") and ".lora_" in k for k in lora)
    assert summary["trainable_params"] == sum(t.numel() for t in tensors.values()) and summary["peak_memory_bytes"]
    again = T.parse_args(["--config", str(out / T.CONFIG_FILE)])  # the resolved config repeats the run
    first = T.parse_args(argv)
    for key, value in vars(first).items():
        if key not in ("config", "config_name"):
            assert getattr(again, key) == value, key


def test_a_fresh_run_refuses_a_folder_with_another_runs_checkpoints(tmp_path, data_dir, capsys):
    make_checkpoint(tmp_path / "out", "checkpoint-3")
    assert T.main(cli_args(tmp_path, data_dir)) == 2
    assert "--resume_from_checkpoint latest" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# train_t2i.py in subprocesses
def run_cli(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train_t2i.py"), *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow  # over 8 s on 2 cores: the default suite stays under 5 minutes
def test_kill_9_then_resume_latest_equals_the_uninterrupted_run(tmp_path, data_dir):
    common = ["--max_train_steps", "12", "--checkpointing_steps", "2", "--checkpoints_total_limit", "3"]
    T.train(T.parse_args(cli_args(tmp_path / "a", data_dir, *common)))  # uninterrupted, in this process

    argv = cli_args(tmp_path / "b", data_dir, *common)
    out = tmp_path / "b" / "out"
    proc = subprocess.Popen([sys.executable, str(REPO / "train_t2i.py"), *argv], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoint-4" / T.STATE_FILE).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / T.TUNERS_FILE).exists()  # killed mid-run
    killed_at = C.find_checkpoint(out, "latest")

    resumed = run_cli(argv + ["--resume_from_checkpoint", "latest"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {killed_at}" in resumed.stdout
    assert_same_run(tmp_path / "a" / "out", out, steps=12)
    assert sorted(p.name for p in C.list_checkpoints(out)) == ["checkpoint-10", "checkpoint-12", "checkpoint-8"]


@pytest.mark.slow  # over 8 s on 2 cores: the default suite stays under 5 minutes
def test_torchrun_with_two_processes_trains_synchronised_tuners_and_resumes_exactly(tmp_path, data_dir):
    probe = tmp_path / "probe.py"  # all-gathers the tuner tensors of both ranks before the export
    probe.write_text(
        "import sys, torch\n"
        "import restune_diffusion.train as T\n"
        "import restune_diffusion.train.run as R\n"
        "export = R.export\n"
        "def checked(run, *args):\n"
        "    flat = torch.cat([v.flatten().float() for v in run.tasks[0].handle.state_dict().values()])[None]\n"
        "    both = run.accelerator.gather(flat)\n"
        "    if run.accelerator.is_main_process:\n"
        "        open(sys.argv[1], 'w').write(f'{both.shape[0]} {float((both[0] - both[1]).abs().max())}')\n"
        "    return export(run, *args)\n"
        "R.export = checked\n"
        "sys.exit(T.main(sys.argv[2:]))\n")
    argv = cli_args(tmp_path, data_dir, "--max_train_steps", "6", "--checkpointing_steps", "2")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(probe),
                str(tmp_path / "ranks.txt")]
    done = subprocess.run([*torchrun, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "ranks.txt").read_text() == "2 0.0"  # two ranks, identical tuners (DDP synced the grads)
    assert "batch 2 per device x 2 processes" in done.stdout
    out = tmp_path / "out"
    assert {"random_states_0.pkl", "random_states_1.pkl", T.TUNERS_FILE} <= set(os.listdir(out / "checkpoint-4"))
    assert [r["step"] for r in T.read_log(out)] == [1, 2, 3, 4, 5, 6]  # one writer
    straight, log = load_file(out / T.TUNERS_FILE), T.read_log(out)
    assert any(v.abs().sum() > 0 for k, v in straight.items() if ".up." in k)  # trained from the zero init

    for name in ("checkpoint-4", "checkpoint-6"):  # back to step 2: mid-epoch (4 batches per epoch and rank)
        shutil.rmtree(out / name)
    resumed = subprocess.run([*torchrun, *argv, "--resume_from_checkpoint", "latest"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "checkpoint-2 at step 2" in resumed.stdout
    again = load_file(out / T.TUNERS_FILE)
    assert all(torch.equal(straight[k], again[k]) for k in straight) and T.read_log(out) == log


@pytest.mark.slow  # over 8 s on 2 cores: the default suite stays under 5 minutes
def test_the_default_job_runs_end_to_end_on_a_few_steps(tmp_path, monkeypatch):
    """`python train_t2i.py`'s wiring (its config, the pretrained tiny base, the concept's data, exports, the model
    card and the tiny world's before/after report) on 2 steps and a one-round report; the 500-step job: the slow
    test below."""
    from restune_diffusion.world import report

    monkeypatch.setattr(report, "REPORT_REPEATS", {"concept": 1, "kept": 1, "combos": 1})
    monkeypatch.chdir(tmp_path)
    summary = T.train(T.parse_args(["--max_train_steps", "2", "--num_validation_images", "1"]))
    out = tmp_path / "outputs" / "tiny_demo"
    for name in (T.TUNERS_FILE, "samples.png", "loss.png", "summary.json", "README.md", "before_after.png",
                 "world_report.json", "concept_data/metadata.jsonl"):
        assert (out / name).is_file(), name
    assert summary["global_step"] == 2 and summary["trainable_params"] == 93_383  # the pretrained base
    before, after = summary["world"]["before"], summary["world"]["after"]
    assert before["concept_drawn"]["n"] == after["concept_drawn"]["n"] == 12 and after["kept"]["n"] == 30
    assert [c["type"] for c in summary["tuners"]] == ["res_adapter", "res_prompt"]


@pytest.mark.slow
def test_no_arguments_runs_the_tiny_demo(tmp_path):
    done = run_cli([], tmp_path, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "outputs" / "tiny_demo"
    for name in (T.TUNERS_FILE, "samples.png", "loss.png", "losses.json", "summary.json"):
        assert (out / name).is_file(), name
    handle = load_tuners(load_model("tiny").unet, out / T.TUNERS_FILE)  # the pretrained tiny base
    assert [c.type for c in handle.configs] == ["res_adapter", "res_prompt"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 500 and "trainable parameters: 93,383" in done.stdout  # pretrained base
    assert "base-prediction preservation (weight 0.5)" in done.stdout  # the config's remedy
    losses = json.loads((out / "losses.json").read_text())["loss"]
    assert sum(losses[-20:]) < 0.9 * sum(losses[:20])
