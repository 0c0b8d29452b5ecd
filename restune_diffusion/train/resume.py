"""Resuming a run: what a resume may change (PITFALLS "resume must not print one setting and use another": every
setting is in exactly one of APPLIED, taking effect from the resumed step and said in the log, or REFUSED, with the
reason), the fingerprints of the base model and the data set it checks, and the resume itself: tuners, optimizer, LR
schedule, RNG and accelerate's step from `checkpoint-<step>/`, then this run's LRs and Adam settings, set once.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from restune_diffusion.train.checkpoints import STATE_FILE, checkpoint_step, read_state, set_aside_newer
from restune_diffusion.train.joint import PER_TASK
from restune_diffusion.train.optimizer import apply_settings
from restune_diffusion.train.options import preservation_prompts, resolved_config
from restune_diffusion.tuners import parse_tuner_configs, to_dicts

# a new value on resume: applied from the resumed step on (how)
APPLIED = {
    "learning_rate": "the optimizer's base LR is set to it; the schedule continues from the resumed step",
    "scale_lr": "the base LR is recomputed with it",
    "lr_scheduler": "the schedule is rebuilt with it at the resumed step",
    "lr_warmup_steps": "the schedule is rebuilt with it at the resumed step",
    "max_train_steps": "the run and its schedule end at the new step",
    "num_train_epochs": "the run and its schedule end at the new length",
    "adam_beta1": "set on the optimizer", "adam_beta2": "set on the optimizer",
    "adam_weight_decay": "set on the optimizer", "adam_epsilon": "set on the optimizer",
    "max_grad_norm": "clipping uses it", "snr_gamma": "the loss weighting uses it",
    "noise_offset": "the noise uses it", "mixed_precision": "the frozen weights and autocast use it",
    "gradient_checkpointing": "same numbers, other memory", "enable_xformers_memory_efficient_attention": "same math",
    "checkpointing_steps": "bookkeeping", "checkpoints_total_limit": "bookkeeping", "validation_prompt": "bookkeeping",
    "num_validation_images": "bookkeeping", "validation_steps": "bookkeeping", "report_to": "bookkeeping",
    "output_dir": "bookkeeping", "dataloader_num_workers": "same samples", "cache_latents": "same images",
    "latent_cache_dir": "same images", "dataset_name": "checked by the data set's fingerprint instead",
    "dataset_config_name": "checked by the data set's fingerprint instead",
    "split": "checked by the data set's fingerprint instead", "max_train_samples": "checked by the data set's "
    "fingerprint instead", "caption_template": "checked by the data set's fingerprint (it holds the captions)",
    "class_names": "checked by the data set's fingerprint (it holds the captions)",
    "caption_extension": "checked by the data set's fingerprint (it holds the captions)",
    "scan_mode": "checked by the data set's fingerprint (the images it keeps)",
    "data_dir": "checked by the data set's fingerprint instead (a moved folder is fine)",
    "dataset": "checked by the data set's fingerprint instead",
    "skip_bad_images": "checked by the data set's fingerprint instead",
    "pretrained_model_name_or_path": "checked by the base model's fingerprint instead (a moved folder is fine)",
    "world_report": "checked by the data set's fingerprint (it picks the tiny world's concept data)",
    "world_concept": "checked by the data set's fingerprint (it picks the concept's data)",
    "revision": "checked by the base model's fingerprint instead",
    "variant": "checked by the base model's fingerprint instead",
    "allow_tf32": "matmuls and convolutions use it", "ema_decay": "the average continues with it",
    "validation_epochs": "bookkeeping",
    "prior_loss_weight": "the loss weights the class half with it",
    "preservation_weight": "the loss uses it (the frozen base's prediction is computed while it is > 0)",
    "preservation_prompts": "the preservation prompts of the later steps are drawn from it",
    "preservation_prompt_list": "the preservation prompts of the later steps are drawn from it",
    "class_data_dir": "checked by the class images' fingerprint instead (a moved folder is fine)",
    "class_prompt": "checked by the class images' fingerprint (it holds their captions)",
    "num_class_images": "checked by the class images' fingerprint (the images it holds)",
    "class_scheduler": "checked by the class images' fingerprint (what drew them)",
    "class_sampling_steps": "checked by the class images' fingerprint (what drew them)",
    "class_guidance_scale": "checked by the class images' fingerprint (what drew them)",
    "sample_batch_size": "bookkeeping",
}
_DATA = "each sample would change: the tuners would continue on other data"
_POSITION = ("the data position of the checkpoint is counted in steps of the old batch: samples would be skipped or "
             "repeated")
REFUSED = {
    "seed": "the data order and the noise of every step derive from it",
    "train_batch_size": _POSITION, "gradient_accumulation_steps": _POSITION, "num_processes": _POSITION,
    "use_8bit_adam": "the optimizer state has another format",
    "prediction_type": "the tuners learned the other target",
    "resolution": _DATA, "center_crop": _DATA, "random_flip": _DATA, "caption_mode": _DATA,
    "caption_column": _DATA, "image_column": _DATA, "category": _DATA,
    "image_interpolation_mode": _DATA, "caption_dropout_rate": _DATA, "shuffle_caption": _DATA, "keep_tokens": _DATA,
    "caption_tag_dropout_rate": _DATA, "keep_tokens_separator": _DATA, "enable_bucket": _DATA,
    "min_bucket_reso": _DATA, "max_bucket_reso": _DATA, "bucket_reso_steps": _DATA,
    "tuners": "the checkpoint's tuners are other modules (same shapes or not)",
    "tasks": "a joint run's bypasses (names, tuners, per-task settings) are fixed by its checkpoints",
    "use_ema": "the EMA of the tuner weights runs from step 0: turned on at a resume it would average from there, "
               "turned off it would be dropped",
    "validation_split": "the held-out images, and so the training images, would change",
    "validation_seed": "the held-out images, and so the training images, would change",
    "with_prior_preservation": "each batch would gain or lose its class rows: the noise and timesteps of every later "
                               "step would change, and the tuners would continue under another objective",
}
FINGERPRINTS = {"base_model": "another base model", "data": "another data set (other images or captions)",
                "class_data": "other class images (prior preservation: other images, prompts or sampler)"}


def data_fingerprint(dataset) -> str:
    """A hash of the samples (path relative to the data folder, captions): another data set differs, a moved one
    does not. Tasks on their own data (data.TaskDatasets): each task's in turn."""
    if hasattr(dataset, "parts"):
        parts = [data_fingerprint(part) for part in dataset.parts]
        return hashlib.sha256(json.dumps([dataset.names, parts]).encode()).hexdigest()[:16]
    root = Path(dataset.report.data_dir) if getattr(dataset, "report", None) else None
    prefix = os.path.join(str(root), "") if root is not None else None
    digest = hashlib.sha256()
    for sample in dataset.samples:
        text = str(sample.path)
        if prefix is not None and text.startswith(prefix):  # what relative_to gives, without its cost at 118k samples
            name = text[len(prefix):]
        else:
            path = Path(text)
            name = str(path.relative_to(root)) if root is not None and path.is_relative_to(root) else path.name
        digest.update(json.dumps([name, sample.captions]).encode())
    return digest.hexdigest()[:16]


