"""The paper's SD v1.5 table in one command (arXiv 2310.19859, SD v1.5 on COCO2017; issue 16): every row trained by
train.train with the same data, steps, batch, seed and precision, then all rows and the untuned base evaluated by one
evaluation.runner.evaluate call (same captions, seeds and cached real statistics) -> table.md (ours beside the
paper's numbers, and each as a ratio to Full), table.json, table.png (FID vs training memory).

Layout: `<output_dir>/<row>/` is each row's training run, `<output_dir>/eval/` the evaluation. Resumable at every
level: a finished row (summary.json at the requested step, trained with this table's settings) is kept; any other row
is trained with `--resume_from_checkpoint latest` (a fresh run when it has no checkpoint); the evaluation skips the
images already on disk. Under `accelerate launch` / `torchrun` every process runs this; training and evaluation use
them all, the table files are written by the main process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from restune_diffusion import train as T
from restune_diffusion.evaluation.clip_score import resolve_clip_folder
from restune_diffusion.evaluation.coco import read_captions
from restune_diffusion.evaluation.inception import resolve_inception_weights
from restune_diffusion.evaluation.runner import evaluate
from restune_diffusion.files import atomic_write_text, file_sha256
from restune_diffusion.memory import reset_peak_memory
from restune_diffusion.methods import BASE, CONFIG_DIR, label, paper_methods
from restune_diffusion.paper import PAPER, PAPER_SOURCE
from restune_diffusion.sampling import SamplingSettings, add_sampling_args
from restune_diffusion.table_report import METRICS, markdown, plot, ratio
from restune_diffusion.train.options import DATA_KEYS, resolved_config
from restune_diffusion.tuners import parse_tuner_configs

PAPER_ROWS = paper_methods()  # the paper's tuned rows; sc_tuner (and any method of ours) on request
DEFAULT_ROWS = (BASE, *PAPER_ROWS)
EVAL_FLAGS = {"steps": "--eval_steps", "batch_size": "--eval_batch_size"}  # the evaluation's; --seed is training's
GB = 1e9
EVAL_DIR = "eval"
DEMO_DIR = "demo_data"
RESERVED = (BASE, EVAL_DIR, DEMO_DIR)
# the table owns these train_t2i.py flags: rows come from --rows, folders from --output_dir, resume is automatic
OWNED_FLAGS = {"--config": "give rows with --rows (config names or YAML paths)",
               "--output_dir": "each row trains into <--output_dir>/<row>",
               "--resume_from_checkpoint": "the table resumes every unfinished row from its latest checkpoint",
               "--sweep_learning_rate": "a sweep is a joint run (train_t2i.py), not a table row",
               "--sweep_seed": "a sweep is a joint run (train_t2i.py), not a table row"}
# settings a finished row may have been trained with differently and still be reused (they change no number)
BOOKKEEPING = ("checkpointing_steps", "checkpoints_total_limit", "validation_prompt", "num_validation_images",
               "validation_steps", "validation_epochs", "report_to", "output_dir", "dataloader_num_workers")
# what every row must share: the same data, steps, batch, seed and precision (a row YAML's train:/data: may not
# change them); learning rate and optimizer settings may differ per row
SHARED = (*DATA_KEYS, "pretrained_model_name_or_path", "train_batch_size", "gradient_accumulation_steps",
          "max_train_steps", "num_train_epochs", "seed", "mixed_precision", "gradient_checkpointing",
          "prediction_type", "noise_offset")


class TableParser(argparse.ArgumentParser):
    """argparse whose errors are ValueErrors: one line through cli.run_cli, no usage block."""

    def error(self, message: str):
        raise ValueError(f"{message} (`{self.prog} --help` lists the table's flags; every train_t2i.py flag is "
                         "taken too)")


def build_parser() -> argparse.ArgumentParser:
    p = TableParser(prog="reproduce_table.py", allow_abbrev=False,
                    description="The paper's SD v1.5 table: train every row, evaluate them and the base together, "
                    "write table.md / table.json / table.png. Every other flag goes to train_t2i.py, the same for "
                    "every row (python train_t2i.py --help).")
    p.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS),
                   help=f"'base' (the untuned model), names of configs/<name>.yaml, or YAML paths (the row is the "
                   f"file stem); default: {' '.join(DEFAULT_ROWS)}")
    p.add_argument("--column", action="append", default=[], metavar="NAME=FLAGS",
                   help="a column of the table: every trained row is trained once more with these train_t2i.py "
                   "flags, as row <row>+NAME, and shown beside the row (FID, memory, hours/epoch), e.g. --column "
                   "'preserved=--preservation_prompts prompts.txt --preservation_weight 0.5' or --column "
                   "'prior=--with_prior_preservation --class_data_dir class --class_prompt \"a photo\"'; repeatable")
    p.add_argument("--output_dir", default=os.path.join("outputs", "table"),
                   help="<row>/ per training run, eval/, table.md, table.json, table.png")
    e = p.add_argument_group("evaluation (eval_fid.py's COCO protocol)")
    e.add_argument("--coco_dir", required=True, help="COCO root: annotations/captions_val2017.json, val2017/")
    e.add_argument("--num_samples", type=int, help="N captions (default 5000 = all of val2017; 64 for tiny)")
    e.add_argument("--eval_mixed_precision", choices=("no", "fp16", "bf16"), default="no",
                   help="dtype of the generating model; the Inception and CLIP run in fp32")
    e.add_argument("--inception_weights", help="pt_inception-2015-12-05-6726825d.pth (or $RESTUNE_FID_INCEPTION)")
    e.add_argument("--clip_model", help="local CLIP folder: adds the CLIP score column (or $RESTUNE_CLIP_MODEL)")
    e.add_argument("--stats_cache_dir", help="real-feature cache (default ~/.cache/restune_diffusion/fid_stats)")
    add_sampling_args(p, SamplingSettings(batch_size=8), flags=EVAL_FLAGS, omit=("seed", "negative_prompt",
                      "karras_sigmas"), helps={"batch_size": "and the Inception's feature batch"})
    return p


@dataclass
class Row:
    name: str
    config: Path | None  # None: the untuned base
    args: argparse.Namespace | None = None  # train.parse_args of the row
    column: str | None = None  # a --column's name: this row is <of>+<column>, trained with the column's flags
    of: str | None = None  # the row it is a column of

    @property
    def label(self) -> str:
        return f"{label(self.of)} + {self.column}" if self.column else label(self.name)


COLUMN_NAME = re.compile(r"[A-Za-z0-9_-]{1,40}")


def parse_columns(specs: list[str]) -> list[tuple[str, list[str]]]:
    """--column NAME=FLAGS entries -> [(name, train_t2i.py flags)]; named one-line errors for a bad entry."""
    columns = []
    for spec in specs:
        name, sep, flags = spec.partition("=")
        name = name.strip()
        if not sep or not COLUMN_NAME.fullmatch(name):
            raise ValueError(f"--column {spec!r}: expected NAME=FLAGS with NAME of letters, digits, _ or - (at most "
                             "40), e.g. 'preserved=--preservation_weight 0.5 --preservation_prompts p.txt'")
        try:
            argv = shlex.split(flags)
        except ValueError as err:
            raise ValueError(f"--column {name}: its flags do not parse as a command line ({err})") from None
        if not argv or not argv[0].startswith("--"):
            raise ValueError(f"--column {name}: expected train_t2i.py flags after '=', got {flags!r}")
        if name in (c for c, _ in columns):
            raise ValueError(f"--column {name}: given twice")
        columns.append((name, argv))
    return columns


# ---------------------------------------------------------------------------------------------------------------------
# rows and their settings
def row_config(spec: str) -> tuple[str, Path | None]:
    """--rows entry -> (row name, YAML): 'base', a shipped config name, or a YAML path (named by its stem)."""
    if spec == BASE:
        return BASE, None
    if spec.endswith((".yaml", ".yml")):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"--rows {spec}: no such YAML file")
        return path.stem, path
    path = CONFIG_DIR / f"{spec}.yaml"
    if not path.is_file():
        shipped = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
        raise ValueError(f"--rows {spec}: expected 'base', a config name ({', '.join(shipped) or 'none shipped'}) or "
                         "a path to a YAML with a tuners: list")
    return spec, path


def check_train_flags(train_argv: list[str]) -> None:
    for token in train_argv:
        flag = token.split("=", 1)[0]
        if flag in OWNED_FLAGS:
            raise ValueError(f"{flag}: not taken by reproduce_table.py: {OWNED_FLAGS[flag]}")


def plan_rows(specs: list[str], train_argv: list[str], output_dir: Path,
              columns: list[tuple[str, list[str]]] = ()) -> list[Row]:
    """Each row's train_t2i.py arguments: the row's YAML, the table's train flags, <output_dir>/<row>, resume latest;
    after each trained row, one row per --column (<row>+<column>: the same plus the column's flags). Named errors (a
    bad flag, an unknown row, rows that would not share data/steps/batch/seed/precision) before any model loads."""
    check_train_flags(train_argv)
    for _, flags in columns:
        check_train_flags(flags)
    rows = []
    for spec in specs:
        row = Row(*row_config(spec))
        rows.append(row)
        if row.config is not None:
            rows += [Row(f"{row.name}+{name}", row.config, column=name, of=row.name) for name, _ in columns]
    column_flags = dict(columns)
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"--rows: each row needs its own name (config names / YAML stems), got {names}")
    for row in rows:
        if row.config is not None and row.name in RESERVED:
            raise ValueError(f"--rows {row.config}: the row name {row.name!r} is reserved for the table's "
                             f"{row.name}/ entry; rename the file")
    if all(r.config is None for r in rows):
        raise ValueError("--rows: expected at least one row to train (the base alone: eval_fid.py --base)")
    for row in rows:
        if row.config is None:
            continue
        row.args = T.parse_args(["--config", str(row.config), *train_argv, *column_flags.get(row.column, []),
                                 "--output_dir", str(output_dir / row.name), "--resume_from_checkpoint", "latest"])
        if getattr(row.args, "tasks", None):
            raise ValueError(f"--rows {row.config}: a joint config (tasks: list) is not a table row; give each "
                             "tuner set its own YAML")
        if row.args.dataset == "demo" and Path(row.args.data_dir) == output_dir / row.name / DEMO_DIR:
            row.args.data_dir = str(output_dir / DEMO_DIR)  # one demo data set for every row
    trained = [r for r in rows if r.args is not None]
    for row in trained[1:]:
        first = trained[0]
        for key in SHARED:
            a, b = getattr(first.args, key, None), getattr(row.args, key, None)
            if a != b:
                raise ValueError(f"--rows {row.config}: {key} is {b!r} where {first.config} has {a!r}; every row "
                                 f"of the table trains with the same data, steps, batch, seed and precision. Set "
                                 f"it with a flag (or remove it from the YAML's train:/data:)")
    return rows


def comparable(config: dict) -> dict:
    """The settings of a resolved config (train.resolved_config or a run's train_config.yaml) that change numbers."""
    flat = {**(config.get("train") or {}), **(config.get("data") or {}), "tuners": config.get("tuners")}
    return {k: v for k, v in flat.items() if k not in BOOKKEEPING}


def steps_per_epoch(summary: dict) -> int | None:
    """Optimizer steps in one pass over the training data, from the run's summary (as train.prepare_run counts)."""
    data, training = summary.get("data") or {}, summary.get("training") or {}
    n, batch = data.get("num_train_samples"), training.get("train_batch_size")
    procs, accum = training.get("num_processes"), training.get("gradient_accumulation_steps")
    if not all(isinstance(v, int) and v > 0 for v in (n, batch, procs, accum)):
        return None
    return math.ceil(math.ceil(math.ceil(n / batch) / procs) / accum)


def requested_steps(args: argparse.Namespace, summary: dict) -> int | None:
    if args.max_train_steps:
        return args.max_train_steps
    per_epoch = steps_per_epoch(summary)
    return args.num_train_epochs * per_epoch if per_epoch else None


def read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable ({err}); delete it (the row is then trained again)") from None
    return value if isinstance(value, dict) else None


def row_finished(row: Row) -> bool:
    """True when the row's run ended at the requested step with this table's settings; a finished row trained with
    other settings is an error naming them (reusing it would put another experiment in the table)."""
    out = Path(row.args.output_dir)
    summary = read_json(out / "summary.json")
    if summary is None or not (out / T.TUNERS_FILE).is_file():
        return False
    if summary.get("global_step") != requested_steps(row.args, summary):
        return False
    saved_path = out / T.CONFIG_FILE
    saved = yaml.safe_load(saved_path.read_text()) if saved_path.is_file() else None
    if not isinstance(saved, dict):
        raise ValueError(f"{saved_path}: missing or unreadable; cannot tell which settings trained row {row.name}. "
                         f"Delete {out} to train the row again")
    now = comparable(yaml.safe_load(yaml.safe_dump(resolved_config(row.args), sort_keys=False)))
    then = comparable(saved)
    differ = [f"{k}: {then.get(k)!r} there, {now.get(k)!r} now" for k in sorted(set(now) | set(then))
              if then.get(k) != now.get(k)]
    if differ:
        raise ValueError(f"{out}: row {row.name} finished with other settings than this table's "
                         f"({'; '.join(differ)}). Delete {out} to train it again, or rerun with its settings")
    return True


# ---------------------------------------------------------------------------------------------------------------------
# processes and memory
def process_state():
    """accelerate's process state, set up as train.make_accelerator does (torchrun on CPU: gloo)."""
    from accelerate import PartialState

    return PartialState(cpu=int(os.environ.get("LOCAL_RANK", -1)) != -1 and not torch.cuda.is_available())


def broadcast(state, value):
    """The main process's value on every process (decisions made from files the main process reads)."""
    if state.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def trains_the_unet(row: Row) -> bool:
    """Full fine-tuning: loading its file copies every UNet weight in place, and detaching it does not copy them back,
    so a tuner file evaluated after it in the same evaluate() call would sit on the fine-tuned UNet. Such rows go
    last (each of them sets every weight, so they do not affect one another)."""
    return any(c.type == "full" for c in parse_tuner_configs(row.args.tuners))


def remove_stale_images(eval_dir: Path, row: Row, say) -> None:
    """A row trained again after an earlier evaluation: its images there came from other weights; remove them."""
    sha = file_sha256(Path(row.args.output_dir) / T.TUNERS_FILE)
    for record in sorted((eval_dir / row.name).glob("cfg*/generation.json")):
        if (read_json(record) or {}).get("tuners_sha256") != sha:
            shutil.rmtree(record.parent)
            say(f"{record.parent}: images of earlier weights of row {row.name} removed")


# ---------------------------------------------------------------------------------------------------------------------
# the table
def table_rows(rows: list[Row], result: dict, guidance_scale: float) -> list[dict]:
    """One dict per row: our numbers (summary.json + the evaluation), the paper's, and both as ratios to Full."""
    measured = {r["model"]: r for r in result["rows"] if r["guidance_scale"] == guidance_scale}
    out = []
    for row in rows:
        ev = measured[row.name]
        entry = {"row": row.name, "label": row.label, "config": str(row.config) if row.config else None,
                 "column": row.column, "of": row.of,
                 "learning_rate": row.args.learning_rate if row.args else None,
                 "fid": ev["fid"], "kid_mean": ev["kid_mean"], "clip_score": ev["clip_score"], "n": ev["n"],
                 "images": ev["images"], "params": 0, "params_m": None, "params_percent": None, "memory_gb": None,
                 "hours_per_epoch": None}
        if row.args is not None:
            summary = read_json(Path(row.args.output_dir) / "summary.json")
            per_epoch = steps_per_epoch(summary)
            seconds_per_step = summary["train_seconds"] / summary["steps_run"] if summary["steps_run"] else None
            entry.update({
                "params": summary["trainable_params"], "params_m": summary["trainable_params"] / 1e6,
                "params_percent": summary["trainable_percent"], "unet_params": summary["unet_params"],
                "memory_gb": summary["peak_memory_bytes"] / GB, "memory_kind": summary["peak_memory_kind"],
                "train_seconds": summary["train_seconds"], "steps_run": summary["steps_run"],
                "global_step": summary["global_step"], "steps_per_epoch": per_epoch,
                "seconds_per_step": seconds_per_step,
                "hours_per_epoch": seconds_per_step * per_epoch / 3600 if seconds_per_step and per_epoch else None,
                "tuners": str(Path(row.args.output_dir) / T.TUNERS_FILE), "tuners_sha256": ev["tuners_sha256"]})
        entry["paper"] = dict(PAPER[row.name]) if row.name in PAPER else None
        out.append(entry)
    full = next((e for e in out if e["row"] == "full"), None)
    for entry in out:
        entry["vs_full"] = {m: ratio(entry[m], full[m] if full else None) for m in METRICS}
        if entry["paper"] is not None:
            entry["paper"]["vs_full"] = {m: ratio(entry["paper"][m], PAPER["full"][m]) for m in METRICS}
    return out


def write_table(rows: list[Row], result: dict, opts: argparse.Namespace, memory_reset: bool, out: Path) -> dict:
    first = next(r for r in rows if r.args is not None)
    summary = read_json(Path(first.args.output_dir) / "summary.json")
    training = summary.get("training") or {}
    train = {**{k: getattr(first.args, k, None) for k in SHARED}, "steps": summary["global_step"],
             "num_processes": training.get("num_processes"),
             "mixed_precision": training.get("mixed_precision", first.args.mixed_precision)}
    keep = ("n", "num_real", "seed", "steps", "scheduler", "resolution", "batch_size", "mixed_precision", "coco",
            "inception_sha256", "clip_model", "num_processes", "warnings", "protocol", "protocol_version")
    table = {"rows": table_rows(rows, result, opts.guidance_scale), "train": train,
             "eval": {**{k: result.get(k) for k in keep}, "guidance_scale": opts.guidance_scale,
                      "eval_json": str(out / EVAL_DIR / "eval.json")},
             "memory_reset": memory_reset, "paper_source": PAPER_SOURCE,
             "columns": {name: shlex.join(flags) for name, flags in opts.columns}}
    atomic_write_text(out / "table.json", json.dumps(table, indent=2) + "\n")
    atomic_write_text(out / "table.md", markdown(table))
    plot(table, out / "table.png")
    return table


# ---------------------------------------------------------------------------------------------------------------------
def check_eval_inputs(opts: argparse.Namespace) -> None:
    """Named errors for the evaluation's inputs before hours of training."""
    read_captions(opts.coco_dir)
    resolve_inception_weights(opts.inception_weights)
    resolve_clip_folder(opts.clip_model)
    for name in ("num_samples", "eval_steps", "eval_batch_size"):
        value = getattr(opts, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name}: expected a positive integer, got {value}")


def main(argv: list[str] | None = None) -> dict | None:
    """Train every row, evaluate every row and the base in one call, write the table. Returns the table on the main
    process, None on the others."""
    opts, train_argv = build_parser().parse_known_args(argv)
    out = Path(opts.output_dir)
    opts.columns = parse_columns(opts.column)
    rows = plan_rows(opts.rows, train_argv, out, opts.columns)
    check_eval_inputs(opts)
    trained = [r for r in rows if r.args is not None]
    try:
        state = process_state()
        try:
            finished = [row_finished(r) for r in trained] if state.is_main_process else None
        except ValueError as err:  # every process stops with the same message
            finished = str(err)
        finished = broadcast(state, finished)
        if isinstance(finished, str):
            raise ValueError(finished)
        memory_reset = True
        for row, done in zip(trained, finished):
            if done:
                state.print(f"row {row.name}: finished, kept ({row.args.output_dir})")
                continue
            state.print(f"row {row.name}: training into {row.args.output_dir} (from its latest checkpoint, if any)")
            memory_reset = reset_peak_memory(state.device) and memory_reset
            T.train(row.args)
            state.wait_for_everyone()
        if state.is_main_process:
            for row in trained:
                remove_stale_images(out / EVAL_DIR, row, state.print)
        state.wait_for_everyone()
        first = trained[0].args
        result = evaluate(
            first.pretrained_model_name_or_path, opts.coco_dir, out / EVAL_DIR,
            tuners=[str(Path(r.args.output_dir) / T.TUNERS_FILE) for r in sorted(trained, key=trains_the_unet)],
            base=any(r.name == BASE for r in rows), guidance_scales=[opts.guidance_scale],
            num_samples=opts.num_samples, seed=first.seed, steps=opts.eval_steps, scheduler=opts.scheduler,
            resolution=first.resolution, batch_size=opts.eval_batch_size, inception_weights=opts.inception_weights,
            clip_model=opts.clip_model, stats_cache_dir=opts.stats_cache_dir,
            mixed_precision=opts.eval_mixed_precision)
        table = None
        if state.is_main_process:
            table = write_table(rows, result, opts, memory_reset, out)
            state.print(markdown(table))
            state.print(f"-> {out / 'table.md'}, table.json, table.png")
        state.wait_for_everyone()
    finally:  # the group train.train keeps for the next row
        T.close_process_group()
    return table
