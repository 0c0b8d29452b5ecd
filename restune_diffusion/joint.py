"""Train K Res-Tuning-Bypass sets in one backbone pass per step (several `--config`, or a learning-rate/seed sweep).

A bypass reads only detached backbone features (tuners/bypass.py), so K bypasses fed the same batch (same images,
captions, noise and timesteps) can share ONE frozen backbone forward: `route_bypasses(..., broadcast=True)` runs the
backbone on B rows and each bypass k turns the same features into rows k·B..(k+1)·B of the target's input; only
conv_norm_out/conv_out run on K·B rows. Task k's loss is the mean over its rows, and the K losses are summed for one
backward: the bypasses share no parameter, so each gets exactly the gradient it would get alone. Each bypass's
activations are recomputed in the backward from its detached features (tuners/bypass.py `_routed_output`), so
K bypasses keep about one bypass's activations, not K (at 512 px, K=8: see bench/results/cpu-512.md).

Each task has its own optimizer state, learning rate, schedule, clipping and min-SNR weighting (one AdamW param
group and one LambdaLR lambda each: one optimizer object, so the fp16 grad scaler unscales once per step), its own
sub-folder `<output_dir>/<task>/` with train_log.jsonl, validation grids, loss curve, train_config.yaml (`--config`
on it trains that bypass alone) and tuners.safetensors (the K files load as K tasks in multitask.generate_multitask).
Checkpoints hold every task (`checkpoint-<step>/<task>/tuners.safetensors`): a resume must restore all of them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from restune_diffusion.attach import attach
from restune_diffusion.checkpoints import find_checkpoint
from restune_diffusion.cli import run_cli
from restune_diffusion.ema import EMA_FILE, TunerEMA
from restune_diffusion.files import atomic_write_text
from restune_diffusion.multitask import route_bypasses
from restune_diffusion.train import (
    CONFIG_FILE,
    LOG_FILE,
    PER_TASK,
    TUNERS_FILE,
    DiskWriteError,
    NonFiniteLossError,
    Run,
    TunedUNet,
    adam_settings,
    adamw_class,
    apply_optimizer_settings,
    batch_inputs,
    build_dataset,
    build_loader,
    check_fresh_start,
    check_output_dir,
    check_report_to,
    check_resume_settings,
    close_process_group,
    data_fingerprint,
    effective_lr,
    epoch_batches,
    export,
    finish_trackers,
    freeze_and_cast,
    load_base,
    make_accelerator,
    measure_heldout,
    parse_args,
    prediction_loss,
    prediction_target,
    read_log,
    recovery_note,
    register_state_hooks,
    resolved_config,
    save_checkpoint,
    say_heldout,
    seed_for,
    set_tf32,
    split_heldout,
    tracker_kwargs,
    train,
    update_ema,
    validate,
    validation_due,
    validation_seed,
    warn_long_warmup,
    warn_single_process,
    weight_dtype_of,
    write_error,
    write_resolved_config,
)
from restune_diffusion.train import resume as resume_state
from restune_diffusion.tuners import parse_tuner_configs, to_dicts


@dataclass
class Task:
    """One bypass of a joint run: what an alone run of it would get as args, its handle and its sub-folder."""

    name: str
    args: argparse.Namespace
    handle: Any = None
    view: Run | None = None  # the joint Run seen as this task's run (validate/export write to its folder)
    ema: Any = None  # its ema.TunerEMA under --use_ema


@dataclass
class JointRun(Run):
    tasks: list = field(default_factory=list)


class JointUNet(TunedUNet):
    """The UNet and K bypass sets for `accelerator.prepare`; a forward on B rows returns K·B rows (task k: k·B..)."""

    def __init__(self, unet, handles: list):
        torch.nn.Module.__init__(self)
        self.unet = unet
        self.tuners = torch.nn.ModuleList([h.module for h in handles])
        self.handles = handles

    def forward(self, *args, **kwargs):
        with route_bypasses(self.unet, self.handles, broadcast=True):
            return self.unet(*args, **kwargs)


def task_args(args: argparse.Namespace, task: dict) -> argparse.Namespace:
    """The args an alone run of this task gets: the shared settings, its tuners and PER_TASK values."""
    values = {**vars(args), **{k: task[k] for k in PER_TASK}, "tuners": task["tuners"], "tasks": None,
              "config_name": task["name"], "output_dir": str(Path(args.output_dir) / task["name"])}
    return argparse.Namespace(**values)


# ---------------------------------------------------------------------------------------------------------------------
# the loss of K tasks from one backbone pass
def joint_loss(model, noise_scheduler, latents, text_states, noise, timesteps, snr_gammas: list) -> torch.Tensor:
    """Per task, the loss train.diffusion_loss gives alone: (K,). The backbone sees the B rows once."""
    target = prediction_target(noise_scheduler, latents, noise, timesteps)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)  # (B, 4, h, w)
    pred = model(noisy, timesteps, text_states, return_dict=False)[0]  # (K·B, 4, h, w): task k in rows k·B..
    b = latents.shape[0]
    return torch.stack([prediction_loss(pred[i * b:(i + 1) * b], target, noise_scheduler, timesteps, gamma)
                        for i, gamma in enumerate(snr_gammas)])


def build_optimizer(run_args, tasks: list, accelerator, max_train_steps: int):
    """One AdamW, one param group per task (its LR and Adam settings); one LambdaLR, one lambda per task (diffusers'
    schedule functions, each with the task's warmup)."""
    from diffusers.optimization import get_scheduler

    n = accelerator.num_processes
    groups = [{"params": t.handle.trainable_parameters(), "lr": effective_lr(t.args, n), **adam_settings(t.args)}
              for t in tasks]
    optimizer = adamw_class(run_args)(groups)
    lambdas = []
    for t in tasks:  # the prepared scheduler steps once per process per optimizer step (accelerate)
        probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        lambdas.append(get_scheduler(t.args.lr_scheduler, probe, num_warmup_steps=t.args.lr_warmup_steps * n,
                                     num_training_steps=max_train_steps * n).lr_lambdas[0])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
    for t, group in zip(tasks, groups):
        accelerator.print(f"{t.name}: learning rate {group['lr']:g}, schedule {t.args.lr_scheduler}, warmup "
                          f"{t.args.lr_warmup_steps} steps, seed {t.args.seed}")
    return optimizer, schedule


# ---------------------------------------------------------------------------------------------------------------------
# the loop
def micro_step(run: JointRun, batch: dict, epoch: int, index: int) -> list[float]:
    a, args, tasks = run.accelerator, run.args, run.tasks
    with a.accumulate(run.model):
        generator = torch.Generator(a.device).manual_seed(seed_for(args.seed, a.process_index, epoch, index))
        inputs = batch_inputs(batch, run.sd, generator, args.noise_offset, run.weight_dtype, a.device)
        losses = joint_loss(run.model, run.sd.noise_scheduler, *inputs, [t.args.snr_gamma for t in tasks])  # (K,)
        rows = losses.detach()[None].repeat(len(batch["captions"]), 1)  # (B, K)
        means = a.gather(rows).mean(dim=0).tolist()  # same on every rank
        step = run.global_step + 1
        for t, mean in zip(tasks, means):
            if not math.isfinite(mean):
                raise NonFiniteLossError(f"{t.name}: step {step}: loss is {mean}; no update was applied. "
                                         f"{recovery_note(run.output_dir, step)}")
        a.backward(losses.sum())  # disjoint parameters: each task gets the gradient of its own loss
        if a.sync_gradients:
            a.unscale_gradients()  # once for the one optimizer, then each task clips its own gradients
            for t in tasks:
                norm = torch.nn.utils.clip_grad_norm_(t.handle.trainable_parameters(), t.args.max_grad_norm or math.inf)
                if a.scaler is None and not torch.isfinite(norm):
                    raise NonFiniteLossError(f"{t.name}: step {step}: the gradient norm is {float(norm)}; no update "
                                             f"was applied. {recovery_note(run.output_dir, step)}")
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return means


def after_step(run: JointRun, losses: list[float], epoch: int, bar) -> None:
    a, args, step = run.accelerator, run.args, run.global_step
    lrs = run.lr_scheduler.get_last_lr()
    due = validation_due(run, step)
    for t, loss, lr in zip(run.tasks, losses, lrs):
        t.view.global_step = step
        with only(run, t):  # the held-out loss of this task's bypass alone
            val = measure_heldout(t.view) if due else None
        if a.is_main_process:
            path = t.view.output_dir / LOG_FILE
            record = {"step": step, "epoch": epoch, "loss": loss, "lr": lr}
            if val is not None:
                record["val_loss"] = val
            try:
                with open(path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as err:
                raise write_error(path, f"the log line of step {step}", err, run.output_dir) from err
            if val is not None:
                a.log({f"{t.name}/val_loss": val}, step=step)
    a.log({f"{t.name}/train_loss": loss for t, loss in zip(run.tasks, losses)}, step=step)
    bar.update(1)
    bar.set_postfix(loss=" ".join(f"{x:.4f}" for x in losses))
    if args.checkpointing_steps and step % args.checkpointing_steps == 0:
        save_checkpoint(run)
    if due:
        validate_tasks(run)


@contextlib.contextmanager
def only(run: JointRun, task: Task):
    """Inside: a plain UNet forward runs this task's bypass alone (validation, export)."""
    was = [t.handle.enabled for t in run.tasks]
    for t in run.tasks:
        t.handle.enabled = t is task
    try:
        yield
    finally:
        for t, enabled in zip(run.tasks, was):
            t.handle.enabled = enabled


def validate_tasks(run: JointRun) -> None:
    for t in run.tasks:
        with only(run, t):
            validate(t.view)


def train_loop(run: JointRun) -> None:
    from tqdm.auto import tqdm

    a, accum = run.accelerator, run.args.gradient_accumulation_steps
    first_epoch = run.global_step // run.steps_per_epoch
    skip = (run.global_step % run.steps_per_epoch) * accum
    bar = tqdm(total=run.max_train_steps, initial=run.global_step, desc="steps", disable=not a.is_local_main_process)
    with bar:
        run.model.train()
        micro: list[list[float]] = []
        for epoch in range(first_epoch, run.num_epochs):
            if run.global_step >= run.max_train_steps:
                break
            for index, batch in epoch_batches(run, epoch, skip if epoch == first_epoch else 0):
                micro.append(micro_step(run, batch, epoch, index))
                if a.sync_gradients:
                    run.global_step += 1
                    update_ema([t.ema for t in run.tasks if t.ema is not None], run.optimizer)
                    after_step(run, [sum(x) / len(x) for x in zip(*micro)], epoch, bar)
                    micro = []
                    if run.global_step >= run.max_train_steps:
                        break


# ---------------------------------------------------------------------------------------------------------------------
# the job
def joint_settings(args, tasks: list, num_processes: int) -> dict:
    resolved = resolved_config(args)
    shared = {k: v for k, v in {**resolved["train"], **resolved["data"]}.items() if k not in PER_TASK}
    return {**shared, "num_processes": num_processes,
            "tasks": [{"name": t.name, "tuners": to_dicts(parse_tuner_configs(t.args.tuners)),
                       **{k: getattr(t.args, k) for k in PER_TASK}} for t in tasks]}


def build_tasks(args, accelerator, weight_dtype):
    """The base model once, then each task's bypass attached right after seeding with its seed (what an alone run
    draws for its initialisation)."""
    from accelerate.utils import set_seed

    sd, fingerprint = load_base(args, accelerator)
    tasks = [Task(spec["name"], task_args(args, spec)) for spec in args.tasks]
    for t in tasks:
        set_seed(t.args.seed)
        t.handle = attach(sd.unet, t.args.tuners, name=t.name)
    freeze_and_cast(args, sd, [t.handle for t in tasks], weight_dtype)
    return sd, tasks, fingerprint


def prepare(args, accelerator, sd, tasks, loader, weight_dtype) -> JointRun:
    sampler = loader.sampler
    model = JointUNet(sd.unet, [t.handle for t in tasks])
    n = accelerator.num_processes
    steps_per_epoch = math.ceil(math.ceil(len(loader) / n) / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    optimizer, schedule = build_optimizer(args, tasks, accelerator, max_steps)
    model, optimizer, loader, schedule = accelerator.prepare(model, optimizer, loader, schedule)
    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    for t in tasks:  # each bypass has its own average (--use_ema)
        t.ema = TunerEMA(t.handle, args.ema_decay) if args.use_ema else None
    register_state_hooks(accelerator, {f"{t.name}/{TUNERS_FILE}": t.handle for t in tasks},
                         {f"{t.name}/{EMA_FILE}": t.ema for t in tasks if t.ema is not None})
    accelerator.print(f"joint run: {len(tasks)} bypasses ({', '.join(t.name for t in tasks)}) in one backbone pass "
                      f"per step; {max_steps} steps; batch {args.train_batch_size} per device x {n} processes x "
                      f"{args.gradient_accumulation_steps} accumulation")
    run = JointRun(args, accelerator, sd, None, model, optimizer, schedule, loader, sampler, weight_dtype,
                   Path(args.output_dir), steps_per_epoch, max_steps, math.ceil(max_steps / steps_per_epoch),
                   tasks=tasks)
    for t in tasks:
        t.view = replace(run, args=t.args, handle=t.handle, output_dir=Path(t.args.output_dir), tasks=[], ema=t.ema)
    return run


def resume(run: JointRun, path: Path) -> None:
    resume_state(run, path)  # one LR/Adam setting for all: replaced per task below
    n = run.accelerator.num_processes
    apply_optimizer_settings(run.optimizer, run.lr_scheduler, [effective_lr(t.args, n) for t in run.tasks],
                             [adam_settings(t.args) for t in run.tasks])


def train_joint(args: argparse.Namespace) -> dict:
    """The joint job: returns {task name: summary} on the main process."""
    check_report_to(args)
    set_tf32(args)
    accelerator = make_accelerator(args)
    out = Path(args.output_dir)
    if accelerator.is_main_process:
        check_output_dir(out)
    warn_single_process(accelerator)
    resume_from = find_checkpoint(out, args.resume_from_checkpoint, accelerator.print)
    check_fresh_start(out, resume_from, args, accelerator)
    dataset = build_dataset(args, accelerator)
    dataset, heldout = split_heldout(dataset, args.validation_split, validation_seed(args))  # one split for all
    say_heldout(heldout, accelerator)
    weight_dtype = weight_dtype_of(accelerator)
    sd, tasks, base = build_tasks(args, accelerator, weight_dtype)
    settings = {**joint_settings(args, tasks, accelerator.num_processes), "data": data_fingerprint(dataset),
                "base_model": base}
    notes = check_resume_settings(resume_from, settings) if resume_from else []
    loader = build_loader(args, dataset, sd, accelerator, weight_dtype)
    run = prepare(args, accelerator, sd, tasks, loader, weight_dtype)
    run.settings, run.resume_notes, run.heldout = settings, notes, heldout
    for t in tasks:
        t.view.settings, t.view.heldout = settings, heldout
        warn_long_warmup(t.args, run.max_train_steps, accelerator)
    if resume_from is not None:
        resume(run, resume_from)
    if accelerator.is_main_process:
        for t in tasks:
            t.view.output_dir.mkdir(parents=True, exist_ok=True)
            records = read_log(t.view.output_dir, upto=run.global_step, say=accelerator.print)
            atomic_write_text(t.view.output_dir / LOG_FILE, "".join(json.dumps(r) + "\n" for r in records))
            write_resolved_config(t.args, t.view.output_dir / CONFIG_FILE)  # `--config` on it: this task alone
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers("restune-diffusion-joint", init_kwargs=tracker_kwargs(args))
    start_step, start = run.global_step, time.time()
    train_loop(run)
    seconds, summaries = time.time() - start, {}
    for t in tasks:
        t.view.global_step = run.global_step
        with only(run, t):
            summaries[t.name] = export(t.view, seconds, run.global_step - start_step)
    finish_trackers(accelerator)
    return summaries


def run_any(args: argparse.Namespace) -> dict:
    """A joint run when args.tasks is set, else the single-set run."""
    return train_joint(args) if args.tasks else train(args)


def main(argv: list[str] | None = None) -> int:
    """`train_t2i.py`: parse, then a single or a joint run; named errors as one line, exit 2 (cli.run_cli)."""
    try:
        return run_cli(lambda a: run_any(parse_args(a)), "train_t2i.py", argv,
                       extra_errors=(NonFiniteLossError, DiskWriteError))
    finally:
        close_process_group()
