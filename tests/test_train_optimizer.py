"""restune_diffusion/train/optimizer.py: one AdamW with a param group per task, and per task diffusers' LR schedule
as it would run alone (before issue 24 a joint run took its schedules from a throw-away SGD optimizer of LR 1, which
put polynomial decay's end at 1e-7 x the task's LR instead of 1e-7)."""

import argparse
from types import SimpleNamespace

import pytest
import torch
from diffusers.optimization import get_scheduler

from restune_diffusion.train.optimizer import build_optimizer, current_lrs, schedule
from restune_diffusion.train.options import LR_SCHEDULERS

TOTAL, WARMUP = 20, 4


def diffusers_lrs(name: str, lr: float, warmup: int = WARMUP, total: int = TOTAL) -> list[float]:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    lrs = []
    for _ in range(total + 3):  # and past the end
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # no gradients: nothing moves; the order torch expects
        sched.step()
    return lrs


@pytest.mark.parametrize("name", LR_SCHEDULERS)
def test_each_schedule_equals_diffusers_at_every_step(name):
    lr = 3e-3
    factor = schedule(name, WARMUP, TOTAL, lr)
    assert [lr * factor(step) for step in range(TOTAL + 3)] == diffusers_lrs(name, lr)


def task(name: str, lr: float, scheduler: str, **adam):
    args = argparse.Namespace(learning_rate=lr, scale_lr=False, gradient_accumulation_steps=1, train_batch_size=2,
                              lr_scheduler=scheduler, lr_warmup_steps=WARMUP, seed=0, adam_beta1=0.9,
                              adam_beta2=0.999, adam_epsilon=1e-8, adam_weight_decay=1e-2)
    vars(args).update(adam)
    params = [torch.nn.Parameter(torch.zeros(3))]
    return SimpleNamespace(name=name, args=args, handle=SimpleNamespace(trainable_parameters=lambda: params))


def test_each_task_gets_its_param_group_and_the_schedule_it_would_get_alone():
    tasks = [task("a", 2e-3, "polynomial"), task("b", 5e-4, "cosine", adam_beta1=0.8, adam_weight_decay=0.0)]
    accelerator = SimpleNamespace(num_processes=1, print=lambda *a: None)
    optimizer, lr_schedule = build_optimizer(tasks, accelerator, TOTAL, use_8bit_adam=False)
    assert [(g["betas"][0], g["weight_decay"]) for g in optimizer.param_groups] == [(0.9, 1e-2), (0.8, 0.0)]
    seen = []
    for _ in range(TOTAL + 3):
        seen.append(current_lrs(optimizer))
        optimizer.step()
        lr_schedule.step()
    for k, t in enumerate(tasks):
        assert [lrs[k] for lrs in seen] == diffusers_lrs(t.args.lr_scheduler, t.args.learning_rate), t.name


def test_a_polynomial_schedule_needs_a_learning_rate_above_its_end():
    with pytest.raises(ValueError, match="--learning_rate must be larger"):
        schedule("polynomial", 0, 10, 1e-8)


def test_the_learning_rate_said_at_the_start_is_the_one_trained_with_not_warmups_first_step(tmp_path, capsys):
    """The log once said "learning rate 0" for a run with warmup: it printed the group's LR after the schedule had
    scaled it to step 0."""
    from test_train import cli_args, make_demo_dataset

    from restune_diffusion import train as T

    data = make_demo_dataset(tmp_path / "d", num_images=4, resolution=32)
    T.train(T.parse_args(cli_args(tmp_path, data, "--max_train_steps", "1", "--checkpointing_steps", "0")))
    assert "learning rate 0.001 (as given" in capsys.readouterr().out
