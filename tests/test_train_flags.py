"""The training flags diffusers and kohya users bring (issue 17): their unknown flags answered in one line,
--validation_epochs, --allow_tf32, --report_to wandb, and the held-out validation loss (--validation_split)."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from test_train import REPO, SMALL, cli_args, data_dir, fresh_accelerate_state  # noqa: F401 (fixtures)

from restune_diffusion import train as T
from restune_diffusion.attach import attach
from restune_diffusion.flags import FOREIGN
from restune_diffusion.train import loop as LOOP
from restune_diffusion.train import options as OPT
from restune_diffusion.train import run as RUN
from restune_diffusion.train import validation as V


# ---------------------------------------------------------------------------------------------------------------------
# flags we do not take
@pytest.mark.parametrize("flag,says", [
    ("--rank", "set `rank:` of the lora tuner in the YAML's tuners: list (configs/lora.yaml"),
    ("--lr_num_cycles", "cosine_with_restarts runs diffusers' default 1 cycle"),
    ("--optimizer_type", "AdamW is the optimizer"),
    ("--use_dora", "DoRA is a tuner type: `- {type: dora, rank: 4}`"),
    ("--network_dim", "set `rank:` of the lora tuner (`dim:` of an adapter)"),
    ("--network_alpha", "set `alpha:` of the lora tuner"),
    ("--network_module", "pick the tuner with `type:`"),
    ("--train_text_encoder", "the text encoder stays frozen here"),
    ("--lr_power", "polynomial its power 1.0"),
    ("--max_data_loader_n_workers", "--dataloader_num_workers"),
    ("--save_every_n_steps", "--checkpointing_steps"),
    ("--xformers", "--enable_xformers_memory_efficient_attention"),
])
def test_a_diffusers_or_kohya_flag_we_do_not_take_is_one_line_naming_ours(tmp_path, flag, says, capsys):
    argv = ["--pretrained_model_name_or_path", "tiny-random", "--dataset", "demo", f"{flag}=4"]
    assert T.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "usage:" not in err
    assert err.startswith(f"train_t2i.py: error: {flag} is a ") and says in err, err


def test_an_unknown_flag_is_one_line_with_the_closest_flags(capsys):
    assert T.main(["--learnin_rate", "1e-4"]) == 2  # a typo, not a prefix (argparse takes unique prefixes)
    err = capsys.readouterr().err.strip()
    assert err.startswith("train_t2i.py: error: unknown flag --learnin_rate; did you mean --learning_rate")
    assert err.endswith("? (`train_t2i.py --help` lists the flags)") and err.count("\n") == 0
    assert T.main(["--seed", "abc"]) == 2  # argparse's own errors are one line too
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "argument --seed: invalid int value: 'abc'" in err


def test_the_hub_upload_flags_of_diffusers_readme_commands_are_named_and_dropped(tmp_path, capsys):
    argv = ["--pretrained_model_name_or_path", "tiny-random", "--dataset", "demo", "--output_dir", str(tmp_path),
            "--no-world_report",
            "--push_to_hub", "--hub_model_id=me/lora", "--hub_token", "hf_secret", "--local_rank", "0", "--seed", "3"]
    args = T.parse_args(argv)
    out = capsys.readouterr().out
    assert args.seed == 3 and not hasattr(args, "push_to_hub")
    for flag in ("--push_to_hub", "--hub_model_id", "--hub_token", "--local_rank"):
        assert f"{flag}: ignored, " in out
    assert "nothing is uploaded from here (offline)" in out and "hf_secret" not in out


@pytest.mark.slow  # over 5 s on 2 cores: the default suite stays under 5 minutes
def test_the_cli_prints_one_line_for_a_foreign_flag():
    done = subprocess.run([sys.executable, "train_t2i.py", "--rank", "4"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "--rank is a diffusers flag that train_t2i.py does not take" in done.stderr


def test_no_foreign_entry_shadows_a_flag_we_take_and_entries_win_over_prefixes(capsys):
    assert not set(FOREIGN) & set(OPT.option_names())
    # kohya's --save_state would be argparse's prefix of nothing, --dataset_config of --dataset_config_name (if any):
    # an entry is answered before argparse could read it as an abbreviation of another flag
    assert T.main(["--dataset_config", "x.toml"]) == 2
    assert "--dataset_config is a kohya sd-scripts flag" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# --validation_epochs, --allow_tf32, --report_to
def test_validation_epochs_validates_at_the_end_of_every_nth_epoch(tmp_path, data_dir, monkeypatch):  # noqa: F811
    seen = []
    def validate(run, task):
        seen.append(run.global_step)

    monkeypatch.setattr(LOOP, "validate", validate)
    # 16 images, batch 2: 8 steps per epoch; 20 steps = 2.5 epochs; every 2 epochs -> step 16, and the end
    T.train(T.parse_args(cli_args(tmp_path, data_dir, "--max_train_steps", "20", "--checkpointing_steps", "0",
                                  "--validation_steps", "0", "--validation_epochs", "2")))
    assert seen == [16, 20]


def test_allow_tf32_sets_the_backends_and_is_harmless_on_cpu(tmp_path, data_dir):  # noqa: F811
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    was = matmul.allow_tf32, cudnn.allow_tf32
    matmul.allow_tf32 = cudnn.allow_tf32 = False
    try:
        T.train(T.parse_args(cli_args(tmp_path, data_dir, "--max_train_steps", "1", "--checkpointing_steps", "0",
                                      "--allow_tf32")))
        assert matmul.allow_tf32 and cudnn.allow_tf32
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = was


def test_report_to_wandb_without_wandb_is_a_named_error_with_the_install_command(tmp_path, data_dir,  # noqa: F811
                                                                                monkeypatch, capsys):
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find(name, *a))
    monkeypatch.setattr(RUN, "build_models", lambda *a: pytest.fail("models loaded"))
    assert T.main(cli_args(tmp_path, data_dir, "--report_to", "wandb")) == 2
    assert "--report_to wandb needs the wandb package: pip install wandb" in capsys.readouterr().err


def test_report_to_wandb_logs_offline_into_the_output_folder(tmp_path, data_dir, monkeypatch):  # noqa: F811
    pytest.importorskip("wandb")
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc login
    monkeypatch.setenv("WANDB_SILENT", "true")
    T.train(T.parse_args(cli_args(tmp_path, data_dir, "--max_train_steps", "2", "--checkpointing_steps", "0",
                                  "--report_to", "wandb", "--validation_prompt", "a red circle",
                                  "--num_validation_images", "1")))
    import os

    assert os.environ["WANDB_MODE"] == "offline"
    runs = list((tmp_path / "out" / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), runs


# ---------------------------------------------------------------------------------------------------------------------
# the held-out validation loss
def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_the_heldout_loss_is_the_same_in_two_runs_and_its_images_are_never_trained_on(tmp_path, data_dir,  # noqa: F811
                                                                                      monkeypatch):
    trained_on = []
    micro = LOOP.micro_step

    def spy(run, batch, epoch, index):
        trained_on.extend(batch["paths"])
        return micro(run, batch, epoch, index)

    monkeypatch.setattr(LOOP, "micro_step", spy)
    extra = ["--max_train_steps", "8", "--validation_steps", "4", "--checkpointing_steps", "0",
             "--validation_split", "0.25", "--learning_rate", "1e-2"]
    logs = []
    for name in ("a", "b"):
        summary = T.train(T.parse_args(cli_args(tmp_path / name, data_dir, *extra)))
        logs.append(T.read_log(tmp_path / name / "out"))
        reset_accelerate()
        assert summary["data"]["num_heldout_samples"] == 4 and summary["data"]["num_train_samples"] == 12
        assert summary["final_val_loss"] == logs[-1][-1]["val_loss"]
    held = [{r["step"]: r["val_loss"] for r in log if "val_loss" in r} for log in logs]
    assert sorted(held[0]) == [4, 8] and held[0] == held[1]  # exactly
    assert held[0][4] != held[0][8]  # it follows the weights
    never = {str(p) for p in data_dir.iterdir() if p.suffix == ".png"} - set(trained_on)
    assert len(set(trained_on)) == 12 and len(never) == 4  # 8 steps x 2 x 2 runs saw all 12, never the 4
    losses = json.loads((tmp_path / "a" / "out" / "losses.json").read_text())
    assert losses["val_step"] == [4, 8] and losses["val_loss"] == [held[0][4], held[0][8]]


def test_the_heldout_loss_does_not_depend_on_the_batch_size(tmp_path, data_dir):  # noqa: F811
    values = []
    for batch in ("2", "3"):
        args = T.parse_args(cli_args(tmp_path / batch, data_dir, "--validation_split", "0.25",
                                     "--train_batch_size", batch))
        from types import SimpleNamespace

        from restune_diffusion.data import load_dataset
        from restune_diffusion.models import build_tiny_sd

        dataset = load_dataset("imagefolder", data_dir, resolution=32, center_crop=True, random_flip=True)
        _, heldout = V.split_heldout(dataset, args.validation_split, V.validation_seed(args))
        sd = build_tiny_sd()
        attach(sd.unet, SMALL["res_adapter"])
        run = SimpleNamespace(sd=sd, heldout=heldout, model=torch.nn.Identity(), weight_dtype=torch.float32,
                              accelerator=SimpleNamespace(device=torch.device("cpu")))
        values.append(V.heldout_loss(run, SimpleNamespace(args=args)))
    assert values[0] == pytest.approx(values[1], rel=1e-6)


def test_the_split_is_by_image_seeded_and_leaves_something_to_train_on(data_dir):  # noqa: F811
    from restune_diffusion.data import load_dataset

    dataset = load_dataset("imagefolder", data_dir, resolution=32)
    dataset.samples = dataset.samples + dataset.samples[:4]  # an image with two samples (COCO: five captions)
    train, held = V.split_heldout(dataset, 0.25, seed=0)
    assert not {str(s.path) for s in train.samples} & {str(s.path) for s in held.samples}
    assert len(train) + len(held) == len(dataset) and len({s.path for s in held.samples}) == 4
    again, _ = V.split_heldout(dataset, 0.25, seed=0)
    other, _ = V.split_heldout(dataset, 0.25, seed=1)
    assert again.samples == train.samples and other.samples != train.samples
    with pytest.raises(ValueError, match="leaving none to train on"):
        V.split_heldout(dataset, 0.99, seed=0)


def test_help_lists_the_flags_in_their_groups(capsys):
    with pytest.raises(SystemExit) as done:
        T.parse_args(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "--learning_rate" in out and "--no-center_crop" in out
    assert "data (YAML section data:)" in out and "train (YAML section train:)" in out