def weights_fingerprint(module) -> str:
    """A hash of every tensor's name, shape and first values (fp32): another base model differs, a moved folder
    does not. Call before casting to the weight dtype."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        head = tensor.detach().flatten()[:16].float().cpu()
        digest.update(f"{name}{tuple(tensor.shape)}".encode() + head.numpy().tobytes())
    return digest.hexdigest()[:16]


def compare_settings(path: Path, saved: dict, now: dict) -> list[str]:
    """Settings that differ between the checkpoint and this run: an error for a REFUSED one (all of them named, with
    the reason), else one line per APPLIED change for the log. `saved`/`now`: flat {setting: value}."""
    changed = {k: (saved[k], now.get(k)) for k in saved if k in now and saved[k] != now[k]}
    refused = [f"{k} {a!r} -> {b!r} ({REFUSED[k]})" for k, (a, b) in changed.items() if k in REFUSED]
    refused += [f"{k}: {FINGERPRINTS[k]}" for k in FINGERPRINTS if k in changed]
    if refused:
        raise ValueError(f"{path}: cannot resume with changed settings: {'; '.join(refused)}. Resume with the "
                         "checkpoint's values (its train_state.json lists them), or start a new run in another "
                         "--output_dir")
    unknown = [k for k in changed if k not in APPLIED and k not in FINGERPRINTS]
    if unknown:
        raise ValueError(f"{path}: cannot resume with changed settings {unknown}: no resume rule for them")
    return [f"{k}: {a!r} -> {b!r} (applied from the resumed step: {APPLIED[k]})" for k, (a, b) in changed.items()
            if k in APPLIED and APPLIED[k] != "bookkeeping" and not APPLIED[k].startswith("checked")]


def run_settings(args, tasks: list, num_processes: int) -> dict:
    """The settings a checkpoint records and a resume compares (flat {setting: value}): the resolved config, the
    tuner configs with their defaults filled in, and the process count. A joint run: the shared settings and, under
    `tasks`, each bypass's name, tuners and PER_TASK settings."""
    resolved = resolved_config(args)
    flat = {**resolved["train"], **resolved["data"], "num_processes": num_processes}
    prompts = preservation_prompts(args)
    if prompts:  # the file's content, not only its name
        flat["preservation_prompt_list"] = hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]
    if not args.tasks:
        return {**flat, "tuners": to_dicts(parse_tuner_configs(args.tuners))}
    return {**{k: v for k, v in flat.items() if k not in PER_TASK},
            "tasks": [{"name": t.name, "tuners": to_dicts(parse_tuner_configs(t.args.tuners)),
                       **{k: getattr(t.args, k) for k in PER_TASK}} for t in tasks]}


