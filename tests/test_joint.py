"""Joint bypass training (restune_diffusion/train/joint.py, issue 18): K bypasses in one backbone pass per step equal
the same bypasses trained alone (with aspect-ratio buckets too); kill -9 + resume equals the uninterrupted joint run;
2 processes; the K results load as K tasks of generate_multitask."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_train import REPO, cli_args, crash_after_checkpoint, data_dir, fresh_accelerate_state  # noqa: F401 (fixtures)

from restune_diffusion import train as T
from restune_diffusion.train import loop as LOOP
from restune_diffusion.train.checkpoints import find_checkpoint

TASKS = {  # three bypasses that differ in shape, activation and learning rate
    "wide": ({"type": "bypass"}, {"learning_rate": 2e-3}),
    "narrow": ({"type": "bypass", "hidden_ratio": 0.25}, {"learning_rate": 1e-3, "lr_scheduler": "constant"}),
    "relu": ({"type": "bypass", "act": "relu", "groups": 2}, {"learning_rate": 3e-3, "max_grad_norm": 0.5}),
}


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def write_configs(folder: Path, names=tuple(TASKS)) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        tuner, train = TASKS[name]
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"tuners": [tuner], "train": train}))
        paths.append(str(path))
    return paths


def joint_argv(tmp: Path, data: Path, *extra: str, names=tuple(TASKS)) -> list[str]:
    argv = cli_args(tmp, data, *extra)
    i = argv.index("--config")
    argv[i:i + 2] = [x for p in write_configs(tmp / "configs", names) for x in ("--config", p)]
    for flag in ("--learning_rate", "--lr_scheduler"):  # per task, from each config
        i = argv.index(flag)
        del argv[i:i + 2]
    return argv


def assert_same_tensors(a: Path, b: Path, atol: float = 1e-6):
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=atol, msg=k)


def test_three_joint_bypasses_equal_each_trained_alone(tmp_path, data_dir):  # noqa: F811
    steps = ["--max_train_steps", "5", "--checkpointing_steps", "0", "--gradient_accumulation_steps", "2",
             "--snr_gamma", "5"]
    reset_accelerate()
    summaries = T.train(T.parse_args(joint_argv(tmp_path / "joint", data_dir, *steps)))
    assert list(summaries) == list(TASKS)
    for name in TASKS:
        alone = tmp_path / name
        argv = joint_argv(alone, data_dir, *steps, names=(name,))
        reset_accelerate()
        T.train(T.parse_args(argv))
        joint = tmp_path / "joint" / "out" / name
        assert_same_tensors(joint / T.TUNERS_FILE, alone / "out" / T.TUNERS_FILE)
        la, lb = T.read_log(joint), T.read_log(alone / "out")
        assert [r["lr"] for r in la] == [r["lr"] for r in lb]
        assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], abs=1e-6)
        again = T.parse_args(["--config", str(joint / T.CONFIG_FILE)])  # the task's config trains it alone
        assert again.tuners == [TASKS[name][0]] and again.learning_rate == TASKS[name][1]["learning_rate"]


def test_non_bypass_tuners_are_refused_by_name(tmp_path):
    paths = write_configs(tmp_path, ("wide",))
    (tmp_path / "adapter.yaml").write_text(yaml.safe_dump({"tuners": [{"type": "res_adapter", "dim": 4}]}))
    with pytest.raises(ValueError, match=r"adapter.yaml: a joint run shares one backbone pass .* \['res_adapter'\]"):
        T.parse_args(["--config", paths[0], "--config", str(tmp_path / "adapter.yaml"), "--dataset", "demo",
                      "--pretrained_model_name_or_path", "tiny-random"])


def test_shared_settings_must_agree(tmp_path):
    paths = write_configs(tmp_path, ("wide", "narrow"))
    Path(paths[1]).write_text(yaml.safe_dump({"tuners": [{"type": "bypass"}], "train": {"train_batch_size": 3}}))
    with pytest.raises(ValueError, match="train_batch_size is 3 where .* a joint run shares it"):
        T.parse_args(["--config", paths[0], "--config", paths[1], "--dataset", "demo",
                      "--pretrained_model_name_or_path", "tiny-random"])


def test_a_sweep_names_one_task_per_value(tmp_path):
    paths = write_configs(tmp_path, ("wide",))
    args = T.parse_args(["--config", paths[0], "--sweep_learning_rate", "1e-3", "3e-3", "--sweep_seed", "0", "1",
                         "--dataset", "demo", "--pretrained_model_name_or_path", "tiny-random"])
    assert [t["name"] for t in args.tasks] == ["wide-lr0.001-seed0", "wide-lr0.001-seed1", "wide-lr0.003-seed0",
                                               "wide-lr0.003-seed1"]
    assert [(t["learning_rate"], t["seed"]) for t in args.tasks] == [(1e-3, 0), (1e-3, 1), (3e-3, 0), (3e-3, 1)]


def test_a_crash_then_resume_of_a_joint_run_equals_the_uninterrupted_one(tmp_path, data_dir, monkeypatch):  # noqa: F811
    """In this process: a crash right after checkpoint-4, then --resume_from_checkpoint latest (the kill -9 of the
    script: the slow test below)."""
    common = ["--max_train_steps", "8", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2"]
    names = ("wide", "narrow")
    reset_accelerate()
    T.train(T.parse_args(joint_argv(tmp_path / "a", data_dir, *common, names=names)))
    argv = joint_argv(tmp_path / "b", data_dir, *common, names=names)
    reset_accelerate()
    crash_after_checkpoint(monkeypatch, argv, 4)
    summaries = T.train(T.parse_args(argv + ["--resume_from_checkpoint", "latest"]))
    a, b = tmp_path / "a" / "out", tmp_path / "b" / "out"
    for name in names:
        assert summaries[name]["steps_run"] == 4
        assert_same_tensors(a / name / T.TUNERS_FILE, b / name / T.TUNERS_FILE, atol=0)
        assert_same_tensors(a / "checkpoint-8" / name / T.TUNERS_FILE, b / "checkpoint-8" / name / T.TUNERS_FILE,
                            atol=0)
        assert T.read_log(a / name) == T.read_log(b / name)
    oa, ob = (torch.load(p / "checkpoint-8" / "optimizer.bin", weights_only=True) for p in (a, b))
    assert all(torch.equal(oa["state"][k]["exp_avg_sq"], ob["state"][k]["exp_avg_sq"]) for k in oa["state"])


@pytest.mark.slow  # three script runs; the same resume in-process: the test above
def test_kill_9_then_resume_of_a_joint_run_equals_the_uninterrupted_one(tmp_path, data_dir):  # noqa: F811
    common = ["--max_train_steps", "8", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2"]
    names = ("wide", "narrow")
    straight = subprocess.run([sys.executable, str(REPO / "train_t2i.py"), *joint_argv(tmp_path / "a", data_dir,
                               *common, names=names)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    argv = joint_argv(tmp_path / "b", data_dir, *common, names=names)
    out = tmp_path / "b" / "out"
    proc = subprocess.Popen([sys.executable, str(REPO / "train_t2i.py"), *argv], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoint-4" / T.STATE_FILE).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = find_checkpoint(out, "latest")
    resumed = subprocess.run([sys.executable, str(REPO / "train_t2i.py"), *argv, "--resume_from_checkpoint",
                              "latest"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {killed_at}" in resumed.stdout
    for name in names:
        a, b = tmp_path / "a" / "out", out
        assert_same_tensors(a / name / T.TUNERS_FILE, b / name / T.TUNERS_FILE, atol=0)
        assert_same_tensors(a / "checkpoint-8" / name / T.TUNERS_FILE, b / "checkpoint-8" / name / T.TUNERS_FILE,
                            atol=0)
        assert T.read_log(a / name) == T.read_log(b / name)
    oa, ob = (torch.load(p / "checkpoint-8" / "optimizer.bin", weights_only=True)
              for p in (tmp_path / "a" / "out", out))
    assert all(torch.equal(oa["state"][k]["exp_avg_sq"], ob["state"][k]["exp_avg_sq"]) for k in oa["state"])


@pytest.mark.slow  # the single run's torchrun test (test_train.py) runs the same loop in the default suite
def test_torchrun_with_two_processes_trains_a_joint_run(tmp_path, data_dir):  # noqa: F811
    argv = joint_argv(tmp_path, data_dir, "--max_train_steps", "4", "--checkpointing_steps", "2",
                      names=("wide", "narrow"))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "train_t2i.py"), *argv], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes" in done.stdout
    out = tmp_path / "out"
    for name in ("wide", "narrow"):
        assert [r["step"] for r in T.read_log(out / name)] == [1, 2, 3, 4]  # one writer
        tensors = load_file(out / name / T.TUNERS_FILE)
        assert any(v.abs().sum() > 0 for k, v in tensors.items() if ".up." in k)
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in (out / "checkpoint-4").iterdir()}


def test_the_joint_results_load_as_tasks_of_generate_multitask(tmp_path, data_dir):  # noqa: F811
    from restune_diffusion.models import build_pipeline, build_tiny_sd
    from restune_diffusion.multitask import generate_multitask

    reset_accelerate()
    T.train(T.parse_args(joint_argv(tmp_path, data_dir, "--max_train_steps", "4", "--checkpointing_steps",
                                          "0", names=("wide", "narrow"))))
    pipe = build_pipeline(build_tiny_sd())
    tasks = {name: tmp_path / "out" / name / T.TUNERS_FILE for name in ("wide", "narrow")}
    images = generate_multitask(pipe, tasks, "a red circle", steps=2, seed=0, output_type="np")
    assert set(images) == set(tasks) and not (images["wide"] == images["narrow"]).all()


def test_a_yaml_list_of_tasks_is_a_joint_run(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "train": {"train_batch_size": 3, "learning_rate": 1e-3},
        "tasks": [{"name": "g4", "tuners": [{"type": "bypass"}]},
                  {"name": "g2", "tuners": [{"type": "bypass", "groups": 2}], "train": {"learning_rate": 5e-4}}]}))
    args = T.parse_args(["--config", str(path), "--dataset", "demo", "--pretrained_model_name_or_path", "tiny-random"])
    assert [(t["name"], t["learning_rate"]) for t in args.tasks] == [("g4", 1e-3), ("g2", 5e-4)]
    assert args.train_batch_size == 3 and args.config_name == "g4+g2"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"tasks": [{"name": "a", "tuners": [{"type": "bypass"}],
                                              "train": {"train_batch_size": 2}}]}))
    with pytest.raises(ValueError, match=r"bad.yaml: tasks\[0\]: train: keys \['train_batch_size'\] are shared"):
        T.parse_args(["--config", str(bad), "--dataset", "demo", "--pretrained_model_name_or_path", "tiny-random"])


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_each_task_gets_its_own_outputs_and_fp32_tuners(tmp_path, data_dir, precision):  # noqa: F811
    reset_accelerate()
    validation = ["--validation_steps", "2", "--validation_prompt", "a red circle", "--num_validation_images", "1"]
    argv = joint_argv(tmp_path, data_dir, "--max_train_steps", "2", "--checkpointing_steps", "0", "--mixed_precision",
                      precision, *(validation if precision == "no" else []), names=("wide", "narrow"))
    summaries = T.train(T.parse_args(argv))
    for name in ("wide", "narrow"):
        folder = tmp_path / "out" / name
        files = ["loss.png", T.TUNERS_FILE, T.CONFIG_FILE, "summary.json", T.LOG_FILE]
        for file in files + (["validation/step-2.png", "samples.png"] if precision == "no" else []):
            assert (folder / file).is_file(), (name, file)
        tensors = load_file(folder / T.TUNERS_FILE)
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in tensors.values())
        assert summaries[name]["global_step"] == 2 and summaries[name]["trainable_params"] > 0


def test_a_joint_resume_refuses_changed_tasks(tmp_path, data_dir, capsys):  # noqa: F811
    reset_accelerate()
    argv = joint_argv(tmp_path, data_dir, "--max_train_steps", "2", "--checkpointing_steps", "2",
                      names=("wide", "narrow"))
    T.train(T.parse_args(argv))
    reset_accelerate()
    TASKS["narrow"][1]["learning_rate"] *= 2
    try:
        changed = joint_argv(tmp_path, data_dir, "--max_train_steps", "3", "--resume_from_checkpoint", "latest",
                             names=("wide", "narrow"))
    finally:
        TASKS["narrow"][1]["learning_rate"] /= 2
    assert T.main(changed) == 2
    assert "cannot resume with changed settings: tasks" in capsys.readouterr().err


def test_fp16_joint_equals_alone(tmp_path, data_dir):  # noqa: F811
    """fp16 frozen weights under one optimizer for all tasks. On CPU accelerate has no grad scaler: the scaler path
    (unscale once per step for the one optimizer, then per-task clipping) runs only on CUDA."""
    steps = ["--max_train_steps", "3", "--checkpointing_steps", "0", "--mixed_precision", "fp16"]
    reset_accelerate()
    T.train(T.parse_args(joint_argv(tmp_path / "joint", data_dir, *steps, names=("wide", "narrow"))))
    reset_accelerate()
    T.train(T.parse_args(joint_argv(tmp_path / "alone", data_dir, *steps, names=("narrow",))))
    joint, alone = tmp_path / "joint" / "out" / "narrow", tmp_path / "alone" / "out"
    assert_same_tensors(joint / T.TUNERS_FILE, alone / T.TUNERS_FILE)


def test_a_joint_run_of_one_task_equals_the_single_run_bit_for_bit(tmp_path, data_dir):  # noqa: F811
    """K = 1: the same loop, optimizer, loss and schedule; only the folders and the shared pass's routing differ."""
    steps = ["--max_train_steps", "5", "--checkpointing_steps", "5", "--gradient_accumulation_steps", "2",
             "--snr_gamma", "5", "--validation_split", "0.25"]
    reset_accelerate()
    single = tmp_path / "single" / "out"
    T.train(T.parse_args(cli_args(tmp_path / "single", data_dir, *steps, tuners=[TASKS["wide"][0]])))
    reset_accelerate()
    joint = tmp_path / "joint" / "out"
    args = T.parse_args(cli_args(tmp_path / "joint", data_dir, *steps, "--sweep_seed", "0",
                                 tuners=[TASKS["wide"][0]]))
    assert [t["name"] for t in args.tasks] == ["config-seed0"]
    T.train(args)
    task = joint / "config-seed0"
    assert_same_tensors(task / T.TUNERS_FILE, single / T.TUNERS_FILE, atol=0)
    assert_same_tensors(joint / "checkpoint-5" / "config-seed0" / T.TUNERS_FILE,
                        single / "checkpoint-5" / T.TUNERS_FILE, atol=0)
    assert T.read_log(task) == T.read_log(single)  # losses, held-out losses and LRs, exactly
    oa, ob = (torch.load(p / "checkpoint-5" / "optimizer.bin", weights_only=True) for p in (joint, single))
    assert all(torch.equal(oa["state"][k][m], ob["state"][k][m]) for k in ob["state"] for m in ("exp_avg",
                                                                                                "exp_avg_sq"))


