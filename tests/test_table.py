"""The paper's table in one command (restune_diffusion/table.py, reproduce_table.py) on the pretrained tiny base, the
demo data, a tiny COCO folder and a random Inception: every row end to end, equality with the separate train_t2i +
eval_fid commands it replaces, a rerun that keeps finished rows, a kill -9 mid-run then a rerun, 2 processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_fid import _coco, weights  # noqa: F401  (weights: the random-Inception fixture)

from restune_diffusion import table as TB
from restune_diffusion import train as T
from restune_diffusion.cli import run_cli
from restune_diffusion.evaluation.runner import evaluate

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--pretrained_model_name_or_path", "tiny", "--dataset", "demo", "--max_train_steps", "2",
         "--train_batch_size", "2", "--checkpointing_steps", "1", "--num_validation_images", "0", "--seed", "0"]
EVAL = {"num_samples": 4, "eval_steps": 2, "eval_batch_size": 4}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """In-process runs build Accelerators; accelerate keeps process-wide singletons."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def table_argv(out: Path, coco: Path, weights: Path, *extra: str, rows=None) -> list[str]:  # noqa: F811
    argv = [*TRAIN, "--coco_dir", str(coco), "--inception_weights", str(weights), "--output_dir", str(out),
            "--stats_cache_dir", str(out.parent / "fid_cache"), *extra]
    for flag, value in EVAL.items():
        argv += [f"--{flag}", str(value)]
    return argv + (["--rows", *rows] if rows else [])


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    return _coco(tmp_path_factory.mktemp("coco") / "coco", n=4)


@pytest.fixture(scope="module")
def full_table(tmp_path_factory, coco, weights):  # noqa: F811
    """The default rows (the base and the paper's seven configs), uninterrupted, in this process."""
    from accelerate.state import AcceleratorState, GradientState

    out = tmp_path_factory.mktemp("table") / "table"
    argv = table_argv(out, coco, weights)
    started = time.perf_counter()
    result = TB.main(argv)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return out, argv, result, time.perf_counter() - started


def numbers(table: dict) -> dict:
    """What must not change between two runs of the same table: quality and sizes (memory and time are measured)."""
    return {r["row"]: (r["fid"], r["kid_mean"], r["clip_score"], r["params"], r.get("global_step"))
            for r in table["rows"]}


@pytest.mark.slow  # over 8 s on 2 cores: the default suite stays under 5 minutes
def test_the_default_table_trains_and_evaluates_every_row_and_writes_the_papers_format(full_table):
    out, _, result, seconds = full_table
    stored = json.loads((out / "table.json").read_text())
    assert [r["row"] for r in stored["rows"]] == list(TB.DEFAULT_ROWS)
    assert numbers(stored) == numbers(result)
    by = {r["row"]: r for r in stored["rows"]}
    for name in TB.PAPER_ROWS:
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["global_step"] == 2 and (out / name / T.TUNERS_FILE).is_file()
        row = by[name]
        assert row["params"] == summary["trainable_params"] > 0 and row["memory_gb"] > 0
        assert row["steps_per_epoch"] == 32  # 64 demo images / batch 2
        assert row["hours_per_epoch"] == pytest.approx(summary["train_seconds"] / summary["steps_run"] * 32 / 3600)
        assert row["paper"]["fid"] == TB.PAPER[name]["fid"] and row["n"] == 4
        assert row["vs_full"]["params_m"] == pytest.approx(row["params"] / by["full"]["params"])
    assert by["full"]["params_percent"] == pytest.approx(100) and by["full"]["vs_full"]["memory_gb"] == 1
    assert by["base"]["params"] == 0 and by["base"]["memory_gb"] is None and by["base"]["fid"] > 0
    assert len({r["fid"] for r in stored["rows"]}) == len(stored["rows"])  # every row its own images
    assert by["res_tuning_bypass"]["paper"]["vs_full"]["memory_gb"] == pytest.approx(21.35 / 72.77)
    md = (out / "table.md").read_text()
    assert "| Res-Tuning-Bypass | " in md and "| SD v1.5 | " in md and "13.96" in md and "ratio to Full" in md
    assert (out / "table.png").stat().st_size > 1000 and (out / "demo_data" / "metadata.jsonl").is_file()
    assert not any((out / name / "demo_data").exists() for name in TB.PAPER_ROWS)  # one data set for all rows
    print(f"full tiny table: {seconds:.1f} s")


