"""Joint bypass runs whose tasks read their own data (joint.py, routed; issue 23's multi-task story): one backbone pass
on K·B rows, task k's own B rows through bypass k; each bypass equals the bypass trained alone on its data, a crash +
resume equals the uninterrupted run, and what a routed run cannot take is refused in one line."""

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_joint import TASKS, assert_same_tensors, joint_argv, reset_accelerate
from test_train import cli_args, crash_after_checkpoint

from restune_diffusion import train as T
from restune_diffusion.data import TaskDatasets, make_demo_dataset, task_collate
from restune_diffusion.train import loop as LOOP
from restune_diffusion.train.joint import routed

NAMES = ("wide", "narrow")


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    """Two imagefolders of 12 captioned shapes each, drawn with other seeds (other images and captions)."""
    root = tmp_path_factory.mktemp("sets")
    return {name: make_demo_dataset(root / name, num_images=12, resolution=32, seed=seed)
            for name, seed in zip(NAMES, (3, 4))}


def routed_argv(tmp: Path, data: dict, *extra: str) -> list[str]:
    """A YAML `tasks:` list, each task with its tuners, train: and its own data: data_dir."""
    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / "joint.yaml"
    config.write_text(yaml.safe_dump({"tasks": [
        {"name": name, "tuners": [TASKS[name][0]], "train": TASKS[name][1], "data": {"data_dir": str(folder)}}
        for name, folder in data.items()]}))
    argv = cli_args(tmp, Path("unused"), *extra)
    argv[argv.index("--config") + 1] = str(config)
    for flag in ("--data_dir", "--learning_rate", "--lr_scheduler"):  # per task, from the YAML
        i = argv.index(flag)
        del argv[i:i + 2]
    return argv


STEPS = ("--max_train_steps", "5", "--checkpointing_steps", "0", "--gradient_accumulation_steps", "2",
         "--snr_gamma", "5")


def test_bypasses_on_their_own_data_equal_each_trained_alone_in_one_backbone_pass(tmp_path, two_sets, monkeypatch):
    rows, micro = [], LOOP.micro_step

    def spy(run, batch, epoch, index):
        rows.append((len(batch["captions"]), batch["task_rows"], batch["paths"][:1] + batch["paths"][2:3]))
        return micro(run, batch, epoch, index)

    monkeypatch.setattr(LOOP, "micro_step", spy)
    forwards = []
    args = T.parse_args(routed_argv(tmp_path / "joint", two_sets, *STEPS))
    assert routed(args) and [t["data"]["data_dir"] for t in args.tasks] == [str(two_sets[n]) for n in NAMES]
    reset_accelerate()
    from diffusers import UNet2DConditionModel

    unet_forward = UNet2DConditionModel.forward

    def count(self, sample, *a, **k):
        forwards.append(sample.shape[0])
        return unet_forward(self, sample, *a, **k)

    monkeypatch.setattr(UNet2DConditionModel, "forward", count)
    T.train(args)
    monkeypatch.setattr(UNet2DConditionModel, "forward", unet_forward)
    monkeypatch.setattr(LOOP, "micro_step", micro)
    assert forwards[:len(rows)] == [4] * len(rows)  # one backbone pass of K·B = 2·2 rows per micro-step
    for total, per_task, (first, other) in rows:
        assert (total, per_task) == (4, 2)
        assert Path(first).parent == two_sets["wide"] and Path(other).parent == two_sets["narrow"]
    for name in NAMES:
        reset_accelerate()
        T.train(T.parse_args(joint_argv(tmp_path / name, two_sets[name], *STEPS, names=(name,))))
        joint, alone = tmp_path / "joint" / "out" / name, tmp_path / name / "out"
        assert_same_tensors(joint / T.TUNERS_FILE, alone / T.TUNERS_FILE)
        la, lb = T.read_log(joint), T.read_log(alone)
        assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], abs=1e-6)
        again = T.parse_args(["--config", str(joint / T.CONFIG_FILE)])  # the task's config trains it alone, on its data
        assert again.data_dir == str(two_sets[name]) and again.tasks is None
        summary, own = (yaml.safe_load((p / "summary.json").read_text())["data"] for p in (joint, alone))
        assert summary["data_dir"] == str(two_sets[name]) and summary["num_train_samples"] == 12
        assert summary["fingerprint"] == own["fingerprint"]  # its own data set's, as its alone run records