def test_a_joint_run_with_buckets_equals_each_bypass_trained_alone(tmp_path, monkeypatch):
    """--enable_bucket: every step's batch has its bucket's size, shared by the K bypasses' one backbone pass; each
    bypass (tensors, losses, held-out losses batched by bucket) equals its alone run with buckets."""
    from test_buckets import write_mixed

    root = write_mixed(tmp_path / "mixed")
    common = ["--max_train_steps", "4", "--checkpointing_steps", "0", "--gradient_accumulation_steps", "2",
              "--enable_bucket", "--validation_split", "0.2", "--validation_steps", "2"]
    names = ("wide", "narrow")
    sizes, micro = [], LOOP.micro_step

    def spy(run, batch, epoch, index):
        sizes.append(tuple(batch["pixel_values"].shape[-2:]))
        return micro(run, batch, epoch, index)

    monkeypatch.setattr(LOOP, "micro_step", spy)
    reset_accelerate()
    T.train(T.parse_args(joint_argv(tmp_path / "joint", root, *common, names=names)))
    assert len(set(sizes)) > 1  # several buckets trained in one joint run
    assert (tmp_path / "joint" / "out" / "bucket_table.json").is_file()
    for name in names:
        reset_accelerate()
        T.train(T.parse_args(joint_argv(tmp_path / name, root, *common, names=(name,))))
        joint, alone = tmp_path / "joint" / "out" / name, tmp_path / name / "out"
        assert_same_tensors(joint / T.TUNERS_FILE, alone / T.TUNERS_FILE)
        la, lb = T.read_log(joint), T.read_log(alone)
        for key in ("loss", "val_loss"):
            assert [r.get(key) for r in la] == pytest.approx([r.get(key) for r in lb], abs=1e-6)
        assert any(r.get("val_loss") is not None for r in la)
