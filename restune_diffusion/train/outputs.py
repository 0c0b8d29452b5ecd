"""What a run leaves in each task's folder (the output folder, or `<output_dir>/<task>/` in a joint run): the log of
every step (train_log.jsonl), the resolved config (train_config.yaml: `--config` on it repeats the task alone), and
at the end the tuner file (+ EMA, + diffusers' LoRA file for a LoRA or DoRA, + kohya's for a LoRA), the last
validation grid as samples.png, the loss curve, summary.json and the model card. Written by the main process; files
atomically.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from restune_diffusion.ema import EMA_FILE
from restune_diffusion.exports import DIFFUSERS_LORA_FILE, has_diffusers_format, save_diffusers_lora, save_kohya_lora
from restune_diffusion.files import atomic_write, atomic_write_text
from restune_diffusion.memory import peak_memory_bytes
from restune_diffusion.modelcard import CARD_FILE, write_model_card
from restune_diffusion.train.checkpoints import write_error
from restune_diffusion.train.options import write_resolved_config
from restune_diffusion.tuners import to_dicts
from restune_diffusion.weights import save_tuners

TUNERS_FILE = "tuners.safetensors"
CONFIG_FILE = "train_config.yaml"  # the resolved config: `--config` on it repeats the run
LOG_FILE = "train_log.jsonl"
LORA_FILE = DIFFUSERS_LORA_FILE
KOHYA_LORA_FILE = "lora_kohya.safetensors"  # A1111/ComfyUI/kohya naming


def read_log(output_dir: Path, upto: int | None = None, say=None) -> list[dict]:
    """The per-step records of train_log.jsonl. A torn last line (a kill during the append) is dropped, and named
    through `say`; a bad line before the last is an error naming the file and line."""
    path = Path(output_dir) / LOG_FILE
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("no step")
        except ValueError:
            if number == len(lines):
                if say is not None:
                    say(f"warning: {path}: dropped a torn last line (line {number}); its step is replayed")
                break
            raise ValueError(f"{path}: line {number} is not a JSON record with a step: {line[:80]!r}") from None
        records.append(record)
    return [r for r in records if upto is None or r["step"] <= upto]


def start_outputs(task, global_step: int, say) -> None:
    """At the start (or resume) of a run: the log cut back to the resumed step (later steps are replayed) and the
    resolved config written. Main process."""
    task.output_dir.mkdir(parents=True, exist_ok=True)
    records = read_log(task.output_dir, upto=global_step, say=say)
    atomic_write_text(task.output_dir / LOG_FILE, "".join(json.dumps(r) + "\n" for r in records))
    write_resolved_config(task.args, task.output_dir / CONFIG_FILE)


def log_step(task, record: dict, output_dir: Path) -> None:
    """Append one step's record to the task's log; a full disk is one line naming the file (DiskWriteError)."""
    path = task.output_dir / LOG_FILE
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:
        raise write_error(path, f"the log line of step {record['step']}", err, output_dir) from err


def plot_losses(records: list[dict], path: Path) -> Path:
    """Loss per step, its exponential moving average and the held-out loss where measured, as a PNG (matplotlib's
    Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps, losses = [r["step"] for r in records], [r["loss"] for r in records]
    ema, smooth = [], losses[0] if losses else 0.0
    for value in losses:
        smooth = 0.9 * smooth + 0.1 * value
        ema.append(smooth)
    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(steps, losses, alpha=0.35, label="loss")
    ax.plot(steps, ema, label="moving average (0.9)")
    held = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if held:
        ax.plot(*zip(*held), marker="o", label="held-out loss (fixed noise and timesteps)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def export(run, task, seconds: float, steps_run: int) -> dict:
    """Final tuners (+ EMA, + diffusers' LoRA/DoRA and kohya's LoRA files), sample grid, loss curve, summary and
    model card of one task; main process (the others return {})."""
    if not run.accelerator.is_main_process:
        return {}
    out, handle = task.output_dir, task.handle  # the tensors of the unwrapped model: keys without DDP's `module.`
    header = {k: str(v) for k, v in header_facts(run, task).items() if v is not None}
    files = {"tuners": str(save_tuners(out / TUNERS_FILE, handle, extra_metadata=header))}
    if task.ema is not None:
        files["tuners_ema"] = str(task.ema.save(out / EMA_FILE, header))
    if has_diffusers_format(handle):  # LoRA, DoRA
        files["lora"] = str(save_diffusers_lora(out, handle))
    if any(c.type == "lora" for c in handle.configs):
        files["lora_kohya"] = str(save_kohya_lora(out / KOHYA_LORA_FILE, handle,
                                                  base_model=task.args.pretrained_model_name_or_path))
    grid = out / "validation" / f"step-{run.global_step}.png"
    if grid.is_file():
        files["samples"] = str(atomic_write(out / "samples.png", lambda tmp: shutil.copyfile(grid, tmp)))
    records = read_log(out)
    held = [r for r in records if r.get("val_loss") is not None]
    atomic_write_text(out / "losses.json", json.dumps({
        "step": [r["step"] for r in records], "loss": [r["loss"] for r in records],
        "val_step": [r["step"] for r in held], "val_loss": [r["val_loss"] for r in held]}))
    if records:
        files["loss_curve"] = str(plot_losses(records, out / "loss.png"))
    files["model_card"] = str(out / CARD_FILE)
    summary = summarize(run, task, files, seconds, steps_run, records)
    write_model_card(out, summary)
    return summary


def header_facts(run, task) -> dict:
    """What the tuner file's header records about its making (weights.py): base, steps, data (a task on data of its
    own: its data set's)."""
    args, settings = task.args, run.settings
    parts = getattr(run.loader.dataset, "parts", None)
    own = parts[run.tasks.index(task)] if parts else run.loader.dataset
    return {"base_model": str(args.pretrained_model_name_or_path), "base_model_revision": args.revision,
            "base_model_variant": args.variant, "base_model_fingerprint": settings.get("base_model"),
            "global_step": run.global_step, "dataset": args.dataset, "data_dir": str(args.data_dir),
            "num_train_samples": len(own), "data_fingerprint": task.data_fingerprint or settings.get("data")}


def summarize(run, task, files: dict, seconds: float, steps_run: int, records: list | None = None) -> dict:
    """summary.json: sizes, memory, time, and the facts of the model card (modelcard.py) and the file header."""
    args, a = task.args, run.accelerator
    unet_params = sum(p.numel() for p in run.sd.unet.parameters())
    trainable = task.handle.num_parameters()
    peak, how = peak_memory_bytes(a.device)
    facts = header_facts(run, task)
    held = [r["val_loss"] for r in records or [] if r.get("val_loss") is not None]
    summary = {"global_step": run.global_step, "trainable_params": trainable, "unet_params": unet_params,
               "trainable_percent": 100 * trainable / unet_params, "peak_memory_bytes": peak,
               "peak_memory_kind": how, "train_seconds": seconds, "steps_run": steps_run,
               "name": args.config_name, "tuners": to_dicts(task.handle.configs),
               "base_model": {k.removeprefix("base_model_") if k != "base_model" else "name": facts[k]
                              for k in facts if k.startswith("base_model")},
               "data": {"dataset": args.dataset, "data_dir": str(args.data_dir),
                        "num_train_samples": facts["num_train_samples"], "fingerprint": facts["data_fingerprint"],
                        "num_heldout_samples": len(run.heldout) if run.heldout is not None else 0,
                        "validation_split": args.validation_split, "resolution": args.resolution},
               "training": {"train_batch_size": args.train_batch_size, "num_processes": a.num_processes,
                            "gradient_accumulation_steps": args.gradient_accumulation_steps,
                            "learning_rate": args.learning_rate, "lr_scheduler": args.lr_scheduler,
                            "mixed_precision": a.mixed_precision, "seed": args.seed, "use_ema": args.use_ema,
                            "ema_decay": args.ema_decay if args.use_ema else None,
                            "validation_prompt": args.validation_prompt or []},
               "final_loss": records[-1]["loss"] if records else None, "final_val_loss": held[-1] if held else None,
               "files": files}
    atomic_write_text(task.output_dir / "summary.json", json.dumps(summary, indent=1))
    rate = f"{steps_run / seconds:.2f} steps/s" if seconds > 0 and steps_run else "no steps run"
    a.print(f"\n{task.name}: trainable parameters: {trainable:,} ({summary['trainable_percent']:.3f}% of the UNet's "
            f"{unet_params:,})\npeak memory: {peak / 2**30:.2f} GiB ({how})\ntrained to step {run.global_step} in "
            f"{seconds:.1f} s ({rate})\n" + "".join(f"{name}: {path}\n" for name, path in files.items()))
    return summary