def test_a_crash_then_resume_of_a_routed_run_equals_the_uninterrupted_one(tmp_path, two_sets, monkeypatch):
    common = ("--max_train_steps", "6", "--checkpointing_steps", "2")
    reset_accelerate()
    T.train(T.parse_args(routed_argv(tmp_path / "a", two_sets, *common)))
    argv = routed_argv(tmp_path / "b", two_sets, *common)
    reset_accelerate()
    crash_after_checkpoint(monkeypatch, argv, 4)
    T.train(T.parse_args(argv + ["--resume_from_checkpoint", "latest"]))
    for name in NAMES:
        a, b = (tmp_path / run / "out" / name / T.TUNERS_FILE for run in ("a", "b"))
        assert_same_tensors(a, b)


def test_a_resume_on_other_data_for_one_task_is_refused(tmp_path, two_sets, capsys):
    reset_accelerate()
    T.train(T.parse_args(routed_argv(tmp_path, two_sets, "--max_train_steps", "2", "--checkpointing_steps", "2")))
    swapped = {"wide": two_sets["narrow"], "narrow": two_sets["wide"]}
    reset_accelerate()
    argv = routed_argv(tmp_path, swapped, "--max_train_steps", "3", "--resume_from_checkpoint", "latest")
    assert T.main(argv) == 2
    assert "another data set" in capsys.readouterr().err


def test_several_configs_with_their_own_data_sections_route_too(tmp_path, two_sets):
    paths = []
    for name in NAMES:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"tuners": [TASKS[name][0]], "data": {"data_dir": str(two_sets[name]),
                                                                              "caption_mode": "first"}}))
        paths += ["--config", str(path)]
    args = T.parse_args([*paths, "--pretrained_model_name_or_path", "tiny-random"])
    assert routed(args) and [t["data"]["dataset"] for t in args.tasks] == ["auto", "auto"]
    assert [t["data"]["data_dir"] for t in args.tasks] == [str(two_sets[n]) for n in NAMES]
    same = T.parse_args([*paths, "--pretrained_model_name_or_path", "tiny-random", "--data_dir", str(two_sets["wide"])])
    assert not routed(same)  # a flag on the command line is every task's


@pytest.mark.parametrize("flags, option", [
    (("--preservation_weight", "0.5", "--class_prompt", "a circle"), "preservation_weight"),
    (("--with_prior_preservation", "--class_data_dir", "c", "--class_prompt", "a circle"), "with_prior_preservation"),
    (("--enable_bucket",), "enable_bucket"),
    (("--validation_split", "0.2"), "validation_split"),
])
def test_what_a_routed_run_cannot_take_is_refused_by_name(tmp_path, two_sets, flags, option):
    with pytest.raises(ValueError, match=rf"--{option}: the tasks of this joint run \(wide, narrow\) read different "
                                         "data"):
        T.parse_args(routed_argv(tmp_path, two_sets, *flags))


def test_a_shared_data_key_in_a_task_is_refused(tmp_path, two_sets):
    argv = routed_argv(tmp_path, two_sets)
    config = Path(argv[argv.index("--config") + 1])
    body = yaml.safe_load(config.read_text())
    body["tasks"][1]["data"]["resolution"] = 64
    config.write_text(yaml.safe_dump(body))
    with pytest.raises(ValueError, match=r"tasks\[1\]: data: keys \['resolution'\] are shared by every task"):
        T.parse_args(argv)


def test_a_shorter_data_set_cycles_over_the_longest_ones_epochs():
    long, short = [{"v": i} for i in range(5)], [{"v": 10 + i} for i in range(3)]
    data = TaskDatasets([long, short], ["long", "short"])
    assert len(data) == 5
    seen = []
    for epoch in range(2):
        data.set_epoch(epoch)
        for i in range(len(data)):
            a, b = data[i]["tasks"]
            assert a == long[i]  # the longest reads item i: its alone run's order
            seen.append(b["v"])
    counts = [seen.count(10 + j) for j in range(3)]
    assert sorted(counts) == [3, 3, 4] and sum(counts) == 10  # 10 draws over 3 items: none more than once extra
    with pytest.raises(ValueError, match="task empty: its data set has no samples"):
        TaskDatasets([long, []], ["long", "empty"])


