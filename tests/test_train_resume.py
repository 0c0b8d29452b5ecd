"""Resume that honours what changed, NaN recovery that works, damaged checkpoints and full disks (issue 13 items 1-5
and 13) on the tiny model, CPU."""

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_train import REPO, SMALL, cli_args, data_dir, fresh_accelerate_state  # noqa: F401 (fixtures)

from restune_diffusion import train as T
from restune_diffusion.models import build_tiny_sd, save_components
from restune_diffusion.train import checkpoints as C
from restune_diffusion.train import loop as LOOP
from restune_diffusion.train import options as OPT
from restune_diffusion.train import resume as R
from restune_diffusion.train import run as RUN


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def train(tmp: Path, data: Path, *extra: str, tuners=None) -> dict:
    reset_accelerate()
    return T.train(T.parse_args(cli_args(tmp, data, *extra, tuners=tuners)))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, data_dir):  # noqa: F811
    """A 4-step run with checkpoints at 2 and 4 (lr 1e-3, cosine, warmup 2)."""
    tmp = tmp_path_factory.mktemp("base")
    train(tmp, data_dir, "--max_train_steps", "4", "--checkpointing_steps", "2")
    reset_accelerate()
    return tmp


def copy_run(base: Path, tmp: Path) -> Path:
    shutil.copytree(base / "out", tmp / "out")
    return tmp


