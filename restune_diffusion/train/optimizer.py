"""One optimizer for a run of K tasks: AdamW (bitsandbytes' 8-bit one with --use_8bit_adam) with one param group per
task, its learning rate and Adam settings, and one LambdaLR with one schedule per task. One optimizer object, so the
fp16 grad scaler unscales once per step; a single run is K = 1.

The schedules are diffusers' (optimization.py: linear, cosine, cosine_with_restarts with 1 cycle, polynomial with
power 1 and lr_end 1e-7, constant, constant_with_warmup) as factors of each group's LR, written here per task because
diffusers builds them for a whole optimizer; tests/test_train_optimizer.py checks them against diffusers' own at every
step. accelerate steps a prepared scheduler once per process per optimizer step, hence the warmup and length times
the process count.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

POLYNOMIAL_LR_END = 1e-7  # diffusers' get_scheduler default


def effective_lr(args, num_processes: int) -> float:
    """--learning_rate, times accumulation x batch x processes with --scale_lr (opt-in, as in diffusers)."""
    if args.scale_lr:
        return args.learning_rate * args.gradient_accumulation_steps * args.train_batch_size * num_processes
    return args.learning_rate


def adam_settings(args) -> dict:
    return {"betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon,
            "weight_decay": args.adam_weight_decay}


def adamw_class(use_8bit_adam: bool):
    """torch's AdamW, or bitsandbytes' 8-bit one with --use_8bit_adam."""
    if not use_8bit_adam:
        return torch.optim.AdamW
    try:
        import bitsandbytes
    except ImportError:
        raise ImportError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
    return bitsandbytes.optim.AdamW8bit


def schedule(name: str, warmup: int, total: int, lr: float) -> Callable[[int], float]:
    """diffusers' LR schedule `name` as a factor of `lr` at each step (warmup and total in scheduler steps)."""

    def warming(step: int) -> float:
        return float(step) / float(max(1, warmup))

    def linear(step: int) -> float:
        if step < warmup:
            return warming(step)
        return max(0.0, float(total - step) / float(max(1, total - warmup)))

    def progress(step: int) -> float:
        return float(step - warmup) / float(max(1, total - warmup))

    def cosine(step: int) -> float:
        if step < warmup:
            return warming(step)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress(step))))

    def cosine_with_restarts(step: int) -> float:  # one cycle: diffusers' get_scheduler default
        if step < warmup:
            return warming(step)
        if progress(step) >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((1.0 * progress(step)) % 1.0))))

    def polynomial(step: int) -> float:  # power 1, towards lr_end (an absolute LR, hence this task's lr)
        if step < warmup:
            return warming(step)
        if step > total:
            return POLYNOMIAL_LR_END / lr
        remaining = 1 - (step - warmup) / (total - warmup)
        return ((lr - POLYNOMIAL_LR_END) * remaining**1.0 + POLYNOMIAL_LR_END) / lr

    def constant_with_warmup(step: int) -> float:
        return warming(step) if step < warmup else 1.0

    if name == "polynomial" and not lr > POLYNOMIAL_LR_END:
        raise ValueError(f"--lr_scheduler polynomial decays to {POLYNOMIAL_LR_END:g}: --learning_rate must be larger, "
                         f"got {lr:g}")
    factors = {"linear": linear, "cosine": cosine, "cosine_with_restarts": cosine_with_restarts,
               "polynomial": polynomial, "constant": lambda _: 1, "constant_with_warmup": constant_with_warmup}
    if name not in factors:
        raise ValueError(f"--lr_scheduler: expected one of {sorted(factors)}, got {name!r}")
    return factors[name]


def build_optimizer(tasks: list, accelerator, max_train_steps: int, use_8bit_adam: bool):
    """(optimizer, schedule) over the tasks' trainable parameters; each task's LR, Adam settings and schedule from its
    own args. Says each task's effective LR (scepter #26: a hidden rescaling looks like a stalled run)."""
    n = accelerator.num_processes
    groups = [{"params": t.handle.trainable_parameters(), "lr": effective_lr(t.args, n), **adam_settings(t.args)}
              for t in tasks]
    optimizer = adamw_class(use_8bit_adam)(groups)
    factors = [schedule(t.args.lr_scheduler, t.args.lr_warmup_steps * n, max_train_steps * n, g["lr"])
               for t, g in zip(tasks, groups)]
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
    for t, group in zip(tasks, groups):
        a = t.args
        note = (f"scaled by --scale_lr from {a.learning_rate:g} x {a.gradient_accumulation_steps} accumulation x "
                f"{a.train_batch_size} batch x {n} processes" if a.scale_lr else "as given; --scale_lr is off")
        accelerator.print(f"{t.name}: learning rate {group['initial_lr']:g} ({note}), schedule {a.lr_scheduler}, "
                          f"warmup {a.lr_warmup_steps} steps, seed {a.seed}")
    return optimizer, lr_schedule


def apply_settings(optimizer, lr_schedule, tasks: list, num_processes: int) -> None:
    """On resume, after load_state put the checkpoint's LRs, schedules and Adam settings in: this run's, at the
    restored step (LambdaLR: lr = base_lr · factor(step), the factors built from this run's flags), set once."""
    opt = getattr(optimizer, "optimizer", optimizer)  # under accelerate's wrapper
    sched = getattr(lr_schedule, "scheduler", lr_schedule)
    lrs = [effective_lr(t.args, num_processes) for t in tasks]
    sched.base_lrs = list(lrs)
    for group, lr, factor, t in zip(opt.param_groups, lrs, sched.lr_lambdas, tasks):
        group.update(initial_lr=lr, lr=lr * factor(sched.last_epoch), **adam_settings(t.args))


def current_lrs(optimizer) -> list[float]:
    """Each task's learning rate now (the schedule has set it on its param group)."""
    return [group["lr"] for group in optimizer.param_groups]