def test_the_tables_numbers_equal_the_separate_commands(full_table, coco, weights, tmp_path):  # noqa: F811
    out, _, result, _ = full_table
    sep = tmp_path / "lora"
    assert T.main(["--config", str(REPO / "configs" / "lora.yaml"), *TRAIN, "--data_dir", str(out / "demo_data"),
                   "--output_dir", str(sep)]) == 0
    evaluated = evaluate("tiny", coco, tmp_path / "eval", tuners=[str(sep / T.TUNERS_FILE)], base=True,
                         guidance_scales=[7.5], num_samples=4, seed=0, steps=2, batch_size=4, inception_weights=weights,
                         stats_cache_dir=tmp_path / "cache")
    by = {r["row"]: r for r in result["rows"]}
    separate = {r["model"]: r for r in evaluated["rows"]}
    assert separate["lora"]["fid"] == by["lora"]["fid"] and separate["base"]["fid"] == by["base"]["fid"]
    mine, theirs = load_file(sep / T.TUNERS_FILE), load_file(out / "lora" / T.TUNERS_FILE)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)  # same training
    summary = json.loads((sep / "summary.json").read_text())
    assert summary["trainable_params"] == by["lora"]["params"]


@pytest.mark.slow  # over 8 s on 2 cores: the default suite stays under 5 minutes
def test_a_rerun_keeps_finished_rows_and_refuses_one_finished_with_other_settings(full_table, capsys):
    out, argv, result, _ = full_table
    before = {name: (out / name / T.TUNERS_FILE).stat().st_mtime_ns for name in TB.PAPER_ROWS}
    again = TB.main(argv)
    assert numbers(again) == numbers(result)
    assert [r.get("tuners_sha256") for r in again["rows"]] == [r.get("tuners_sha256") for r in result["rows"]]
    assert before == {name: (out / name / T.TUNERS_FILE).stat().st_mtime_ns for name in TB.PAPER_ROWS}
    assert capsys.readouterr().out.count(": finished, kept") == len(TB.PAPER_ROWS)
    assert run_cli(TB.main, "reproduce_table.py", [*argv, "--learning_rate", "1e-3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the models' loading bars
    assert err.startswith("reproduce_table.py: error: ") and "learning_rate: 0.0001 there, 0.001 now" in err
    assert "Delete" in err


@pytest.mark.parametrize("extra, message", [
    (["--max_train_stepz", "2"], "--max_train_stepz"),
    (["--config", "configs/lora.yaml"], "--config: not taken by reproduce_table.py"),
    (["--rows", "lora", "nope"], "--rows nope: expected 'base', a config name"),
    (["--rows", "base"], "at least one row to train"),
    (["--train_batch_size", "x"], "--train_batch_size"),
])
def test_a_bad_flag_or_row_is_one_line_before_anything_trains(tmp_path, coco, weights, capsys, extra, message):  # noqa: F811
    argv = table_argv(tmp_path / "out", coco, weights, *extra)
    assert run_cli(TB.main, "reproduce_table.py", argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("reproduce_table.py: error:") and message in err, err
    assert not (tmp_path / "out").exists()


def test_a_row_yaml_may_not_change_the_shared_settings(tmp_path, coco, weights, capsys):  # noqa: F811
    mine = tmp_path / "mine.yaml"
    mine.write_text("tuners: [{type: res_adapter, dim: 4}]\ntrain: {gradient_accumulation_steps: 2}\n")
    argv = table_argv(tmp_path / "out", coco, weights, rows=["lora", str(mine)])
    assert run_cli(TB.main, "reproduce_table.py", argv) == 2
    err = capsys.readouterr().err
    assert "gradient_accumulation_steps is 2 where" in err and "same data, steps, batch, seed and precision" in err


# ---------------------------------------------------------------------------------------------------------------------
# subprocesses
def cli(argv: list[str], cwd: Path, launcher=(sys.executable,), timeout: float = 600):
    return subprocess.run([*launcher, str(REPO / "reproduce_table.py"), *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def kill_when(argv: list[str], cwd: Path, ready) -> None:
    proc = subprocess.Popen([sys.executable, str(REPO / "reproduce_table.py"), *argv], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 600
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"


@pytest.mark.slow  # three runs of the table in subprocesses: ~1.5 min on 2 busy cores
def test_kill_9_mid_training_and_mid_evaluation_then_a_rerun_completes_the_same_table(full_table, tmp_path):
    out, argv, result, _ = full_table
    out2 = tmp_path / "table"
    argv2 = [a if a != str(out) else str(out2) for a in argv]
    kill_when(argv2, tmp_path, lambda: (out2 / "prefix" / "checkpoint-1" / T.STATE_FILE).exists())
    assert (out2 / "lora" / "summary.json").is_file() and not (out2 / "prefix" / "summary.json").exists()
    kill_when(argv2, tmp_path, lambda: (out2 / "eval" / "lora" / "cfg7.5" / "00000.png").exists())
    assert (out2 / "res_tuning_bypass" / "summary.json").is_file() and not (out2 / "table.json").exists()
    done = cli(argv2, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(": finished, kept") == len(TB.PAPER_ROWS)
    assert numbers(json.loads((out2 / "table.json").read_text())) == numbers(result)  # = the uninterrupted table


@pytest.mark.slow  # two torchrun processes: ~1.5 min on 2 busy cores
def test_torchrun_with_two_processes_writes_the_table_once_and_reruns_keep_every_row(full_table, tmp_path):
    out, argv, result, _ = full_table
    out2 = tmp_path / "table"
    argv2 = [a if a != str(out) else str(out2) for a in argv] + ["--rows", "base", "lora", "res_tuning_bypass"]
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    done = cli(argv2, tmp_path, torchrun)
    assert done.returncode == 0, done.stderr[-3000:]
    table = json.loads((out2 / "table.json").read_text())
    assert table["train"]["num_processes"] == 2 and table["eval"]["num_processes"] == 2
    assert done.stdout.count("table.md, table.json, table.png") == 1  # written by the main process
    by = {r["row"]: r for r in table["rows"]}
    assert by["base"]["fid"] == {r["row"]: r for r in result["rows"]}["base"]["fid"]  # N processes = 1 process
    assert [r["step"] for r in T.read_log(out2 / "lora")] == [1, 2]  # one writer
    again = cli(argv2, tmp_path, torchrun)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count(": finished, kept") == 2
    assert numbers(json.loads((out2 / "table.json").read_text())) == numbers(table)


# ---------------------------------------------------------------------------------------------------------------------
# --column: each trained row once more with a remedy's flags (issue 25), shown beside the row
def test_a_column_trains_each_row_once_more_with_its_flags(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    columns = TB.parse_columns([f"preserved=--preservation_prompts {prompts} --preservation_weight 0.5"])
    rows = TB.plan_rows(["base", "lora", "res_tuning"], TRAIN, tmp_path / "out", columns)
    assert [r.name for r in rows] == ["base", "lora", "lora+preserved", "res_tuning", "res_tuning+preserved"]
    twin, plain = rows[2], rows[1]
    assert twin.column == "preserved" and twin.of == "lora" and twin.label == "LoRA + preserved"
    assert twin.args.preservation_weight == 0.5 and twin.args.preservation_prompts == str(prompts)
    assert plain.args.preservation_weight == 0.0 and plain.args.preservation_prompts is None
    assert Path(twin.args.output_dir) == tmp_path / "out" / "lora+preserved"
    assert twin.args.max_train_steps == plain.args.max_train_steps == 2  # the table's flags apply to both


@pytest.mark.parametrize("spec, message", [
    ("preserved", "expected NAME=FLAGS"),
    ("bad name=--preservation_weight 1", "expected NAME=FLAGS"),
    ("x=preservation_weight 1", "expected train_t2i.py flags"),
    ("x=--class_prompt 'a", "do not parse as a command line"),
    ("x=--output_dir elsewhere", "--output_dir: not taken by reproduce_table.py"),
    ("x=--preservation_wieght 1", "--preservation_wieght"),
])
def test_a_bad_column_is_one_line_before_anything_trains(tmp_path, coco, weights, capsys, spec, message):  # noqa: F811
    argv = table_argv(tmp_path / "out", coco, weights, "--column", spec, rows=["lora"])
    assert run_cli(TB.main, "reproduce_table.py", argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line and "Loading weights" not in line]
    assert len(err) == 1 and err[0].startswith("reproduce_table.py: error:") and message in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # two rows trained and evaluated: ~20 s on 2 cores
def test_a_column_row_is_trained_evaluated_and_shown_beside_its_row(tmp_path, coco, weights):  # noqa: F811
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a white background\n")
    out = tmp_path / "out"
    table = TB.main(table_argv(out, coco, weights, "--column",
                               f"preserved=--preservation_prompts {prompts} --preservation_weight 2", rows=["lora"]))
    by = {r["row"]: r for r in table["rows"]}
    assert list(by) == ["lora", "lora+preserved"] and by["lora+preserved"]["of"] == "lora"
    assert json.loads((out / "lora+preserved" / "summary.json").read_text())["global_step"] == 2
    a, b = (load_file(out / name / T.TUNERS_FILE) for name in ("lora", "lora+preserved"))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)  # the extra loss changed training
    assert by["lora+preserved"]["fid"] != by["lora"]["fid"]
    md = (out / "table.md").read_text()
    assert "| LoRA + preserved |" not in md.split("With each --column")[0]  # not a row of the paper's table
    assert f"preserved: `--preservation_prompts {prompts} --preservation_weight 2`" in md
    row = next(line for line in md.split("With each --column")[1].splitlines() if line.startswith("| LoRA |"))
    assert f"{by['lora+preserved']['fid']:.2f} | {by['lora+preserved']['fid'] - by['lora']['fid']:+.2f}" in row
    assert json.loads((out / "table.json").read_text())["columns"] == {
        "preserved": f"--preservation_prompts {prompts} --preservation_weight 2"}