@pytest.fixture
def no_models(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("models were loaded before the error")

    monkeypatch.setattr(RUN, "build_models", fail)


# ---------------------------------------------------------------------------------------------------------------------
# item 1: every setting has a resume rule; applied ones are really used, refused ones say why
def test_every_setting_has_a_resume_rule():
    dests = {f.dest for f in OPT.FLAGS} - set(OPT.NOT_IN_CONFIG)
    ruled = set(R.APPLIED) | set(R.REFUSED)
    assert dests <= ruled, dests - ruled
    assert not set(R.APPLIED) & set(R.REFUSED)


def test_a_new_lr_schedule_and_length_on_resume_are_used_as_printed(tmp_path, base_run, data_dir, capsys):  # noqa: F811
    new = ["--learning_rate", "5e-4", "--lr_scheduler", "linear", "--lr_warmup_steps", "1", "--max_train_steps", "6",
           "--adam_weight_decay", "0.1"]
    fresh = tmp_path / "fresh"
    train(fresh, data_dir, "--checkpointing_steps", "0", *new)
    run = copy_run(base_run, tmp_path / "resumed")
    train(run, data_dir, "--checkpointing_steps", "2", "--resume_from_checkpoint", "checkpoint-2", *new)
    out = capsys.readouterr().out
    assert "learning_rate: 0.001 -> 0.0005 (applied from the resumed step" in out
    assert "lr_scheduler: 'cosine' -> 'linear'" in out and "max_train_steps: 4 -> 6" in out
    fresh_lr = {r["step"]: r["lr"] for r in T.read_log(fresh / "out")}
    resumed_lr = {r["step"]: r["lr"] for r in T.read_log(run / "out")}
    assert [resumed_lr[s] for s in (3, 4, 5, 6)] == [fresh_lr[s] for s in (3, 4, 5, 6)]  # the new schedule, exactly
    opt = torch.load(run / "out" / "checkpoint-6" / "optimizer.bin", weights_only=True)
    assert {g["weight_decay"] for g in opt["param_groups"]} == {0.1}
    assert {g["initial_lr"] for g in opt["param_groups"]} == {5e-4}


@pytest.mark.parametrize("flag,value,reason", [
    ("--seed", "1", "the data order and the noise of every step derive from it"),
    ("--train_batch_size", "4", "samples would be skipped or repeated"),
    ("--gradient_accumulation_steps", "2", "samples would be skipped or repeated"),
    ("--resolution", "16", "the tuners would continue on other data"),
    ("--prediction_type", "v_prediction", "the tuners learned the other target"),
])
def test_a_setting_that_cannot_change_on_resume_is_refused_before_loading(tmp_path, base_run, data_dir, no_models,  # noqa: F811
                                                                         capsys, flag, value, reason):
    run = copy_run(base_run, tmp_path)
    assert T.main(cli_args(run, data_dir, "--resume_from_checkpoint", "latest", flag, value)) == 2
    err = capsys.readouterr().err
    assert "checkpoint-4: cannot resume with changed settings" in err and reason in err and flag[2:] in err


def test_another_tuner_config_of_the_same_shapes_is_refused(tmp_path, base_run, data_dir, no_models, capsys):  # noqa: F811
    run = copy_run(base_run, tmp_path)
    relu = [{**SMALL["res_adapter"], "act": "relu"}, SMALL["res_prompt"]]
    assert T.main(cli_args(run, data_dir, "--resume_from_checkpoint", "latest", tuners=relu)) == 2
    err = capsys.readouterr().err
    assert "tuners" in err and "'act': 'gelu'" in err and "'act': 'relu'" in err


def test_another_data_set_is_refused_before_loading_models(tmp_path, base_run, data_dir, no_models, capsys):  # noqa: F811
    run = copy_run(base_run, tmp_path)
    other = tmp_path / "other"
    shutil.copytree(data_dir, other)
    meta = other / "metadata.jsonl"
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    rows[0]["text"] = "a different caption"
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert T.main(cli_args(run, other, "--resume_from_checkpoint", "latest")) == 2
    assert "data: another data set" in capsys.readouterr().err


def test_a_moved_data_folder_resumes(tmp_path, base_run, data_dir, capsys):  # noqa: F811
    run = copy_run(base_run, tmp_path)
    moved = tmp_path / "moved"
    shutil.copytree(data_dir, moved)
    train(run, moved, "--max_train_steps", "5", "--checkpointing_steps", "0", "--resume_from_checkpoint", "latest")
    assert "resumed from" in capsys.readouterr().out


def test_another_base_model_is_refused(tmp_path, base_run, data_dir, capsys):  # noqa: F811
    run = copy_run(base_run, tmp_path)
    save_components(build_tiny_sd(seed=1), tmp_path / "other-tiny")  # same architecture, other weights
    argv = cli_args(run, data_dir, "--resume_from_checkpoint", "latest", "--pretrained_model_name_or_path",
                    str(tmp_path / "other-tiny"))
    assert T.main(argv) == 2
    assert "base_model: another base model" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# item 2: the checkpoint named after a NaN is one from which a lower LR gets past it
def drift(model) -> float:
    """How far the zero-initialised tuner tensors have moved (the res_adapter up-projection, res_prompt's λ)."""
    return sum(float(p.detach().abs().sum()) for n, p in model.tuners.named_parameters() if ".up." in n or "lam" in n)


def test_after_a_nan_the_named_checkpoint_recovers_with_a_lower_lr(tmp_path, data_dir, monkeypatch, capsys):  # noqa: F811
    loss, seen, limit = LOOP.task_losses, [], []

    def diverging(model, *args, **kwargs):  # the loss overflows once the weights have drifted past a limit
        seen.append(drift(model))
        value = loss(model, *args, **kwargs)
        return value * float("nan") if limit and seen[-1] > limit[0] else value

    monkeypatch.setattr(LOOP, "task_losses", diverging)
    common = ["--max_train_steps", "8", "--checkpointing_steps", "1", "--lr_scheduler", "constant"]
    train(tmp_path, data_dir, *common, "--learning_rate", "1e-2")  # lr 1e-2: drift grows by ~8 a step
    limit.append((seen[4] + seen[5]) / 2)  # step 6 (from the weights of step 5) is the first over the limit
    seen.clear()

    for name in [f"checkpoint-{s}" for s in range(6, 9)]:
        shutil.rmtree(tmp_path / "out" / name)  # as if the run had stopped at step 6
    with pytest.raises(T.NonFiniteLossError) as err:  # checkpoint-5's weights give the nan, whatever the LR
        train(tmp_path, data_dir, *common, "--learning_rate", "5e-4", "--resume_from_checkpoint", "checkpoint-5")
    message = str(err.value)
    assert message.startswith("step 6: loss is nan; the update was not applied")
    assert f"--resume_from_checkpoint {tmp_path / 'out' / 'checkpoint-4'} and a lower --learning_rate" in message

    seen.clear()
    train(tmp_path, data_dir, *common, "--learning_rate", "5e-4", "--resume_from_checkpoint", "checkpoint-4")
    assert [r["step"] for r in T.read_log(tmp_path / "out")] == list(range(1, 9))
    assert max(seen) < limit[0]  # the advice worked: steps 5..8 stayed below the limit


def test_non_finite_gradients_stop_before_the_update(tmp_path, data_dir, monkeypatch):  # noqa: F811
    loss, calls = LOOP.task_losses, []

    def nan_grad_at_third(model, *args, **kwargs):
        calls.append(1)
        value = loss(model, *args, **kwargs)
        if len(calls) == 3:  # finite value (sqrt(0) = 0), infinite derivative
            p = next(model.tuners.parameters())
            value = value + torch.sqrt(p.sum() * 0)
        return value

    monkeypatch.setattr(LOOP, "task_losses", nan_grad_at_third)
    with pytest.raises(T.NonFiniteLossError, match=r"step 3: the gradient norm is nan .* update was not applied"):
        train(tmp_path, data_dir, "--max_train_steps", "4", "--checkpointing_steps", "1")
    assert C.find_checkpoint(tmp_path / "out", "latest").name == "checkpoint-2"


# ---------------------------------------------------------------------------------------------------------------------
# item 3: resuming from an older checkpoint makes the abandoned newer ones unreachable
def test_resuming_from_an_older_checkpoint_moves_the_newer_ones_aside(tmp_path, base_run, data_dir, capsys):  # noqa: F811
    run = copy_run(base_run, tmp_path)
    out = run / "out"
    train(run, data_dir, "--max_train_steps", "3", "--checkpointing_steps", "0", "--resume_from_checkpoint",
          "checkpoint-2")
    assert "moved the abandoned run's newer checkpoints aside" in capsys.readouterr().out
    assert [p.name for p in C.list_checkpoints(out)] == ["checkpoint-2"]
    assert C.find_checkpoint(out, "latest").name == "checkpoint-2"
    assert [p.name for p in (out / C.ABANDONED_DIR).glob("*/checkpoint-*")] == ["checkpoint-4"]


# ---------------------------------------------------------------------------------------------------------------------
# item 5: damaged checkpoint files and a torn log line
@pytest.mark.parametrize("name", ["optimizer.bin", "scheduler.bin", "tuners.safetensors", C.STATE_FILE])
def test_a_truncated_checkpoint_file_is_named_and_latest_falls_back(tmp_path, base_run, name, capsys):
    out = copy_run(base_run, tmp_path) / "out"
    file = out / "checkpoint-4" / name
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"checkpoint-4/{name}: .*(truncated|unreadable)"):
        C.find_checkpoint(out, "checkpoint-4")
    said = []
    assert C.find_checkpoint(out, "latest", said.append) == out / "checkpoint-2"
    assert len(said) == 1 and f"skips checkpoint-4: {file}" in said[0]


