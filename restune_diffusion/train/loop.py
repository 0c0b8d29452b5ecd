"""The training loop over a run of K tasks (a single run is K = 1): micro-steps with gradient accumulation, one
update of every task per optimizer step, then the log, checkpoints and validation on their schedules.

The data order is a function of (seed, epoch) and every random draw of a batch comes from a generator seeded by
(seed, process, epoch, batch) (loss.py), so a run resumed at step N replays the numbers of an uninterrupted one. A
non-finite loss or gradient stops before the update, naming the checkpoint to go back to.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from restune_diffusion.train.checkpoints import checkpoint_step, list_checkpoints, save_checkpoint
from restune_diffusion.train.joint import only
from restune_diffusion.train.loss import LossTerms, batch_inputs, draw_prompts, routed_inputs, seed_for, task_losses
from restune_diffusion.train.optimizer import current_lrs
from restune_diffusion.train.outputs import log_step
from restune_diffusion.train.validation import measure_heldout, validate, validation_due


class NonFiniteLossError(RuntimeError):
    """The loss became nan/inf; training stopped and the last good checkpoint was kept."""


@dataclass
class Task:
    """One tuner set of a run: what an alone run of it gets as args, and where its outputs go."""

    name: str
    args: argparse.Namespace
    output_dir: Path
    prefix: str = ""  # its files inside a checkpoint and its tracker keys: "" (a single run) or "<name>/" (joint)
    handle: Any = None
    ema: Any = None  # its ema.TunerEMA under --use_ema
    data_fingerprint: str | None = None  # a task on data of its own (routed joint run): its data set's


@dataclass
class Run:
    """What the loop touches, built once by run.train."""

    args: argparse.Namespace  # the run's (a joint run: the shared settings)
    accelerator: Any
    sd: Any
    tasks: list
    model: Any  # setup.TunedUNet after accelerator.prepare (DDP-wrapped when distributed)
    optimizer: Any
    lr_scheduler: Any
    loader: Any  # prepared DataLoader
    sampler: Any  # data.EpochSampler: the order of epoch e depends on (seed, e) only
    weight_dtype: torch.dtype
    output_dir: Path
    steps_per_epoch: int
    max_train_steps: int
    num_epochs: int
    global_step: int = 0
    validated_at: int = -1
    settings: dict = field(default_factory=dict)  # what a resume compares (resume.compare_settings)
    resume_notes: list = field(default_factory=list)  # settings changed on resume, applied
    heldout: Any = None  # the held-out part of the data set (--validation_split)
    preservation_prompts: list | None = None  # base-prediction preservation's prompts (None: off for every task)

    def who(self, task: Task) -> str:
        """How messages name a task: nothing in a single run."""
        return f"{task.name}: " if task.prefix else ""


def recovery_note(output_dir: Path, step: int) -> str:
    """Where to go back to after a non-finite loss or gradient at `step`. The weights of checkpoint-(step-1) gave it
    whatever the learning rate, so: the newest checkpoint at step-2 or before, from which a lower LR redoes at least
    one of the updates that led here (PITFALLS "last good checkpoint after a NaN")."""
    good = [p for p in list_checkpoints(output_dir) if checkpoint_step(p) <= step - 2]
    if not good:
        return (f"there is no checkpoint before step {step - 1} to go back to: start again with a lower "
                "--learning_rate (and --checkpointing_steps to keep recovery points)")
    j = checkpoint_step(good[-1])
    return (f"resume with --resume_from_checkpoint {good[-1]} and a lower --learning_rate: it redoes steps "
            f"{j + 1}..{step - 1}, whose updates led here (a checkpoint at step {step - 1} would give the same loss "
            "again, whatever the learning rate); or try --mixed_precision bf16/no")


def epoch_batches(run: Run, epoch: int, skip: int):
    """(batch index, batch) of epoch `epoch`, the first `skip` batches skipped without loading them (resume)."""
    run.sampler.set_epoch(epoch)
    loader = run.loader
    if skip:
        loader = run.accelerator.skip_first_batches(loader, skip)
    loader.set_epoch(epoch)
    return enumerate(loader, start=skip)


def update_ema(run: Run) -> None:
    """After an optimizer step (not per micro-batch); a step the fp16 grad scaler skipped changed nothing."""
    if not getattr(run.optimizer, "step_was_skipped", False):
        for task in run.tasks:
            if task.ema is not None:
                task.ema.update()


def clip_gradients(run: Run, losses: list[float]) -> None:
    """Unscale once (one optimizer), then each task clips its own gradients (max_grad_norm 0: measure only); a
    non-finite norm stops before the update. Under fp16 the grad scaler skips such steps itself (inf gradients are
    how it finds its scale)."""
    a, step = run.accelerator, run.global_step + 1
    a.unscale_gradients()
    for task, loss in zip(run.tasks, losses):
        norm = torch.nn.utils.clip_grad_norm_(task.handle.trainable_parameters(), task.args.max_grad_norm or math.inf)
        if a.scaler is None and not torch.isfinite(norm):
            raise NonFiniteLossError(f"{run.who(task)}step {step}: the gradient norm is {float(norm)} (loss "
                                     f"{loss:.4g}); the update was not applied. {recovery_note(run.output_dir, step)}")


def micro_step(run: Run, batch: dict, epoch: int, index: int) -> list[float]:
    """One micro-batch: each task's loss (stop before the backward if one is non-finite), one backward for all; at
    the accumulation boundary clip and update. Returns each task's loss averaged over every process."""
    a, args = run.accelerator, run.args
    with a.accumulate(run.model):
        keys = (args.seed, a.process_index, epoch, index)
        if "task_rows" in batch:  # tasks on their own data: each block drawn as its alone run draws it
            inputs = routed_inputs(batch, run.sd, seed_for(*keys), args.noise_offset, run.weight_dtype, a.device)
        else:
            generator = torch.Generator(a.device).manual_seed(seed_for(*keys))
            instance_rows = len(batch["captions"]) - batch.get("class_rows", 0)  # a preservation prompt for each
            prompts = draw_prompts(run.preservation_prompts, instance_rows, *keys) if run.preservation_prompts \
                else None
            inputs = batch_inputs(batch, run.sd, generator, args.noise_offset, run.weight_dtype, a.device, prompts)
        losses = task_losses(run.model, run.sd.noise_scheduler, inputs, [LossTerms.of(t.args) for t in run.tasks])
        rows = losses.detach()[None].repeat(batch.get("task_rows") or len(batch["captions"]), 1)  # (B, K)
        means = a.gather(rows).mean(dim=0).tolist()  # same on every rank
        for task, mean in zip(run.tasks, means):
            if not math.isfinite(mean):
                step = run.global_step + 1
                raise NonFiniteLossError(f"{run.who(task)}step {step}: loss is {mean}; the update was not applied. "
                                         f"{recovery_note(run.output_dir, step)}")
        a.backward(losses.sum())  # disjoint parameters: each task gets the gradient of its own loss
        if a.sync_gradients:
            clip_gradients(run, means)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return means


