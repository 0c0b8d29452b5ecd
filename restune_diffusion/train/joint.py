"""What only a joint run needs: K Res-Tuning-Bypass sets trained in one backbone pass per step (several --config, a
learning-rate/seed sweep, or a YAML `tasks:` list). Everything else (loop, optimizer, resume, outputs) is the same
code as for one task, a single run being K = 1.

A bypass reads only detached backbone features (tuners/bypass.py), so K bypasses fed the same batch (same images,
captions, noise and timesteps) can share ONE frozen backbone forward: inside `shared_pass` the backbone runs on B rows
and bypass k turns the same features into rows k·B..(k+1)·B of the target's input; only conv_norm_out/conv_out run on
K·B rows. loss.task_losses gives task k the mean over its rows; the K losses are summed for one backward, and as the
bypasses share no parameter each gets exactly the gradient it would get alone. Each bypass's activations are
recomputed in the backward from its detached features (tuners/bypass.py `_routed_output`), so K bypasses keep about
one bypass's activations, not K (at 512 px, K=8: bench/results/cpu-512.md).

Each task has its own learning rate, schedule, seed (initialisation), Adam settings, clipping, min-SNR weighting and
the weights of the preservation terms (PER_TASK: one AdamW param group each; loss.LossTerms), and its own sub-folder
`<output_dir>/<task>/` (train_config.yaml there trains that bypass alone); the data stream, batch, noise, steps and
precision are shared, and so are the class images and the preservation prompts (their rows are part of the shared
batch). The frozen base's prediction that base-prediction preservation compares against comes out of the same
backbone pass, as one more routed copy of the rows (setup.TunedUNet).

Tasks on their own data (the paper's multi-task story: one bypass per fine-grained set): each task's `data:` (TASK_DATA
keys: its images and captions) may differ. Then the run is *routed*: a step's batch holds K·B rows, task k's B rows
from its own data set (data.TaskDatasets), each block's VAE sample, noise and timesteps drawn as its alone run draws
them; the backbone runs once on the K·B rows and bypass k reads only its rows (multitask.route_bypasses). Tasks with
data sets of one length and the run's seed train exactly as they would alone; a shorter data set cycles over the
longest one's epochs. Prior and base-prediction preservation, buckets, --validation_split and --world_report share one
batch layout or one data set, and are refused in a routed run (ROUTED_REFUSED).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path

from restune_diffusion.multitask import route_bypasses
from restune_diffusion.tuners import parse_tuner_configs

PER_TASK = ("learning_rate", "lr_scheduler", "lr_warmup_steps", "seed", "adam_beta1", "adam_beta2",
            "adam_weight_decay", "adam_epsilon", "max_grad_norm", "snr_gamma", "prior_loss_weight",
            "preservation_weight")
SHARED_SPECS = ("tuners", "config", "config_name")  # differ per config without making the run two
TASK_DATA = ("dataset", "data_dir", "dataset_name", "dataset_config_name", "split", "caption_mode", "caption_column",
             "image_column", "category", "caption_template", "class_names", "caption_dropout_rate", "max_train_samples",
             "skip_bad_images", "scan_mode", "caption_extension", "shuffle_caption", "keep_tokens",
             "caption_tag_dropout_rate", "keep_tokens_separator")  # a task's own images and captions (routed runs)
ROUTED_REFUSED = {  # option: why a routed run (tasks on their own data) cannot take it
    "with_prior_preservation": "the class rows pair with one shared batch",
    "preservation_weight": "the preservation rows follow one shared batch",
    "enable_bucket": "one backbone batch needs one image size for every task's rows",
    "validation_split": "the held-out images are split from one data set",
    "world_report": "it reports one concept of one data set",
}


def joint_tasks(runs: list[dict]) -> dict:
    """The values of a joint run from one dict per config entry (options.config_values): the settings every entry
    shares (one data stream, one backbone pass), and `tasks`, one per bypass: name, tuners and the PER_TASK
    settings, crossed with the sweeps."""
    first = runs[0]
    for run in runs[1:]:
        differ = [k for k in first if k not in (*PER_TASK, *SHARED_SPECS, *TASK_DATA) and run[k] != first[k]]
        if differ:
            k = differ[0]
            raise ValueError(f"{run['config']}: {k} is {run[k]!r} where {first['config']} has {first[k]!r}; a joint "
                             f"run shares it (one backbone pass); only {', '.join(PER_TASK)} and the data keys "
                             f"{', '.join(TASK_DATA)} may differ per bypass")
    tasks = []
    for run in runs:
        types = [c.type for c in parse_tuner_configs(run["tuners"])]
        if types != ["bypass"]:
            raise ValueError(f"{run['config']}: a joint run shares one backbone pass per step, which only a bypass "
                             f"allows (it reads detached features); got tuners {types}. Give each joint config one "
                             "`type: bypass` tuner, and train the others in runs of their own")
        for lr in run["sweep_learning_rate"] or [run["learning_rate"]]:
            for seed in run["sweep_seed"] or [run["seed"]]:
                name = run["config_name"] + (f"-lr{lr:g}" if run["sweep_learning_rate"] else "") + (
                    f"-seed{seed}" if run["sweep_seed"] else "")
                tasks.append({"name": name, "tuners": run["tuners"], **{k: run[k] for k in PER_TASK},
                              "learning_rate": lr, "seed": seed, "data": {k: run[k] for k in TASK_DATA}})
    names = [t["name"] for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"--config: the joint run's bypasses need distinct names (config file stems), got {names}")
    return {**first, "tasks": tasks, "tuners": None, "config_name": "+".join(dict.fromkeys(
        r["config_name"] for r in runs))}


def routed(args: argparse.Namespace) -> bool:
    """A joint run whose tasks read different data: each task's rows come from its own data set."""
    tasks = args.tasks or []
    return any(t["data"] != tasks[0]["data"] for t in tasks)


def check_routed(args: argparse.Namespace) -> None:
    """What a routed run cannot take, refused in one line before anything loads."""
    for option, why in ROUTED_REFUSED.items():
        if any([getattr(args, option), *(t.get(option) for t in args.tasks)]):
            names = ", ".join(t["name"] for t in args.tasks)
            raise ValueError(f"--{option}: the tasks of this joint run ({names}) read different data and {why}; "
                             "train them in runs of their own, or give them one data set")


def task_args(args: argparse.Namespace, task: dict) -> argparse.Namespace:
    """The args an alone run of this task gets: the shared settings, its data, tuners and PER_TASK values, its
    folder."""
    values = {**vars(args), **task.get("data", {}), **{k: task[k] for k in PER_TASK}, "tuners": task["tuners"],
              "tasks": None, "config_name": task["name"], "output_dir": str(Path(args.output_dir) / task["name"])}
    return argparse.Namespace(**values)


def shared_pass(unet, handles: list, with_base: bool = False, routed: bool = False):
    """Inside: a UNet forward on N rows returns K·N rows, task k's bypass in rows k·N.. (one backbone pass);
    with_base: (K+1)·N rows, the last N the frozen base's prediction (no bypass on them). routed: the input already
    holds K·N rows, task k's own in rows k·N.., and so does the output."""
    return route_bypasses(unet, [*handles, None] if with_base else handles, broadcast=not routed)


@contextlib.contextmanager
def only(tasks: list, task) -> Iterator[None]:
    """Inside: a plain UNet forward runs `task`'s tuners alone (validation, held-out loss, export)."""
    was = [t.handle.enabled for t in tasks]
    for t in tasks:
        t.handle.enabled = t is task
    try:
        yield
    finally:
        for t, enabled in zip(tasks, was):
            t.handle.enabled = enabled
