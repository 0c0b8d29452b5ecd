"""The job, top to bottom: checks before anything loads -> data -> models -> optimizer -> resume -> loop -> outputs per
task (-> the tiny world's before/after report). `main` is train_t2i.py; `train` the library call (the table, benches).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from restune_diffusion import world
from restune_diffusion.cli import run_cli
from restune_diffusion.report import format_report
from restune_diffusion.train import prior
from restune_diffusion.train.checkpoints import DiskWriteError, find_checkpoint
from restune_diffusion.train.joint import only
from restune_diffusion.train.loop import NonFiniteLossError, train_loop, validate_tasks
from restune_diffusion.train.options import check_report_to, parse_args, preservation_prompts
from restune_diffusion.train.outputs import TUNERS_FILE, export, start_outputs
from restune_diffusion.train.resume import check_resume_settings, data_fingerprint, resume, run_settings
from restune_diffusion.train.setup import (
    build_datasets,
    build_loader,
    build_models,
    check_fresh_start,
    check_output_dir,
    make_accelerator,
    make_tasks,
    prepare_run,
    set_tf32,
    tracker_kwargs,
    warn_long_warmup,
    warn_single_process,
    weight_dtype_of,
)
from restune_diffusion.train.validation import split_heldout, validation_seed


def train(args: argparse.Namespace) -> dict:
    """The whole job. Returns the summary on the main process (trainable params, peak memory, files); a joint run
    {task name: summary}."""
    from accelerate.utils import set_seed

    check_report_to(args)
    set_tf32(args)
    accelerator = make_accelerator(args)
    out, tasks = Path(args.output_dir), make_tasks(args)
    if accelerator.is_main_process:
        check_output_dir(out)
    warn_single_process(accelerator)
    resume_from = find_checkpoint(out, args.resume_from_checkpoint, accelerator.print)  # fails before any loading
    check_fresh_start(out, resume_from, args, accelerator)
    settings = run_settings(args, tasks, accelerator.num_processes)
    notes = check_resume_settings(resume_from, settings) if resume_from else []  # refusals before any loading
    if args.with_prior_preservation:
        prior.check_record(args.class_data_dir, prior.wanted(args))  # other class prompts or sampler: before loading
    set_seed(args.seed)  # the tuners are initialised from their task's seed; batches draw from seeded generators
    dataset = build_datasets(args, tasks, accelerator)
    dataset, heldout = split_heldout(dataset, args.validation_split, validation_seed(args))  # one split for all
    if heldout is not None:
        images = len({str(s.path) for s in heldout.samples})
        accelerator.print(f"--validation_split: {images} images ({len(heldout)} samples) held out, never trained on; "
                          "their loss is logged as val_loss at each validation")
    settings["data"] = data_fingerprint(dataset)
    for task, part in zip(tasks, getattr(dataset, "parts", [])):  # tasks on their own data: each its own
        task.data_fingerprint = data_fingerprint(part)
    if resume_from:
        check_resume_settings(resume_from, {"data": settings["data"]})  # another data set: before any model loads
    weight_dtype = weight_dtype_of(accelerator)
    sd, settings["base_model"] = build_models(args, tasks, accelerator, weight_dtype)
    if resume_from:
        check_resume_settings(resume_from, {"base_model": settings["base_model"]})
    for task in tasks:
        accelerator.print(format_report(task.handle))
    class_data = prior.class_dataset(args, accelerator, sd, [t.handle for t in tasks], settings["base_model"],
                                     weight_dtype)  # drawn by the frozen base where missing; None without the flag
    if class_data is not None:
        settings["class_data"] = prior.class_fingerprint(args, class_data.samples)
        if resume_from:
            check_resume_settings(resume_from, {"class_data": settings["class_data"]})
    loader = build_loader(args, dataset, sd, accelerator, weight_dtype, class_data)
    run = prepare_run(args, tasks, accelerator, sd, loader, weight_dtype)
    run.settings, run.resume_notes, run.heldout = settings, notes, heldout
    run.preservation_prompts = preservation_prompts(args)
    if run.preservation_prompts:
        accelerator.print(preservation_note(tasks, len(run.preservation_prompts)))
    for task in tasks:
        warn_long_warmup(task, run.max_train_steps, accelerator)
    if resume_from is not None:
        resume(run, resume_from)
    if accelerator.is_main_process:
        for task in tasks:
            start_outputs(task, run.global_step, accelerator.print)
    if accelerator.is_main_process and args.report_to != "none":
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("restune-diffusion", config=config, init_kwargs=tracker_kwargs(args))
    start_step, start = run.global_step, time.time()
    train_loop(run)
    seconds, summaries = time.time() - start, {}
    accelerator.wait_for_everyone()
    if run.validated_at != run.global_step:
        validate_tasks(run)
    for task in tasks:
        with only(tasks, task):
            summaries[task.name] = export(run, task, seconds, run.global_step - start_step)
    if args.world_report and accelerator.is_main_process:
        for task in tasks:
            summaries[task.name]["world"] = world.before_after_report(task.output_dir, task.output_dir / TUNERS_FILE,
                                                                      args.pretrained_model_name_or_path,
                                                                      args.world_concept)
    for tracker in accelerator.trackers:
        tracker.finish()  # the process group stays (see close_process_group)
    return summaries if args.tasks else summaries[tasks[0].name]


def preservation_note(tasks: list, num_prompts: int) -> str:
    """What base-prediction preservation adds to each step, said once."""
    bypasses_only = all(c.type == "bypass" for t in tasks for c in t.handle.configs)
    weights = ", ".join(f"{t.name} {t.args.preservation_weight:g}" if t.prefix else f"{t.args.preservation_weight:g}"
                        for t in tasks)
    cost = ("the frozen prediction comes from the same backbone pass (the bypass leaves the backbone as it is): the "
            "tail runs on one more copy of the rows" if bypasses_only else
            "one more frozen forward of those rows per micro-step, tuners off")
    return (f"base-prediction preservation (weight {weights}): each batch gains one row per image, a prompt drawn from "
            f"{num_prompts} preservation prompts at its noisy latents and timestep; {cost}")


def close_process_group() -> None:
    """Destroy the torch.distributed group of this process, if any: the end of a CLI run. A library call of train()
    keeps it (accelerate's end_training() destroys it, and a second run in the same process, the table's next row,
    would then join the same torchrun store with its stale rendezvous keys: 3 of 4 two-process tries failed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """`train_t2i.py`: parse, train; named errors (bad data, config, checkpoint, nan loss, full disk) as one line on
    stderr, exit 2 (cli.run_cli, as every CLI)."""
    try:
        return run_cli(lambda args: train(parse_args(args)), "train_t2i.py", argv,
                       extra_errors=(NonFiniteLossError, DiskWriteError))
    finally:
        close_process_group()