def validate_tasks(run: Run) -> None:
    for task in run.tasks:
        with only(run.tasks, task):
            validate(run, task)
    run.validated_at = run.global_step


def after_step(run: Run, losses: list[float], epoch: int, bar) -> None:
    """Log the step of every task (with its held-out loss when validation is due); checkpoint and validate on their
    schedules."""
    a, step = run.accelerator, run.global_step
    due = validation_due(run, step)
    for task, loss, lr in zip(run.tasks, losses, current_lrs(run.optimizer)):
        with only(run.tasks, task):  # the held-out loss of this task's tuners alone
            val = measure_heldout(run, task) if due else None
        values = {"loss": loss, "lr": lr, **({"val_loss": val} if val is not None else {})}
        if a.is_main_process:
            log_step(task, {"step": step, "epoch": epoch, **values}, run.output_dir)
        a.log({f"{task.prefix}{'train_loss' if k == 'loss' else k}": v for k, v in values.items()}, step=step)
    bar.update(1)
    bar.set_postfix(loss=" ".join(f"{x:.4f}" for x in losses))
    if run.args.checkpointing_steps and step % run.args.checkpointing_steps == 0:
        save_checkpoint(run)
    if due:
        validate_tasks(run)


def train_loop(run: Run) -> None:
    from tqdm.auto import tqdm

    a, accum = run.accelerator, run.args.gradient_accumulation_steps
    first_epoch = run.global_step // run.steps_per_epoch
    skip = (run.global_step % run.steps_per_epoch) * accum  # batches of the current epoch already consumed
    bar = tqdm(total=run.max_train_steps, initial=run.global_step, desc="steps", disable=not a.is_local_main_process)
    with bar:  # closed on errors too, so an error message starts its own line
        run.model.train()
        micro: list[list[float]] = []
        for epoch in range(first_epoch, run.num_epochs):
            if run.global_step >= run.max_train_steps:
                break
            for index, batch in epoch_batches(run, epoch, skip if epoch == first_epoch else 0):
                micro.append(micro_step(run, batch, epoch, index))
                if a.sync_gradients:
                    run.global_step += 1
                    update_ema(run)
                    after_step(run, [sum(x) / len(x) for x in zip(*micro)], epoch, bar)
                    micro = []
                    if run.global_step >= run.max_train_steps:
                        break