def test_task_collate_stacks_each_tasks_rows_in_turn():
    item = lambda v, cap: {"pixel_values": torch.full((3, 2, 2), float(v)), "caption": cap, "path": f"/{cap}"}  # noqa: E731
    batch = task_collate([{"tasks": [item(0, "a0"), item(1, "b0")]}, {"tasks": [item(2, "a1"), item(3, "b1")]}])
    assert batch["task_rows"] == 2 and batch["captions"] == ["a0", "a1", "b0", "b1"]
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [0, 2, 1, 3]


def test_the_readme_example_of_one_bypass_per_data_set_parses_as_a_routed_run(tmp_path):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    body = text.split("# configs/my_sets.yaml")[1].split("```")[0].split("\n", 1)[1]
    (tmp_path / "my_sets.yaml").write_text(body)
    args = T.parse_args(["--config", str(tmp_path / "my_sets.yaml"), "--pretrained_model_name_or_path", "tiny-random"])
    assert routed(args) and [t["name"] for t in args.tasks] == ["birds", "cars", "dogs"]
    assert [t["data"]["dataset"] for t in args.tasks] == ["cub200", "stanford_cars", "stanford_dogs"]
    assert args.max_train_steps == 4000 and all(t["learning_rate"] == 1e-3 for t in args.tasks)


@pytest.mark.slow  # a bench process: 2 alone + 1 joint run of 4 steps, 4 small measurements (~1 min)
def test_the_joint_bench_quick_mode_finds_the_joint_bypasses_equal_to_the_alone_ones(tmp_path):
    import json
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(repo / "bench" / "joint_tiny.py"), "--quick", "--jobs", "1", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "joint-tiny.json").read_text())
    assert result["concepts"] == ["star", "heart"] and result["n_images_per_row"] == 24
    gaps = result["weight_gaps"]
    assert set(gaps) == {"star-seed0", "heart-seed0"} and all(g is not None and g < 1e-4 for g in gaps.values())
    for name in ("concept_drawn", "all_right", "kept"):
        assert result["stats"][name]["difference"]["mean"] == pytest.approx(0.0, abs=0.05)
    folders = [p for p in (tmp_path / "quality-tiny-runs").iterdir() if p.name.startswith("joint-")]
    assert len(folders) == 1 and {p.name for p in (folders[0] / "train").iterdir() if p.is_dir()} == {"star", "heart"}
    assert "in one backbone pass" in (tmp_path / "joint-tiny.md").read_text()


@pytest.mark.slow  # two torchrun launches of 2 processes each
def test_torchrun_with_two_processes_trains_a_routed_run_as_its_alone_runs(tmp_path, two_sets):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]

    def launch(argv, cwd):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(repo / "train_t2i.py"), *argv], cwd=cwd, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    steps = ("--max_train_steps", "3", "--checkpointing_steps", "0")
    out = launch(routed_argv(tmp_path / "joint", two_sets, *steps), tmp_path)
    assert "2 processes" in out and "each on its own data" in out
    launch(joint_argv(tmp_path / "alone", two_sets["narrow"], *steps, names=("narrow",)), tmp_path)
    joint, alone = tmp_path / "joint" / "out", tmp_path / "alone" / "out"
    assert_same_tensors(joint / "narrow" / T.TUNERS_FILE, alone / T.TUNERS_FILE)
    assert [r["step"] for r in T.read_log(joint / "wide")] == [1, 2, 3]


def test_a_routed_run_caches_each_tasks_latents_in_its_own_data_folder(tmp_path, two_sets):
    steps = ("--max_train_steps", "3", "--checkpointing_steps", "0")
    reset_accelerate()
    T.train(T.parse_args(routed_argv(tmp_path / "plain", two_sets, *steps)))
    reset_accelerate()
    T.train(T.parse_args(routed_argv(tmp_path / "cached", two_sets, *steps, "--cache_latents")))
    for name, folder in two_sets.items():
        assert len(list((folder / ".restune_cache" / "latents").iterdir())) == 1, name
        plain, cached = (load_file(tmp_path / run / "out" / name / T.TUNERS_FILE) for run in ("plain", "cached"))
        for k in plain:  # the cached posterior is sampled with an encode's draws: the numbers of the plain run
            torch.testing.assert_close(cached[k], plain[k], rtol=1e-4, atol=1e-6)