def test_a_truncated_checkpoint_file_is_one_line_from_the_cli(tmp_path, base_run, data_dir, no_models, capsys):  # noqa: F811
    run = copy_run(base_run, tmp_path)
    file = run / "out" / "checkpoint-4" / "optimizer.bin"
    file.write_bytes(file.read_bytes()[:100])
    assert T.main(cli_args(run, data_dir, "--resume_from_checkpoint", "checkpoint-4")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{file}: 100 bytes where the checkpoint recorded" in err[0]


def test_a_torn_last_log_line_is_dropped_and_a_bad_middle_line_is_named(tmp_path):
    log = tmp_path / T.LOG_FILE
    log.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    said = []
    assert [r["step"] for r in T.read_log(tmp_path, say=said.append)] == [1, 2]
    assert "dropped a torn last line (line 3)" in said[0]
    log.write_text('{"step": 1, "loss": 0.5}\n{"st\n{"step": 3, "loss": 0.4}\n')
    with pytest.raises(ValueError, match=f"{log}: line 2 is not a JSON record"):
        T.read_log(tmp_path)


def test_resume_after_a_torn_log_line(tmp_path, base_run, data_dir):  # noqa: F811
    run = copy_run(base_run, tmp_path)
    log = run / "out" / T.LOG_FILE
    log.write_text(log.read_text() + '{"step": 5, "epo')  # killed during the append of step 5
    train(run, data_dir, "--max_train_steps", "5", "--checkpointing_steps", "0", "--resume_from_checkpoint", "latest")
    assert [r["step"] for r in T.read_log(run / "out")] == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------------------------------------------------------------
# item 13: unwritable output folder; full disk while checkpointing
@pytest.mark.parametrize("where", ["under_a_file", "sys"])
def test_an_unwritable_output_dir_fails_before_loading_models(tmp_path, data_dir, no_models, capsys, where):  # noqa: F811
    if where == "sys":
        if not Path("/sys").is_dir() or os.access("/sys", os.W_OK) and os.getuid() != 0:
            pytest.skip("needs a read-only /sys")
        out = Path("/sys/restune-test-out")
    else:
        (tmp_path / "a_file").write_text("x")
        out = tmp_path / "a_file" / "out"
    argv = cli_args(tmp_path, data_dir)[:-2] + ["--output_dir", str(out)]
    assert T.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{out}: cannot write to the output folder" in err[0]


@pytest.mark.slow  # over 8 s on 2 cores: the default suite stays under 5 minutes
def test_a_file_size_limit_while_checkpointing_is_one_line_and_keeps_complete_checkpoints(tmp_path, data_dir):  # noqa: F811
    argv = cli_args(tmp_path, data_dir, "--max_train_steps", "4", "--checkpointing_steps", "2")
    out = tmp_path / "out"
    T.main(argv + ["--max_train_steps", "2"])  # checkpoint-2, complete
    limit = 40_000  # optimizer.bin is ~65 kB, every other file is smaller

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run([sys.executable, str(REPO / "train_t2i.py"), *argv, "--resume_from_checkpoint", "latest"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, preexec_fn=cap)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("train_t2i.py: error: ")]
    assert len(errors) == 1 and "optimizer.bin: could not write checkpoint-4" in errors[0]
    last = errors[0]
    assert "EFBIG" in last and "checkpoint-2" in last and "Traceback" not in done.stderr
    assert [p.name for p in C.list_checkpoints(out)] == ["checkpoint-2"] and not list(out.glob(".checkpoint-*"))


def test_a_full_disk_while_checkpointing_names_enospc_and_the_file(tmp_path, data_dir, monkeypatch, capsys):  # noqa: F811
    import errno

    save = torch.save

    def full(obj, f, *args, **kwargs):
        if str(f).endswith("scheduler.bin"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    assert T.main(cli_args(tmp_path, data_dir, "--max_train_steps", "2", "--checkpointing_steps", "2")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train_t2i.py: error: ")]
    assert len(err) == 1 and "scheduler.bin: could not write checkpoint-2 (ENOSPC: No space left on device)" in err[0]
    assert not list((tmp_path / "out").glob("*checkpoint-*"))


def test_the_resolved_config_of_a_resumed_run_still_parses(tmp_path, base_run):
    config = yaml.safe_load((base_run / "out" / T.CONFIG_FILE).read_text())
    assert config["data"]["resolution"] == 32


@pytest.mark.parametrize("key", sorted(R.REFUSED) + sorted(R.FINGERPRINTS))
def test_every_refused_setting_is_named_with_its_reason(tmp_path, key):
    with pytest.raises(ValueError) as err:
        R.compare_settings(tmp_path, {key: 1, "learning_rate": 1.0}, {key: 2, "learning_rate": 1.0})
    reason = R.REFUSED.get(key) or R.FINGERPRINTS[key]
    message = str(err.value)
    assert "cannot resume with changed settings" in message and key in message and reason in message


@pytest.mark.parametrize("key", sorted(R.APPLIED))
def test_every_applied_setting_resumes_and_the_log_names_the_real_changes(tmp_path, key):
    notes = R.compare_settings(tmp_path, {key: 1}, {key: 2})
    quiet = R.APPLIED[key] == "bookkeeping" or R.APPLIED[key].startswith("checked")
    assert notes == ([] if quiet else [f"{key}: 1 -> 2 (applied from the resumed step: {R.APPLIED[key]})"])
