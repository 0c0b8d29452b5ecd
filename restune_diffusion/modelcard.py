"""The model card: README.md in every training output folder (joint runs: in each task's folder), written from
summary.json's facts: base model and fingerprint, tuners and parameter count, data and steps, measured memory and
time, the sample grid and the loss curve, and how to load the result in three lines. Hugging Face's card header
(`base_model`, `library_name`, `tags`) leads, so the folder uploads to the Hub as it is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from restune_diffusion.files import atomic_write_text

CARD_FILE = "README.md"


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _value(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_value, value)) + "]"
    return value if isinstance(value, str) else json.dumps(value)


def tuner_line(config: dict) -> str:
    """`res_adapter (dim 32, targets [ff, attn2])`: the type, then every field that is set."""
    rest = ", ".join(f"{k} {_value(v)}" for k, v in config.items() if k != "type" and v is not None)
    return f"{config['type']} ({rest})" if rest else config["type"]


def base_line(base: dict) -> str:
    extra = ", ".join(f"{k} {base[k]}" for k in ("revision", "variant") if base.get(k))
    return f"{base['name']}{f' ({extra})' if extra else ''}, fingerprint {base.get('fingerprint')}"


def data_line(data: dict) -> str:
    held = data.get("num_heldout_samples") or 0
    kept = f" + {held} held out for the validation loss (--validation_split {data.get('validation_split')})" \
        if held else ""
    return (f"{data['dataset']} in {data['data_dir']}: {data['num_train_samples']:,} training samples{kept}, "
            f"{data.get('resolution')} px, fingerprint {data.get('fingerprint')}")


def load_options(base: dict) -> str:
    return "".join(f", {k}={base[k]!r}" for k in ("revision", "variant") if base.get(k))


def model_card(summary: dict, folder: str | os.PathLike) -> str:
    """The card's markdown from a training summary (train.summarize) of the run in `folder`."""
    folder = Path(folder)
    base, data, training = summary["base_model"], summary["data"], summary["training"]
    files = {k: Path(v).name for k, v in summary["files"].items()}
    batch = training["train_batch_size"] * training["num_processes"] * training["gradient_accumulation_steps"]
    seconds, steps = summary["train_seconds"], summary["steps_run"]
    rate = f", {steps / seconds:.2f} steps/s" if seconds > 0 and steps else ""
    rows = [
        ("base model", base_line(base)),
        ("tuners", "; ".join(tuner_line(c) for c in summary["tuners"])),
        ("trainable parameters", f"{summary['trainable_params']:,} ({summary['trainable_percent']:.3f}% of the "
                                 f"UNet's {summary['unet_params']:,})"),
        ("data", data_line(data)),
        ("steps", f"{summary['global_step']:,} (batch {batch} = {training['train_batch_size']} per device x "
                  f"{training['num_processes']} processes x {training['gradient_accumulation_steps']} accumulation)"),
        ("optimizer", f"AdamW, learning rate {training['learning_rate']:g}, schedule {training['lr_scheduler']}, "
                      f"mixed precision {training['mixed_precision']}, seed {training['seed']}"),
        ("peak memory", f"{summary['peak_memory_bytes'] / 2**30:.2f} GiB ({summary['peak_memory_kind']})"),
        ("training time", f"{seconds:.1f} s for {steps:,} steps in this session{rate}"),
    ]
    if summary.get("final_loss") is not None:
        rows.append(("final loss", f"{summary['final_loss']:.4f} (training)" + (
            f", {summary['final_val_loss']:.4f} (held out)" if summary.get("final_val_loss") is not None else "")))
    if training.get("use_ema"):
        rows.append(("EMA", f"decay {training['ema_decay']:g}: {files.get('tuners_ema')} (validation images use it)"))
    weights = files.get("tuners_ema") if training.get("use_ema") else files["tuners"]
    prompt = (training.get("validation_prompt") or ["a photo"])[0]
    lines = [
        "---",
        f"base_model: {base['name']}",
        "library_name: restune-diffusion",
        "tags: [stable-diffusion, text-to-image, restune-diffusion, "
        + ", ".join(dict.fromkeys(c["type"] for c in summary["tuners"])) + "]",
        "---",
        "",
        f"# {summary.get('name') or folder.name}: {', '.join(dict.fromkeys(c['type'] for c in summary['tuners']))} "
        f"tuners on {base['name']}",
        "",
        "Trained with restune-diffusion (Res-Tuning, arXiv 2310.19859). Every number below was measured in this run "
        "(summary.json).",
        "",
        "## Load it",
        "",
        "```python",
        "from restune_diffusion import load_pipeline",
        f"pipe = load_pipeline({str(base['name'])!r}, {str(folder / weights)!r}{load_options(base)})",
        f"pipe({prompt!r}).images[0].save('image.png')",
        "```",
        "",
        "## Facts",
        "",
        "| | |",
        "| --- | --- |",
        *[f"| {name} | {_cell(value)} |" for name, value in rows],
        "",
    ]
    if "samples" in files:
        prompts = "; ".join(training.get("validation_prompt") or [])
        lines += ["## Samples", "", f"Step {summary['global_step']}, one row per prompt ({_cell(prompts)}):", "",
                  f"![samples]({files['samples']})", ""]
    if "loss_curve" in files:
        lines += ["## Loss", "", f"![loss curve]({files['loss_curve']})", ""]
    lines += ["## Files", "", *[f"- `{name}` ({key})" for key, name in files.items()], ""]
    return "\n".join(lines)


def write_model_card(folder: str | os.PathLike, summary: dict) -> Path:
    return atomic_write_text(Path(folder) / CARD_FILE, model_card(summary, folder))
