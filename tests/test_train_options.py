"""Defaults that follow the model, and what train_t2i.py says before it wastes a run (issue 12 items 8-10)."""

import importlib.util
from types import SimpleNamespace

import pytest
from test_train import REPO, cli_args, data_dir, fresh_accelerate_state  # noqa: F401 (fixtures)

from restune_diffusion import train as T
from restune_diffusion.train import options as OPT
from restune_diffusion.train import run as RUN
from restune_diffusion.train import setup as SETUP


def test_a_paper_config_with_tiny_trains_at_tinys_native_resolution():
    paper = str(REPO / "configs" / "res_tuning_bypass.yaml")
    args = T.parse_args(["--config", paper, "--pretrained_model_name_or_path", "tiny-random", "--dataset", "demo"])
    assert args.resolution == 32  # not SD v1.5's 512
    args = T.parse_args(["--config", paper, "--pretrained_model_name_or_path", "tiny-random", "--dataset", "demo",
                         "--resolution", "64"])
    assert args.resolution == 64


def test_the_native_resolution_of_a_model_folder_is_read_from_its_configs(tmp_path):
    from restune_diffusion.models import build_tiny_sd, save_components

    save_components(build_tiny_sd(), tmp_path / "m")
    assert OPT.model_resolution(str(tmp_path / "m")) == 32
    with pytest.raises(FileNotFoundError, match="not a folder"):
        OPT.model_resolution(str(tmp_path / "nope"))


def test_a_warmup_longer_than_the_run_is_warned_about(tmp_path, data_dir, capsys):  # noqa: F811
    T.train(T.parse_args(cli_args(tmp_path, data_dir, "--max_train_steps", "1", "--lr_warmup_steps", "500",
                                  "--checkpointing_steps", "0")))
    assert "warning: --lr_warmup_steps 500 is not shorter than the run (1 steps)" in capsys.readouterr().out


def test_report_to_tensorboard_without_tensorboard_is_a_named_error_before_loading(tmp_path, data_dir,  # noqa: F811
                                                                                   monkeypatch, capsys):
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else find(name, *a))
    monkeypatch.setattr(RUN, "build_models", lambda *a: pytest.fail("models loaded"))
    assert T.main(cli_args(tmp_path, data_dir, "--report_to", "tensorboard")) == 2
    assert "--report_to tensorboard needs the tensorboard package: pip install tensorboard" in capsys.readouterr().err


@pytest.mark.parametrize("world_size,warned", [(None, True), ("2", False)])
def test_one_process_where_several_were_asked_for_is_warned_about(monkeypatch, world_size, warned):
    # what `accelerate launch --num_processes 2 --cpu` leaves in the environment of its ONE process
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    said = []
    SETUP.warn_single_process(SimpleNamespace(num_processes=1, print=said.append))
    assert bool(said) == warned and (not said or "torchrun --nproc_per_node N" in said[0])


def test_named_errors_exit_2_with_one_line(tmp_path, capsys):
    assert T.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train_t2i.py: error: ")


def test_stale_temp_files_of_a_killed_writer_are_removed_at_start(tmp_path, data_dir, monkeypatch):  # noqa: F811
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".loss.png.tmp999999999"  # no such process
    stale.write_bytes(b"half a png")
    monkeypatch.setattr(RUN, "build_models", lambda *a: pytest.fail("stop here"))
    with pytest.raises(pytest.fail.Exception):
        T.train(T.parse_args(cli_args(tmp_path, data_dir)))
    assert not stale.exists()


def test_a_library_run_keeps_the_process_group_and_the_cli_closes_it(tmp_path, data_dir):  # noqa: F811
    """train() may run again in the same process (the table's rows), so it must not destroy the torch.distributed
    group (accelerate's end_training does; a second run then rejoined a stale rendezvous); train_t2i.py's main does,
    once, at exit."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        T.train(T.parse_args(cli_args(tmp_path / "lib", data_dir, "--max_train_steps", "1")))
        assert dist.is_initialized()  # before: destroyed by end_training()
        assert T.main(cli_args(tmp_path / "cli", data_dir, "--max_train_steps", "1")) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
