"""--use_ema (issue 17): an fp32 EMA of the tuner weights, one update per optimizer step, in checkpoints, resumed
exactly, exported as tuners_ema.safetensors (load_tuners reads it), used for validation; per task in joint runs."""

import pytest
import torch
from safetensors.torch import load_file
from test_train import SMALL, cli_args, crash_after_checkpoint, data_dir, fresh_accelerate_state  # noqa: F401 (fixtures)

from restune_diffusion import train as T
from restune_diffusion.attach import attach, attached_sets
from restune_diffusion.ema import EMA_FILE, TunerEMA
from restune_diffusion.models import build_tiny_sd
from restune_diffusion.train import validation as V
from restune_diffusion.weights import load_tuners, read_tuner_file


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


# ---------------------------------------------------------------------------------------------------------------------
# the average itself
def test_the_decay_ramps_as_diffusers_emamodel_and_the_update_is_the_closed_form():
    sd = build_tiny_sd()
    handle = attach(sd.unet, SMALL["res_adapter"])
    ema = TunerEMA(handle, decay=0.5)
    values, expected = [], None
    for step in range(5):
        with torch.no_grad():
            for p in handle.trainable_parameters():
                p.fill_(float(step + 1))
        d = ema.current_decay()
        assert d == (0.0 if step == 0 else min(0.5, (1 + step) / (10 + step)))
        expected = float(step + 1) if expected is None else d * expected + (1 - d) * (step + 1)
        ema.update()
        values.append(expected)
    assert ema.num_updates == 5
    for tensor in ema.shadow.values():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, torch.full_like(tensor, values[-1]))


def test_applied_swaps_the_average_in_and_restores_the_live_weights_exactly():
    sd = build_tiny_sd()
    handle = attach(sd.unet, SMALL["lora"])
    ema = TunerEMA(handle)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.add_(torch.randn_like(p))
    live = {k: v.clone() for k, v in handle.state_dict().items()}
    with ema.applied():
        assert all(torch.equal(handle.state_dict()[k], ema.shadow[k]) for k in ema.shadow)
    assert all(torch.equal(v, live[k]) for k, v in handle.state_dict().items())


def test_the_ema_file_loads_with_load_tuners_and_back_into_an_ema(tmp_path):
    sd = build_tiny_sd()
    handle = attach(sd.unet, SMALL["res_adapter"])
    ema = TunerEMA(handle)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.add_(1.0)
    ema.update()
    ema.update()
    path = ema.save(tmp_path / EMA_FILE)
    loaded = load_tuners(build_tiny_sd().unet, path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ema.shadow.items())
    again = TunerEMA(attach(build_tiny_sd().unet, SMALL["res_adapter"]))
    assert again.load(path) == len(ema.shadow) and again.num_updates == 2
    assert all(torch.equal(again.shadow[k], v) for k, v in ema.shadow.items())


# ---------------------------------------------------------------------------------------------------------------------
# in training
def test_a_resumed_ema_run_equals_the_uninterrupted_one_and_updates_once_per_optimizer_step(
        tmp_path, data_dir, monkeypatch):  # noqa: F811
    common = ["--max_train_steps", "6", "--checkpointing_steps", "2", "--gradient_accumulation_steps", "2",
              "--use_ema", "--ema_decay", "0.9", "--learning_rate", "1e-2"]
    T.train(T.parse_args(cli_args(tmp_path / "a", data_dir, *common)))
    args = cli_args(tmp_path / "b", data_dir, *common)
    crash_after_checkpoint(monkeypatch, args, 4)
    T.train(T.parse_args(args + ["--resume_from_checkpoint", "latest"]))
    a, b = tmp_path / "a" / "out", tmp_path / "b" / "out"
    for name in (EMA_FILE, f"checkpoint-6/{EMA_FILE}", f"checkpoint-4/{EMA_FILE}"):
        ta, tb = load_file(a / name), load_file(b / name)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
    _, meta = read_tuner_file(b / EMA_FILE)
    assert meta["ema_updates"] == "6" and meta["ema_decay"] == "0.9"  # 6 steps of 2 micro-batches: 6 updates
    live, average = load_file(b / T.TUNERS_FILE), load_file(b / EMA_FILE)
    assert any(not torch.equal(live[k], average[k]) for k in live)  # an average, not a copy


def test_validation_images_are_made_with_the_ema_weights(tmp_path, data_dir, monkeypatch):  # noqa: F811
    seen = []
    grid = V.generate_grid

    def record(sd, *args, **kwargs):
        seen.append({k: v.clone() for k, v in attached_sets(sd.unet)["default"].state_dict().items()})
        return grid(sd, *args, **kwargs)

    monkeypatch.setattr(V, "generate_grid", record)
    argv = cli_args(tmp_path, data_dir, "--max_train_steps", "3", "--checkpointing_steps", "0", "--use_ema",
                    "--ema_decay", "0.5", "--learning_rate", "1e-2", "--validation_prompt", "a red circle",
                    "--num_validation_images", "1", "--validation_steps", "0")
    T.train(T.parse_args(argv))
    out = tmp_path / "out"
    average, live = load_file(out / EMA_FILE), load_file(out / T.TUNERS_FILE)
    assert len(seen) == 1  # at the end only
    assert all(torch.equal(seen[0][k], average[k]) for k in average)
    assert any(not torch.equal(seen[0][k], live[k]) for k in live)  # and the live weights came back after


def test_resume_refuses_to_turn_ema_on_or_off(tmp_path, data_dir):  # noqa: F811
    T.train(T.parse_args(cli_args(tmp_path, data_dir, "--max_train_steps", "2", "--checkpointing_steps", "2")))
    reset_accelerate()
    with pytest.raises(ValueError, match=r"use_ema False -> True \(the EMA of the tuner weights runs from step 0"):
        T.train(T.parse_args(cli_args(tmp_path, data_dir, "--max_train_steps", "4", "--use_ema",
                                      "--resume_from_checkpoint", "latest")))


def test_a_joint_run_keeps_one_ema_and_one_heldout_loss_per_bypass(tmp_path, data_dir):  # noqa: F811
    import yaml

    configs = []
    for name, groups in (("one", 4), ("two", 2)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"tuners": [{"type": "bypass", "groups": groups}]}))
        configs += ["--config", str(path)]
    argv = configs + cli_args(tmp_path, data_dir, "--max_train_steps", "2", "--checkpointing_steps", "2",
                              "--use_ema", "--learning_rate", "1e-2", "--validation_split", "0.25")[2:]
    summaries = T.train(T.parse_args(argv))
    for task in ("one", "two"):
        out = tmp_path / "out" / task
        _, meta = read_tuner_file(out / EMA_FILE)
        assert meta["ema_updates"] == "2"
        assert (tmp_path / "out" / "checkpoint-2" / task / EMA_FILE).is_file()
        load_tuners(build_tiny_sd().unet, out / EMA_FILE)
        assert summaries[task]["data"]["num_heldout_samples"] == 4
    held = [T.read_log(tmp_path / "out" / task)[-1]["val_loss"] for task in ("one", "two")]
    assert held[0] != held[1]  # each bypass scored alone (--validation_split 0.25: 4 of the 16 images)