def check_resume_settings(path: Path, now: dict) -> list[str]:
    """Before anything loads: refuse what cannot change on resume (seed, batch, data options, tuners, ...) with the
    reason; return the changes that will be applied, for the log. Old checkpoints without settings: nothing to check."""
    saved = read_state(path).get("settings")
    return compare_settings(path, saved, now) if isinstance(saved, dict) else []


def resume(run, path: Path) -> None:
    """Load tuners, optimizer, LR schedule, RNG and accelerate's step; global_step from the checkpoint's name and
    state file (not from the LR scheduler, musubi PR #915); then this run's LRs, schedules and Adam settings per task
    (never print one value and use another); newer checkpoints of the abandoned run moved aside."""
    a, state = run.accelerator, read_state(path)
    step = checkpoint_step(path)
    step = state["global_step"] if step is None else step
    if step != state["global_step"]:
        raise ValueError(f"{path}: folder name says step {step}, {STATE_FILE} says {state['global_step']}")
    if step > run.max_train_steps:
        raise ValueError(f"{path}: the checkpoint is at step {step}, past this run's end (step {run.max_train_steps}"
                         "); pass a larger --max_train_steps or an earlier checkpoint")
    a.load_state(str(path))
    run.global_step = step
    apply_settings(run.optimizer, run.lr_scheduler, run.tasks, a.num_processes)
    for line in run.resume_notes:
        a.print(f"{path.name}: {line}")
    a.print(f"resumed from {path} at step {step}")
    if a.is_main_process:
        moved = set_aside_newer(run.output_dir, step)
        if moved:
            a.print(f"moved the abandoned run's newer checkpoints aside: {', '.join(str(p) for p in moved)}")
    a.wait_for_everyone()
