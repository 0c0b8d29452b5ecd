"""Text-to-image fine-tuning of SD v1.5 with attached tuners, over accelerate (multi-GPU, mixed precision, gradient
accumulation). Used by `train_t2i.py`; reads top to bottom as diffusers' train_text_to_image_lora.py: options ->
data scan -> models -> optimizer -> loop (checkpoints, validation) -> export.

Resume is exact (PITFALLS "resume that silently drops the adapters"): tuner tensors, optimizer, LR schedule, RNG and
accelerate's step counter travel in `checkpoint-<step>/`; the data order is a function of (seed, epoch) and every
random draw of a batch (VAE sample, noise, timesteps) comes from a generator seeded by (seed, process, epoch, batch),
so a resumed run replays the numbers of an uninterrupted one. What a resume may change (applied and logged, or
refused with the reason), what makes a checkpoint complete and which one `latest` is: checkpoints.py. Several
bypasses in one backbone pass (several --config, a sweep): joint.py.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from restune_diffusion import world
from restune_diffusion.attach import attach
from restune_diffusion.checkpoints import (
    STATE_FILE,
    DiskWriteError,
    checkpoint_step,
    compare_settings,
    data_fingerprint,
    find_checkpoint,
    list_checkpoints,
    newest_file,
    prune_checkpoints,
    read_state,
    set_aside_newer,
    weights_fingerprint,
    write_error,
    write_state,
)
from restune_diffusion.cli import run_cli
from restune_diffusion.config import load_yaml
from restune_diffusion.data import (
    INTERPOLATION_MODES,
    KINDS,
    SCAN_MODES,
    build_dataloader,
    load_dataset,
    tokenize_captions,
    write_caption_set,
)
from restune_diffusion.ema import DEFAULT_DECAY, EMA_FILE, TunerEMA
from restune_diffusion.exports import DIFFUSERS_LORA_FILE, save_diffusers_lora, save_kohya_lora
from restune_diffusion.files import atomic_write, atomic_write_text, clean_stale_temps
from restune_diffusion.flags import OneLineParser, check_flags
from restune_diffusion.latent_cache import build_latent_cache, open_latent_cache
from restune_diffusion.memory import peak_memory_bytes
from restune_diffusion.modelcard import CARD_FILE, write_model_card
from restune_diffusion.models import TINY_NAMES, build_pipeline, load_model, native_resolution, resolve_model
from restune_diffusion.report import format_report
from restune_diffusion.sampling import NonFiniteImagesError, SamplingSettings, generate, make_grid
from restune_diffusion.tuners import parse_tuner_configs, to_dicts
from restune_diffusion.weights import load_tuners_into, save_tuners

# The built-in demo (`python train_t2i.py` with no arguments). configs/tiny_demo.yaml holds the same text (a test
# keeps them equal); it is embedded so the demo runs from any working directory and from an installed package.
TINY_DEMO_YAML = """\
description: >
  The built-in demo (`python train_t2i.py` with no arguments): Res-Tuning teaches the pretrained tiny base a concept
  it has never seen (the tiny world's star, restune_diffusion/world.py) on CPU in about a minute, then writes
  before_after.png (base vs tuned, same prompts and seeds) and world_report.json (prompt accuracy and domain FID,
  before and after). Res-Tuning as in configs/res_tuning.yaml at toy size, with the Res-Adapter (bottleneck 32) also
  beside cross-attention, where the new word meets the image (measured here: 0.15 -> 0.23 prompt accuracy at lr
  5e-3, 400 steps): a Res-Adapter in parallel with every FFN and cross-attention and a Res-Prompt branch (2 tokens,
  learnable lambda from 0) beside self-attention.
tuners:
  - type: res_adapter
    dim: 32
    targets: [ff, attn2]
  - type: res_prompt
    num_tokens: 2
    targets: [attn1]
    lam: learnable
train:
  pretrained_model_name_or_path: tiny
  train_batch_size: 8
  learning_rate: 1.0e-2
  lr_scheduler: cosine
  lr_warmup_steps: 25
  max_train_steps: 500
  checkpointing_steps: 0
  validation_steps: 0
  validation_prompt:
    - a red star on a white background
    - a blue star on a black background
  num_validation_images: 4
  seed: 0
  world_report: true
data:
  dataset: imagefolder
  resolution: 32
  center_crop: true
  random_flip: true
"""

DATA_KEYS = ("dataset", "data_dir", "dataset_name", "dataset_config_name", "split", "resolution", "center_crop",
             "random_flip", "image_interpolation_mode", "caption_mode", "caption_column", "image_column", "category",
             "caption_template", "class_names", "caption_dropout_rate", "max_train_samples", "skip_bad_images",
             "scan_mode", "cache_latents", "latent_cache_dir", "dataloader_num_workers")
LATENT_CACHE_DIR = os.path.join(".restune_cache", "latents")  # inside the data folder, beside the scan cache
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
TUNERS_FILE = "tuners.safetensors"
CONFIG_FILE = "train_config.yaml"  # the resolved config: `--config` on it repeats the run
NOT_IN_CONFIG = ("config", "config_name", "tuners", "resume_from_checkpoint", "tasks", "sweep_learning_rate",
                 "sweep_seed")
LORA_FILE = DIFFUSERS_LORA_FILE
KOHYA_LORA_FILE = "lora_kohya.safetensors"  # A1111/ComfyUI/kohya naming
LOG_FILE = "train_log.jsonl"
VALIDATION_INFERENCE_STEPS = 30  # as diffusers' LoRA script
HELDOUT_TIMESTEPS = 4  # each held-out sample is scored at t = (k + 1/2)·T/4: 125, 375, 625, 875 for T = 1000
REPORT_TO = ("tensorboard", "wandb", "all", "none")


class NonFiniteLossError(RuntimeError):
    """The loss became nan/inf; training stopped and the last good checkpoint was kept."""


# ---------------------------------------------------------------------------------------------------------------------
# options: flags (diffusers' names) over the YAML's train:/data: sections over defaults
def build_parser() -> argparse.ArgumentParser:
    bool_flag = argparse.BooleanOptionalAction
    p = OneLineParser(
        prog="train_t2i.py", description="Fine-tune Stable Diffusion v1.5 with Res-Tuning and other tuners. "
        "With no arguments: the built-in tiny demo on CPU. Flags override the --config YAML's train:/data: keys.")
    p.add_argument("--config", action="append",
                   help="YAML with tuners: and optional train:/data: sections (default: the tiny demo). Repeat it "
                   "for a joint run: K bypasses trained in one backbone pass, one sub-folder each")
    j = p.add_argument_group("joint bypass runs (restune_diffusion.joint)")
    j.add_argument("--sweep_learning_rate", type=float, nargs="+", help="one bypass per learning rate (and config)")
    j.add_argument("--sweep_seed", type=int, nargs="+", help="one bypass per initialisation seed (and config); "
                   "the data order and noise follow --seed")
    d = p.add_argument_group("data (YAML section data:)")
    d.add_argument("--dataset", choices=KINDS, help="the layout of --data_dir (auto: detected); hf: --dataset_name; "
                   "cub200, stanford_dogs, stanford_cars, flowers102, fgvc_aircraft, food101: a fine-grained set in "
                   "its published layout (finegrained: detected, or class folders)")
    d.add_argument("--data_dir", "--train_data_dir", dest="data_dir",
                   help="dataset folder (demo: default <output_dir>/demo_data, made if missing)")
    d.add_argument("--dataset_name", help="a Hugging Face datasets data set: a save_to_disk folder, a folder of "
                   "parquet/arrow files, or a hub id in the local cache (offline; pip install datasets)")
    d.add_argument("--dataset_config_name", help="--dataset_name: its configuration")
    d.add_argument("--split", default="train", help="train or test (val, trainval where the set has them; COCO: val)")
    d.add_argument("--resolution", type=int, help="default: the model's native size (512 for SD v1.5, 32 for tiny)")
    d.add_argument("--center_crop", action=bool_flag, default=False)
    d.add_argument("--random_flip", action=bool_flag, default=False)
    d.add_argument("--image_interpolation_mode", choices=sorted(INTERPOLATION_MODES), default="bicubic",
                   help="the resize filter (diffusers' names; PIL's filters)")
    d.add_argument("--caption_mode", choices=("random", "all", "first"), default="random")
    d.add_argument("--caption_column", default="text", help="caption column of metadata.jsonl/.csv or --dataset_name")
    d.add_argument("--image_column", help="image column: file_name in metadata.jsonl/.csv ('image' is taken as "
                   "file_name there, as in HF imagefolder), image in --dataset_name (diffusers' defaults)")
    d.add_argument("--category", help="finegrained: the {category} of the caption template (e.g. bird)")
    d.add_argument("--caption_template", help="finegrained: the caption, {} the class name (default: the set's, e.g. "
                   "'a photo of a {}, a type of bird')")
    d.add_argument("--class_names", help="finegrained: a file with one class name per line, in the set's class order")
    d.add_argument("--caption_dropout_rate", type=float, default=0.0,
                   help="probability of an empty caption, so classifier-free guidance keeps working")
    d.add_argument("--max_train_samples", type=int, help="train on the first N after a shuffle seeded by --seed")
    d.add_argument("--skip_bad_images", action=bool_flag, default=False)
    d.add_argument("--scan_mode", choices=SCAN_MODES, default="decode",
                   help="decode: every image decoded once before training (cached); header: headers only")
    d.add_argument("--cache_latents", action=bool_flag, default=False,
                   help="VAE latents cached on disk once and reused by later runs (center crop only)")
    d.add_argument("--latent_cache_dir", help="default: <data_dir>/.restune_cache/latents")
    d.add_argument("--dataloader_num_workers", type=int, default=0)
    t = p.add_argument_group("train (YAML section train:)")
    t.add_argument("--pretrained_model_name_or_path", help="local SD v1.5 folder (diffusers layout), a hub id in the "
                   "local Hugging Face cache (stable-diffusion-v1-5/stable-diffusion-v1-5; offline), or 'tiny'")
    t.add_argument("--revision", help="hub id: a branch, tag or commit of the cached model (default: main)")
    t.add_argument("--variant", help="weight files of this variant, e.g. fp16 (diffusion_pytorch_model.fp16.*)")
    t.add_argument("--output_dir", help="default: outputs/<config name>")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--world_report", action=bool_flag, default=False,
                   help="tiny world: train on its held-out concept, then report base vs tuned (world.py)")
    t.add_argument("--train_batch_size", type=int, default=16, help="per device")
    t.add_argument("--num_train_epochs", type=int, default=100)
    t.add_argument("--max_train_steps", type=int, help="overrides --num_train_epochs")
    t.add_argument("--gradient_accumulation_steps", type=int, default=1)
    t.add_argument("--gradient_checkpointing", action=bool_flag, default=False)
    t.add_argument("--learning_rate", type=float, default=1e-4)
    t.add_argument("--scale_lr", action=bool_flag, default=False,
                   help="lr x accumulation x batch size x processes (off: the lr is used as given)")
    t.add_argument("--lr_scheduler", choices=LR_SCHEDULERS, default="constant")
    t.add_argument("--lr_warmup_steps", type=int, default=500)
    t.add_argument("--snr_gamma", type=float, help="min-SNR weighting (5.0 recommended); off when not given")
    t.add_argument("--noise_offset", type=float, default=0.0)
    t.add_argument("--prediction_type", choices=("epsilon", "v_prediction"), help="default: the model's scheduler")
    t.add_argument("--use_8bit_adam", action=bool_flag, default=False)
    t.add_argument("--adam_beta1", type=float, default=0.9)
    t.add_argument("--adam_beta2", type=float, default=0.999)
    t.add_argument("--adam_weight_decay", type=float, default=1e-2)
    t.add_argument("--adam_epsilon", type=float, default=1e-8)
    t.add_argument("--max_grad_norm", type=float, default=1.0, help="0: no clipping")
    t.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), help="default: accelerate's config")
    t.add_argument("--enable_xformers_memory_efficient_attention", action=bool_flag, default=False)
    t.add_argument("--allow_tf32", action=bool_flag, default=False, help="TF32 matmuls and convolutions on Ampere+ "
                   "GPUs (faster, ~10-bit mantissa); no effect on CPU")
    t.add_argument("--use_ema", action=bool_flag, default=False, help="keep an EMA of the tuner weights: validation "
                   "uses it, exported as tuners_ema.safetensors")
    t.add_argument("--ema_decay", type=float, default=DEFAULT_DECAY, help="the EMA's decay, ramped up as "
                   "min(decay, (1+k)/(10+k)) at update k (diffusers' EMAModel); 0.999: ~1,000 steps (ema.py)")
    t.add_argument("--checkpointing_steps", type=int, default=500, help="0: no checkpoints")
    t.add_argument("--checkpoints_total_limit", type=int, help="keep the newest N checkpoints")
    t.add_argument("--resume_from_checkpoint", help="a checkpoint folder (or its name in output_dir), or 'latest'")
    t.add_argument("--validation_prompt", action="append", help="repeat for several prompts")
    t.add_argument("--num_validation_images", type=int, default=4, help="per prompt; 0: no validation")
    t.add_argument("--validation_steps", type=int, default=500, help="0: validate only at the end")
    t.add_argument("--validation_epochs", type=int, help="also validate every N epochs (diffusers' flag)")
    t.add_argument("--validation_split", type=float, default=0.0, help="hold out this fraction of the images (kohya's "
                   "flag): never trained on, their loss at fixed noise and timesteps logged at each validation")
    t.add_argument("--validation_seed", type=int, help="which images are held out and their noise (default: --seed)")
    t.add_argument("--report_to", choices=REPORT_TO, default="none", help="wandb offline: WANDB_MODE=offline")
    return p


def _coerce(action: argparse.Action, value: Any, where: str) -> Any:
    """A YAML value as the flag would give it (PyYAML reads `1e-4` as a string), or an error naming the key."""
    if value is None:
        return None
    key, bad = f"{where}: {action.dest}", None
    if isinstance(action, argparse.BooleanOptionalAction):
        bad = None if isinstance(value, bool) else "true or false"
    elif isinstance(action, argparse._AppendAction):
        value = [value] if isinstance(value, str) else value
        bad = None if isinstance(value, list) and all(isinstance(v, str) for v in value) else "a string or a list"
    elif action.type is int:
        bad = None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    elif action.type is float:
        try:
            value = float(value)
        except (TypeError, ValueError):
            bad = "a number"
    elif value is False and action.choices is not None and "no" in action.choices:
        value = "no"  # YAML 1.1 reads `mixed_precision: no` as false
    elif not isinstance(value, str):
        bad = "a string"
    if bad is None and action.choices is not None and value not in action.choices:
        bad = f"one of {list(action.choices)}"
    if bad:
        raise ValueError(f"{key} must be {bad}, got {value!r}")
    return value


def _section_values(parser: argparse.ArgumentParser, config: dict, section: str, where: str) -> dict:
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    valid = [k for k in actions if (k in DATA_KEYS) == (section == "data")]
    body = config.get(section) or {}
    if not isinstance(body, dict):
        raise ValueError(f"{where}: section {section}: must be a mapping, got {type(body).__name__}")  # noqa: TRY004
    unknown = sorted(set(body) - set(valid))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} in section {section}:; valid keys are {valid}")
    return {k: _coerce(actions[k], v, f"{where} {section}") for k, v in body.items()}


def config_values(parser, defaults: dict, given: dict, path: str | None) -> list[dict]:
    """Defaults < the YAML's train:/data: < a task's train: < flags given on the command line; `tuners` from the
    YAML. One dict, or one per entry of a `tasks:` list (a joint run: name, tuners, train: with PER_TASK keys)."""
    config = load_yaml(path) if path else yaml.safe_load(TINY_DEMO_YAML)
    where = str(path) if path else "built-in tiny demo config"
    values = dict(defaults)
    for section in ("train", "data"):
        values.update({k: v for k, v in _section_values(parser, config, section, where).items() if v is not None})
    stem = Path(path).stem if path else "tiny_demo"
    entries = config.get("tasks") if "tasks" in config else [{"name": stem, **config}]
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"{where}: tasks: expected a non-empty list of {{name, tuners, train}} mappings, got "
                         f"{str(entries)[:80]!r}")
    runs = []
    for i, entry in enumerate(entries):
        field = f"{where}: tasks[{i}]" if "tasks" in config else where
        unknown = sorted(set(entry) - {"name", "tuners", "train", "data", "description"}) if "tasks" in config else []
        if unknown:
            raise ValueError(f"{field}: unknown key(s) {unknown}; expected name, tuners and train (per-task keys)")
        if "tuners" not in entry:
            raise ValueError(f"{field}: no tuners: section; expected a list like [{{type: res_adapter, dim: 100}}]")
        parse_tuner_configs(entry["tuners"])  # named errors now, not after the models are loaded
        own = _section_values(parser, {"train": entry.get("train")}, "train", field) if "tasks" in config else {}
        if set(own) - set(PER_TASK):
            raise ValueError(f"{field}: train: keys {sorted(set(own) - set(PER_TASK))} are shared by every task of "
                             f"a joint run; set them in the top-level train: section. Per task: {', '.join(PER_TASK)}")
        name = entry.get("name", f"task{i}")
        if not isinstance(name, str) or not re.fullmatch(r"[\w.+-]+", name):
            raise ValueError(f"{field}: name must be a folder name (letters, digits, . _ + -), got {name!r}")
        runs.append({**values, **{k: v for k, v in own.items() if v is not None}, **given, "tuners": entry["tuners"],
                     "config": path, "config_name": name, "joint": "tasks" in config})
    return runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Defaults < the YAML's train:/data: < flags given on the command line. Several --config or a sweep: a joint
    run, `args.tasks` holds one entry per bypass (joint_tasks)."""
    parser = build_parser()
    argv, notes = check_flags(sys.argv[1:] if argv is None else argv, parser)  # a diffusers/kohya flag: one line
    for note in notes:
        print(note)
    defaults = vars(parser.parse_args([]))
    explicit = build_parser()
    for action in explicit._actions:
        action.default = argparse.SUPPRESS  # parse only what was typed
    given = vars(explicit.parse_args(argv))
    paths = given.pop("config", None) or [None]
    runs = [run for path in paths for run in config_values(parser, defaults, given, path)]
    single = [run.pop("joint") for run in runs] == [False]
    if single and runs[0]["sweep_learning_rate"] is None and runs[0]["sweep_seed"] is None:
        return check_args(argparse.Namespace(**runs[0], tasks=None))
    return check_args(argparse.Namespace(**joint_tasks(runs)))


PER_TASK = ("learning_rate", "lr_scheduler", "lr_warmup_steps", "seed", "adam_beta1", "adam_beta2",
            "adam_weight_decay", "adam_epsilon", "max_grad_norm", "snr_gamma")


def joint_tasks(runs: list[dict]) -> dict:
    """The values of a joint run: the settings every config shares (one data stream, one backbone pass), and
    `tasks`, one per bypass: name, tuners and the PER_TASK settings, crossed with the sweeps."""
    first = runs[0]
    for run in runs[1:]:
        differ = [k for k in first if k not in (*PER_TASK, "tuners", "config", "config_name") and run[k] != first[k]]
        if differ:
            k = differ[0]
            raise ValueError(f"{run['config']}: {k} is {run[k]!r} where {first['config']} has {first[k]!r}; a joint "
                             f"run shares it (one data stream, one backbone pass); only {', '.join(PER_TASK)} may "
                             "differ per bypass")
    tasks = []
    for run in runs:
        types = [c.type for c in parse_tuner_configs(run["tuners"])]
        if types != ["bypass"]:
            raise ValueError(f"{run['config'] or 'the built-in demo config'}: a joint run shares one backbone pass "
                             f"per step, which only a bypass allows (it reads detached features); got tuners "
                             f"{types}. Give each joint config one `type: bypass` tuner, and train the others in "
                             "runs of their own")
        for lr in run["sweep_learning_rate"] or [run["learning_rate"]]:
            for seed in run["sweep_seed"] or [run["seed"]]:
                name = run["config_name"] + (f"-lr{lr:g}" if run["sweep_learning_rate"] else "") + (
                    f"-seed{seed}" if run["sweep_seed"] else "")
                tasks.append({"name": name, "tuners": run["tuners"], **{k: run[k] for k in PER_TASK},
                              "learning_rate": lr, "seed": seed})
    names = [t["name"] for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"--config: the joint run's bypasses need distinct names (config file stems), got {names}")
    return {**first, "tasks": tasks, "tuners": None, "config_name": "+".join(dict.fromkeys(
        r["config_name"] for r in runs))}


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    for name in ("resolution", "train_batch_size", "num_train_epochs", "gradient_accumulation_steps",
                 "max_train_steps", "checkpoints_total_limit", "validation_epochs"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name} must be a positive integer, got {value}")
    for name in ("checkpointing_steps", "validation_steps", "num_validation_images", "lr_warmup_steps", "seed",
                 "dataloader_num_workers"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if not 0.0 <= args.validation_split < 1.0:
        raise ValueError(f"--validation_split must be a fraction in [0, 1), got {args.validation_split}")
    if not 0.0 < args.ema_decay < 1.0:
        raise ValueError(f"--ema_decay must be in (0, 1), got {args.ema_decay}")
    if args.pretrained_model_name_or_path is None:
        raise ValueError(f"{args.config}: no model. Pass --pretrained_model_name_or_path (a local Stable Diffusion "
                         "v1.5 folder in the diffusers layout, or 'tiny' for the built-in tiny model)")
    check_data_args(args)
    if args.resolution is None:
        args.resolution = model_resolution(args.pretrained_model_name_or_path, args.revision)
    args.output_dir = args.output_dir or os.path.join("outputs", args.config_name)
    if args.world_report:
        world.use_concept_data(args)
    if args.data_dir is None and args.dataset != "hf":
        if args.dataset != "demo":
            raise ValueError(f"--dataset {args.dataset} needs --data_dir (the dataset folder)")
        args.data_dir = os.path.join(args.output_dir, "demo_data")
    return args


def check_data_args(args) -> None:
    """The data set to read: --dataset_name wins over a dataset: of the YAML (as in diffusers), --data_dir alone
    is detected; the numeric data options in range."""
    if args.dataset_name:
        if args.dataset not in (None, "hf"):
            print(f"--dataset_name {args.dataset_name}: reading it with datasets (dataset: {args.dataset} not used)")
        args.dataset = "hf"
    elif args.dataset == "hf":
        raise ValueError("--dataset hf needs --dataset_name (a save_to_disk folder, parquet/arrow folder or cached "
                         "hub id)")
    elif args.dataset is None and args.data_dir is not None:
        args.dataset = "auto"
    if args.dataset is None:
        raise ValueError("no dataset: pass --data_dir (--train_data_dir) with --dataset "
                         f"{'|'.join(k for k in KINDS if k != 'hf')}, or --dataset_name")
    if args.max_train_samples is not None and args.max_train_samples <= 0:
        raise ValueError(f"--max_train_samples must be a positive integer, got {args.max_train_samples}")
    if not 0.0 <= args.caption_dropout_rate <= 1.0:
        raise ValueError(f"--caption_dropout_rate must be a probability in [0, 1], got {args.caption_dropout_rate}")


def model_resolution(name_or_path: str, revision: str | None = None) -> int:
    """The model's native image size (generate.native_resolution), read from its config files before any weights
    load: a config made for SD v1.5 used with `tiny` trains at tiny's 32 px, not at 512."""
    from types import SimpleNamespace

    if name_or_path in TINY_NAMES:
        sd = load_model(name_or_path)
        unet, vae = sd.unet.config, sd.vae.config
    else:
        root = resolve_model(name_or_path, revision)
        unet, vae = (SimpleNamespace(**json.loads((root / s / "config.json").read_text())) for s in ("unet", "vae"))
    factor = 2 ** (len(vae.block_out_channels) - 1)
    return native_resolution(SimpleNamespace(unet=SimpleNamespace(config=unet), vae=SimpleNamespace(config=vae),
                                             vae_scale_factor=factor))


def check_report_to(args) -> None:
    """--report_to tensorboard/wandb without the package would log nothing (accelerate only warns): stop before
    loading. wandb with no login would wait for the network: offline mode, said once (`wandb sync` uploads later)."""
    install = {"tensorboard": "pip install tensorboard (or pip install -e '.[tensorboard]')",
               "wandb": "pip install wandb"}
    if args.report_to in install and importlib.util.find_spec(args.report_to) is None:
        raise ImportError(f"--report_to {args.report_to} needs the {args.report_to} package: {install[args.report_to]}"
                          "; or pass --report_to none")
    if args.report_to in ("wandb", "all") and importlib.util.find_spec("wandb") is not None:
        netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
        logged_in = os.environ.get("WANDB_API_KEY") or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
        if not logged_in and "WANDB_MODE" not in os.environ:
            os.environ["WANDB_MODE"] = "offline"
            print("--report_to wandb: no WANDB_API_KEY or wandb login: logging offline (WANDB_MODE=offline) into "
                  "OUTPUT_DIR/logs/wandb; `wandb sync` uploads it later")


def warn_single_process(accelerator) -> None:
    """`accelerate launch --num_processes N --cpu` starts ONE process (PITFALLS, multi-CPU): it sets MASTER_ADDR for
    N processes but no WORLD_SIZE. Say so instead of training N times slower in silence."""
    asked = "MASTER_ADDR" in os.environ and "ACCELERATE_USE_CPU" in os.environ and "WORLD_SIZE" not in os.environ
    if asked and accelerator.num_processes == 1:
        accelerator.print("warning: several processes were asked for (accelerate launch --num_processes) but ONE "
                          "started: accelerate's CPU launcher runs a single process. For N processes on CPU use "
                          "`torchrun --nproc_per_node N train_t2i.py ...`; on GPUs drop --cpu")


def warn_long_warmup(args, max_train_steps: int, accelerator) -> None:
    if args.lr_scheduler != "constant" and args.lr_warmup_steps >= max_train_steps:
        accelerator.print(f"warning: --lr_warmup_steps {args.lr_warmup_steps} is not shorter than the run "
                          f"({max_train_steps} steps): the learning rate never reaches {args.learning_rate:g}. "
                          "Pass a smaller --lr_warmup_steps")


def resolved_config(args: argparse.Namespace) -> dict:
    """The run's settings as a --config YAML body: train:/data: with every value in effect, and tuners:."""
    values = {k: v for k, v in vars(args).items() if k not in NOT_IN_CONFIG}
    source = args.config or "the built-in tiny demo config"
    return {"description": f"resolved by train_t2i.py from {source} and the command-line flags",
            "train": {k: v for k, v in values.items() if k not in DATA_KEYS},
            "data": {k: v for k, v in values.items() if k in DATA_KEYS},
            "tuners": args.tuners}


def write_resolved_config(args: argparse.Namespace, path: Path) -> Path:
    return atomic_write_text(path, yaml.safe_dump(resolved_config(args), sort_keys=False))


# ---------------------------------------------------------------------------------------------------------------------
# the loss (the "training step" the tests drive on a fixed batch)
def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023) per sample, (B,): min(SNR, γ)/SNR for ε-prediction and
    min(SNR, γ)/(SNR+1) for v-prediction (diffusers PR #6307 fixed the v form)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)  # (B,)
    clipped = torch.clamp(snr, max=gamma)
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return clipped / snr
    if kind == "v_prediction":
        return clipped / (snr + 1)
    raise ValueError(f"snr_gamma: prediction_type {kind!r} is not supported; expected 'epsilon' or 'v_prediction'")


def prediction_target(noise_scheduler, latents, noise, timesteps) -> torch.Tensor:
    """What the UNet learns to predict: ε, or v = α·ε − σ·x0. (B, 4, h, w)"""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type {kind!r} is not supported; expected 'epsilon' or 'v_prediction'")


def prediction_loss(pred, target, noise_scheduler, timesteps, snr_gamma: float | None) -> torch.Tensor:
    """The mean over the batch of the per-sample MSE, min-SNR weighted when snr_gamma is given. Scalar."""
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
    if snr_gamma is not None:
        loss = loss * min_snr_weights(noise_scheduler, timesteps, snr_gamma)
    return loss.mean()


def diffusion_loss(unet, noise_scheduler, latents, text_states, noise, timesteps, snr_gamma: float | None = None):
    """MSE between the UNet's prediction and its target (ε, or v = α·ε − σ·x0) on latents noised at `timesteps`."""
    target = prediction_target(noise_scheduler, latents, noise, timesteps)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)  # (B, 4, h, w)
    pred = unet(noisy, timesteps, text_states, return_dict=False)[0]
    return prediction_loss(pred, target, noise_scheduler, timesteps, snr_gamma)


def seed_for(*keys: int) -> int:
    """A 62-bit seed from non-negative ints (seed, process, epoch, batch): independent streams, no global RNG."""
    return int(np.random.default_rng(list(keys)).integers(2**62))


@torch.no_grad()
def batch_inputs(batch: dict, sd, generator: torch.Generator, noise_offset: float, dtype: torch.dtype, device):
    """(latents, text states, noise, timesteps) of a batch; the frozen VAE and text encoder run in `dtype`."""
    if "latent_parameters" in batch:  # --cache_latents: the cached posterior, sampled with an encode's draws
        posterior = DiagonalGaussianDistribution(batch["latent_parameters"].to(device, dtype))  # (B, 2C, h, w)
    else:
        posterior = sd.vae.encode(batch["pixel_values"].to(device, dtype)).latent_dist
    latents = posterior.sample(generator=generator) * sd.vae.config.scaling_factor  # (B, 4, h, w)
    ids = tokenize_captions(sd.tokenizer, batch["captions"]).to(device)
    text_states = sd.text_encoder(ids, return_dict=False)[0]  # (B, 77, D)
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    if noise_offset:  # per-channel offset (crosslabs' "diffusion with offset noise")
        offset = torch.randn((*latents.shape[:2], 1, 1), generator=generator, device=device, dtype=latents.dtype)
        noise = noise + noise_offset * offset
    steps = sd.noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator, device=device).long()
    return latents, text_states, noise, timesteps


# ---------------------------------------------------------------------------------------------------------------------
# models
class TunedUNet(nn.Module):
    """The UNet and its tuner set as one module for `accelerator.prepare`: the tuners live outside the UNet's module
    tree (attach.py), so without this DDP would neither see nor sync their gradients."""

    def __init__(self, unet, handle):
        super().__init__()
        self.unet = unet
        self.tuners = handle.module

    def forward(self, *args, **kwargs):
        return self.unet(*args, **kwargs)


def weight_dtype_of(accelerator) -> torch.dtype:
    """The dtype of the frozen weights, from the one source of mixed precision (PITFALLS: unscale FP16 gradients)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def load_base(args, accelerator):
    """The SD components on the device in fp32, before any tuner. Returns (sd, the base UNet's fingerprint)."""
    sd = load_model(args.pretrained_model_name_or_path, dtype=torch.float32, device=accelerator.device,
                    revision=args.revision, variant=args.variant)
    base_fingerprint = weights_fingerprint(sd.unet)  # before any cast
    if args.prediction_type:
        sd.noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    if args.enable_xformers_memory_efficient_attention:
        if importlib.util.find_spec("xformers") is None or not torch.cuda.is_available():
            raise ImportError("--enable_xformers_memory_efficient_attention needs xformers and a CUDA GPU "
                              "(pip install -e '.[xformers]'); without the flag PyTorch SDPA is used")
        sd.unet.enable_xformers_memory_efficient_attention()  # before attach: our processors wrap the kernel
    return sd, base_fingerprint


def freeze_and_cast(args, sd, handles: list, weight_dtype: torch.dtype) -> None:
    """Frozen parts in `weight_dtype`, trainables stay fp32 (PITFALLS: unscale FP16 gradients)."""
    sd.vae.requires_grad_(False)
    sd.text_encoder.requires_grad_(False)
    full = any(h.full_unet for h in handles)
    frozen = [sd.vae, sd.text_encoder] + ([] if full else [sd.unet])  # full: the UNet trains, in fp32
    for module in frozen if weight_dtype != torch.float32 else []:
        module.to(weight_dtype)
    if args.gradient_checkpointing:
        sd.unet.enable_gradient_checkpointing()  # diffusers 0.42: non-reentrant (PITFALLS: starved adapters)
    not_fp32 = [tuple(p.shape) for h in handles for p in h.trainable_parameters() if p.dtype != torch.float32]
    if not_fp32:
        raise RuntimeError(f"trainable parameters must be fp32 (mixed precision keeps master weights in fp32); "
                           f"{len(not_fp32)} are not, e.g. shape {not_fp32[0]}")


def build_models(args, accelerator, weight_dtype: torch.dtype):
    """SD components on the device, tuners attached (fp32), frozen parts in `weight_dtype`. Returns (sd, handle,
    the base UNet's fingerprint taken before any cast)."""
    sd, base_fingerprint = load_base(args, accelerator)
    handle = attach(sd.unet, args.tuners, name="default")
    freeze_and_cast(args, sd, [handle], weight_dtype)
    return sd, handle, base_fingerprint


# ---------------------------------------------------------------------------------------------------------------------
# data
def build_dataset(args, accelerator):
    """Scan and build the dataset before any model is loaded; print what the scan found (PITFALLS: caption loss).
    The main process scans first and writes the scan cache (<data_dir>/.restune_cache/scan.json), the others read
    it; the derived caption set (fine-grained sets) goes to <output_dir>/captions.json."""
    if args.cache_latents and not args.center_crop:
        raise ValueError("--cache_latents: random crop cannot be cached (each epoch needs a new crop of the full "
                         "image); pass --center_crop or drop --cache_latents")
    image_column = args.image_column or ("image" if args.dataset == "hf" else "file_name")
    options = {"resolution": args.resolution, "center_crop": args.center_crop, "random_flip": args.random_flip,
               "interpolation": args.image_interpolation_mode, "seed": args.seed, "split": args.split,
               "caption_mode": args.caption_mode, "caption_column": args.caption_column, "image_column": image_column,
               "category": args.category, "template": args.caption_template, "class_names": args.class_names,
               "dataset_config_name": args.dataset_config_name, "max_train_samples": args.max_train_samples,
               "caption_dropout_rate": args.caption_dropout_rate, "skip_bad_images": args.skip_bad_images,
               "scan_mode": args.scan_mode, "progress": accelerator.is_local_main_process}
    with accelerator.main_process_first():
        dataset = load_dataset(args.dataset, args.dataset_name if args.dataset == "hf" else args.data_dir, **options)
    accelerator.print(dataset.report.summary())
    if accelerator.is_main_process:
        path = write_caption_set(dataset.report, args.output_dir)
        if path is not None:
            accelerator.print(f"caption set ({len(dataset.report.derived_captions)} captions with counts): {path}")
    return dataset


def build_loader(args, dataset, sd, accelerator, weight_dtype: torch.dtype):
    """The loader; with --cache_latents over the on-disk latent cache (latent_cache.py): each process encodes its
    share of what is missing, then all read it (a later run encodes nothing)."""
    if args.cache_latents:
        cache_dir = args.latent_cache_dir or os.path.join(dataset.report.data_dir, LATENT_CACHE_DIR)
        folder = build_latent_cache(dataset, sd.vae, cache_dir, rank=accelerator.process_index,
                                    num_processes=accelerator.num_processes, batch_size=args.train_batch_size,
                                    device=accelerator.device, dtype=weight_dtype)
        accelerator.wait_for_everyone()
        dataset = open_latent_cache(folder, dataset)
        accelerator.print(f"--cache_latents: the VAE posteriors of {len(dataset)} samples from {folder}")
    return build_dataloader(dataset, args.train_batch_size, shuffle=True, seed=args.seed,
                            num_workers=args.dataloader_num_workers)


# ---------------------------------------------------------------------------------------------------------------------
# optimizer and schedule
def effective_lr(args, num_processes: int) -> float:
    """--learning_rate, times accumulation x batch x processes with --scale_lr (opt-in, as in diffusers)."""
    if args.scale_lr:
        return args.learning_rate * args.gradient_accumulation_steps * args.train_batch_size * num_processes
    return args.learning_rate


def adamw_class(args):
    """torch's AdamW, or bitsandbytes' 8-bit one with --use_8bit_adam."""
    if not args.use_8bit_adam:
        return torch.optim.AdamW
    try:
        import bitsandbytes
    except ImportError:
        raise ImportError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
    return bitsandbytes.optim.AdamW8bit


def build_optimizer(args, params: list, accelerator, max_train_steps: int):
    """AdamW (8-bit with --use_8bit_adam) over the tuner parameters only, and diffusers' LR schedule."""
    from diffusers.optimization import get_scheduler

    lr = effective_lr(args, accelerator.num_processes)
    optimizer = adamw_class(args)(params, lr=lr, betas=(args.adam_beta1, args.adam_beta2),
                                weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    # the prepared scheduler steps once per process per optimizer step (accelerate), hence the factor
    n = accelerator.num_processes
    schedule = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps * n,
                             num_training_steps=max_train_steps * n)
    note = (f"scaled by --scale_lr from {args.learning_rate:g} x {args.gradient_accumulation_steps} accumulation x "
            f"{args.train_batch_size} batch x {n} processes" if args.scale_lr else "as given; --scale_lr is off")
    accelerator.print(f"learning rate: {lr:g} ({note}), schedule {args.lr_scheduler}, "
                      f"warmup {args.lr_warmup_steps} steps")
    return optimizer, schedule


# ---------------------------------------------------------------------------------------------------------------------
# checkpoints
def register_state_hooks(accelerator, handles: dict, emas: dict | None = None) -> None:
    """save_state/load_state carry the tuner tensors only (`tuners.safetensors`, self-describing, loadable by
    weights.load_tuners), never the frozen UNet, and load them strictly. Full fine-tuning: the UNet is in them.
    `handles`: file name inside the checkpoint -> handle (joint runs: one file per task); `emas`: file name -> the
    TunerEMA of --use_ema (its average and update count, as a tuner file)."""
    emas = emas or {}
    def ours(model) -> bool:
        return isinstance(accelerator.unwrap_model(model), TunedUNet)

    def save_hook(models, weights, output_dir):
        for i in reversed(range(len(models))):
            if ours(models[i]):
                weights.pop(i)  # accelerate would write the whole UNet's state dict
        if accelerator.is_main_process:
            for name, handle in handles.items():
                save_tuners(Path(output_dir) / name, handle)
            for name, ema in emas.items():
                ema.save(Path(output_dir) / name)

    def load_hook(models, input_dir):
        for i in reversed(range(len(models))):
            if ours(models[i]):
                models.pop(i)
        count = sum(load_tuners_into(handle, Path(input_dir) / name) for name, handle in handles.items())
        for name, ema in emas.items():
            if not (Path(input_dir) / name).is_file():
                raise ValueError(f"{Path(input_dir) / name}: missing; --use_ema needs a checkpoint of a run with it")
            count += ema.load(Path(input_dir) / name)
        accelerator.print(f"{input_dir}: loaded {count} tuner tensors")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(run: Run) -> Path:
    """accelerate state into `.checkpoint-<step>.tmp/` on every rank, then (main, after a barrier) the state file
    with every file's size, rename to `checkpoint-<step>/` and prune: `latest` never sees a half-written checkpoint.
    A full disk or a file-size limit: one line naming the file; the temp folder is removed, older ones stay."""
    a, step = run.accelerator, run.global_step
    final, tmp = run.output_dir / f"checkpoint-{step}", run.output_dir / f".checkpoint-{step}.tmp"
    if a.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    a.wait_for_everyone()
    try:
        a.save_state(str(tmp))
        a.wait_for_everyone()  # every rank's random_states_<rank>.pkl is in
        if a.is_main_process:
            write_state(tmp, {"global_step": step, "epoch": step // run.steps_per_epoch, "settings": run.settings})
    except (OSError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and not re.search(r"writ|unexpected pos", str(err)):
            raise  # not an I/O failure: a bug, keep its traceback
        file = Path(getattr(err, "filename", None) or newest_file(tmp))
        file = final / file.relative_to(tmp) if file.is_relative_to(tmp) else file  # the name it was to have
        shutil.rmtree(tmp, ignore_errors=True)  # frees the space it took
        raise write_error(file, f"checkpoint-{step}", err, run.output_dir) from err
    if a.is_main_process:
        if final.exists():  # the same step written again by a run resumed from an earlier checkpoint
            shutil.rmtree(final)
        os.rename(tmp, final)
        prune_checkpoints(run.output_dir, run.args.checkpoints_total_limit)
    a.wait_for_everyone()
    return final


def check_resume_settings(path: Path, now: dict) -> list[str]:
    """Before anything loads: refuse what cannot change on resume (seed, batch, data options, tuners, ...) with the
    reason; return the changes that will be applied, for the log. Old checkpoints without settings: nothing to check."""
    saved = read_state(path).get("settings")
    return compare_settings(path, saved, now) if isinstance(saved, dict) else []


def apply_optimizer_settings(optimizer, schedule, lrs: list[float], adam: list[dict]) -> None:
    """load_state put the checkpoint's LR and Adam settings into the optimizer and schedule; set this run's, at the
    restored step (LambdaLR: lr = base_lr · λ(step), λ rebuilt from this run's schedule flags)."""
    opt = getattr(optimizer, "optimizer", optimizer)  # under accelerate's wrapper
    sched = getattr(schedule, "scheduler", schedule)
    for group, lr, settings in zip(opt.param_groups, lrs, adam):
        group.update(initial_lr=lr, **settings)
    sched.base_lrs = list(lrs)
    for group, base, fn in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * fn(sched.last_epoch)
    sched._last_lr = [group["lr"] for group in opt.param_groups]


def adam_settings(args) -> dict:
    return {"betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon,
            "weight_decay": args.adam_weight_decay}


def resume(run: Run, path: Path) -> None:
    """Load tuners, optimizer, LR schedule, RNG and accelerate's step; global_step from the checkpoint's name and
    state file (not from the LR scheduler, musubi PR #915); then this run's LR, schedule and Adam settings (item 1 of
    issue 13: never print one value and use another); newer checkpoints of the abandoned run moved aside."""
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
    apply_optimizer_settings(run.optimizer, run.lr_scheduler, [effective_lr(run.args, a.num_processes)],
                             [adam_settings(run.args)])
    for line in run.resume_notes:
        a.print(f"{path.name}: {line}")
    a.print(f"resumed from {path} at step {step}")
    if a.is_main_process:
        moved = set_aside_newer(run.output_dir, step)
        if moved:
            a.print(f"moved the abandoned run's newer checkpoints aside: {', '.join(str(p) for p in moved)}")
    a.wait_for_everyone()


# ---------------------------------------------------------------------------------------------------------------------
# validation
def generate_grid(sd, prompts: list[str], num_images: int, resolution: int, seed: int, weight_dtype, device):
    """A row of `num_images` per prompt from the live tuned UNet (sampling.generate, image i of the grid from seed +
    i), through a pipeline over the components in memory, without casting any of them (PITFALLS: validation
    downcasts the live model; validation OOM), decoded in fp32. None (and a warning) if some came out NaN/Inf."""
    settings = SamplingSettings(steps=VALIDATION_INFERENCE_STEPS, seed=seed, batch_size=num_images)
    try:
        images = generate(build_pipeline(sd), [p for p in prompts for _ in range(num_images)], settings,
                          height=resolution, width=resolution, amp_dtype=weight_dtype, fp32_decode=True)[0]
    except NonFiniteImagesError as err:
        print(f"warning: validation images not written: {err}", file=sys.stderr)
        return None
    return make_grid(images, cols=num_images)  # a row per prompt


def validation_weights(run: Run):
    """Inside: the weights validation uses, the EMA under --use_ema (ema.TunerEMA.applied), else the live ones."""
    return run.ema.applied() if run.ema is not None else contextlib.nullcontext()


def validation_due(run: Run, step: int) -> bool:
    """Every --validation_steps steps, at the end of every --validation_epochs-th epoch, and at the last step."""
    args, per_epoch = run.args, run.steps_per_epoch
    by_epochs = bool(args.validation_epochs and step % per_epoch == 0 and (step // per_epoch) % args.validation_epochs
                     == 0)
    return step == run.max_train_steps or bool(args.validation_steps and step % args.validation_steps == 0) or by_epochs


def validate(run: Run) -> Path | None:
    """Grid of the validation prompts at this step: validation/step-<N>.png (main process) and the trackers."""
    a, args = run.accelerator, run.args
    if not (args.validation_prompt and args.num_validation_images) or not a.is_main_process:
        return None
    with validation_weights(run):
        grid = generate_grid(run.sd, args.validation_prompt, args.num_validation_images, args.resolution, args.seed,
                             run.weight_dtype, a.device)
    if grid is None:
        return None
    path = atomic_write(run.output_dir / "validation" / f"step-{run.global_step}.png",
                        lambda tmp: grid.save(tmp, format="PNG"))
    for tracker in a.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.asarray(grid)[None], run.global_step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({"validation": [np.asarray(grid)]}, step=run.global_step)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    run.validated_at = run.global_step
    return path


# ---------------------------------------------------------------------------------------------------------------------
# held-out validation loss (kohya's --validation_split)
def validation_seed(args) -> int:
    return args.seed if args.validation_seed is None else args.validation_seed


def split_heldout(dataset, fraction: float, seed: int):
    """(training part, held-out part or None): a seeded `fraction` of the images (at least one) never trained on.
    Both parts are shallow copies of `dataset` with their own `samples` (what the data classes index), split by image
    so that no image is on both sides (COCO's captions of one image are several samples); no caption dropout in the
    held-out part."""
    if not fraction:
        return dataset, None
    samples = getattr(dataset, "samples", None)
    if samples is None:
        raise ValueError(f"--validation_split: the data set ({type(dataset).__name__}) has no sample list to split")
    images = list(dict.fromkeys(str(s.path) for s in samples))
    count = max(1, round(len(images) * fraction))
    if count >= len(images):
        raise ValueError(f"--validation_split {fraction}: holds out {count} of {len(images)} images, leaving none to "
                         "train on; pass a smaller fraction")
    order = np.random.default_rng([seed, 17]).permutation(len(images))  # 17: a stream of its own
    held = {images[i] for i in order[:count]}
    train_part, heldout = copy.copy(dataset), copy.copy(dataset)
    train_part.samples = [s for s in samples if str(s.path) not in held]
    heldout.samples = [s for s in samples if str(s.path) in held]
    if hasattr(heldout, "caption_dropout_rate"):
        heldout.caption_dropout_rate = 0.0
    return train_part, heldout


@torch.no_grad()
def heldout_loss(run: Run) -> float:
    """The training loss (min-SNR weighted with --snr_gamma) of the held-out images with the model as it is: each at
    HELDOUT_TIMESTEPS fixed timesteps with noise seeded by (validation seed, image index, timestep), latents the VAE
    posterior's mean. The same weights give the same number, whatever the batch size or the step."""
    args, sd, data, device = run.args, run.sd, run.heldout, run.accelerator.device
    seed, num = validation_seed(args), sd.noise_scheduler.config.num_train_timesteps
    steps = [int((k + 0.5) * num / HELDOUT_TIMESTEPS) for k in range(HELDOUT_TIMESTEPS)]
    autocast = (torch.autocast(device.type, dtype=run.weight_dtype) if run.weight_dtype != torch.float32
                else contextlib.nullcontext())
    training, total = run.model.training, 0.0
    run.model.eval()
    try:
        for start in range(0, len(data), args.train_batch_size):
            items = [data[i] for i in range(start, min(start + args.train_batch_size, len(data)))]
            pixels = torch.stack([item["pixel_values"] for item in items]).to(device, run.weight_dtype)
            latents = sd.vae.encode(pixels).latent_dist.mode() * sd.vae.config.scaling_factor  # (B, 4, h, w)
            ids = tokenize_captions(sd.tokenizer, [item["caption"] for item in items]).to(device)
            text_states = sd.text_encoder(ids, return_dict=False)[0]  # (B, 77, D)
            for k, t in enumerate(steps):
                noise = torch.stack([torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(
                    seed_for(seed, start + i, k))) for i in range(len(items))]).to(device, latents.dtype)
                timesteps = torch.full((len(items),), t, device=device, dtype=torch.long)
                with autocast:
                    loss = diffusion_loss(sd.unet, sd.noise_scheduler, latents, text_states, noise, timesteps,
                                          args.snr_gamma)
                total += loss.item() * len(items)
    finally:
        run.model.train(training)
    return total / (len(data) * len(steps))


def measure_heldout(run: Run) -> float | None:
    """The held-out loss with the weights validation uses (the EMA under --use_ema); main process, else None."""
    if run.heldout is None or not run.accelerator.is_main_process:
        return None
    with validation_weights(run):
        return heldout_loss(run)


# ---------------------------------------------------------------------------------------------------------------------
# the loop
@dataclass
class Run:
    """What the loop touches, built once by `train`."""

    args: argparse.Namespace
    accelerator: Any
    sd: Any
    handle: Any
    model: Any  # TunedUNet after accelerator.prepare (DDP-wrapped when distributed)
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
    settings: dict = field(default_factory=dict)  # what a resume compares (checkpoints.compare_settings)
    resume_notes: list = field(default_factory=list)  # settings changed on resume, applied
    ema: Any = None  # ema.TunerEMA under --use_ema
    heldout: Any = None  # the held-out part of the data set (--validation_split)


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


def update_ema(emas: list, optimizer) -> None:
    """After an optimizer step (not per micro-batch); a step the fp16 grad scaler skipped changed nothing."""
    if not getattr(optimizer, "step_was_skipped", False):
        for ema in emas:
            ema.update()


def after_step(run: Run, loss: float, epoch: int, bar) -> None:
    """Log the step (with the held-out loss when validation is due); checkpoint and validate on their schedules."""
    a, args, step = run.accelerator, run.args, run.global_step
    lr = run.lr_scheduler.get_last_lr()[0]
    due = validation_due(run, step)
    val = measure_heldout(run) if due else None
    values = {"loss": loss, "lr": lr, **({"val_loss": val} if val is not None else {})}
    if a.is_main_process:
        try:
            with open(run.output_dir / LOG_FILE, "a") as f:
                f.write(json.dumps({"step": step, "epoch": epoch, **values}) + "\n")
        except OSError as err:
            raise write_error(run.output_dir / LOG_FILE, f"the log line of step {step}", err, run.output_dir) from err
    a.log({"train_loss": loss, "lr": lr, **({"val_loss": val} if val is not None else {})}, step=step)
    bar.update(1)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", **({"val": f"{val:.4f}"} if val is not None else {}))
    if args.checkpointing_steps and step % args.checkpointing_steps == 0:
        save_checkpoint(run)
    if due:
        validate(run)


def check_gradients(run: Run, params: list, loss: float) -> None:
    """Clip (max_grad_norm 0: measure only); a non-finite norm stops before the update. Under fp16 the grad scaler
    skips such steps itself (inf gradients are how it finds its scale)."""
    a = run.accelerator
    norm = a.clip_grad_norm_(params, run.args.max_grad_norm or math.inf)
    if a.scaler is None and norm is not None and not torch.isfinite(norm):
        step = run.global_step + 1
        raise NonFiniteLossError(f"step {step}: the gradient norm is {float(norm)} (loss {loss:.4g}); the update was "
                                 f"not applied. {recovery_note(run.output_dir, step)}")


def micro_step(run: Run, params: list, batch: dict, epoch: int, index: int) -> float:
    """One micro-batch: loss (stop before backward if non-finite), backward; at the accumulation boundary clip,
    check the gradients and update. Returns the loss averaged over every process."""
    a, args = run.accelerator, run.args
    with a.accumulate(run.model):
        generator = torch.Generator(a.device).manual_seed(seed_for(args.seed, a.process_index, epoch, index))
        inputs = batch_inputs(batch, run.sd, generator, args.noise_offset, run.weight_dtype, a.device)
        loss = diffusion_loss(run.model, run.sd.noise_scheduler, *inputs, snr_gamma=args.snr_gamma)
        mean = a.gather(loss.detach().repeat(len(batch["captions"]))).mean().item()  # same on every rank
        if not math.isfinite(mean):
            step = run.global_step + 1
            raise NonFiniteLossError(f"step {step}: loss is {mean}; the update was not applied. "
                                     f"{recovery_note(run.output_dir, step)}")
        a.backward(loss)
        if a.sync_gradients:
            check_gradients(run, params, mean)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return mean


def train_loop(run: Run) -> None:
    from tqdm.auto import tqdm

    a, accum = run.accelerator, run.args.gradient_accumulation_steps
    params = run.handle.trainable_parameters()
    first_epoch = run.global_step // run.steps_per_epoch
    skip = (run.global_step % run.steps_per_epoch) * accum  # batches of the current epoch already consumed
    bar = tqdm(total=run.max_train_steps, initial=run.global_step, desc="steps", disable=not a.is_local_main_process)
    with bar:  # closed on errors too, so an error message starts its own line
        run.model.train()
        micro: list[float] = []
        for epoch in range(first_epoch, run.num_epochs):
            if run.global_step >= run.max_train_steps:
                break
            for index, batch in epoch_batches(run, epoch, skip if epoch == first_epoch else 0):
                micro.append(micro_step(run, params, batch, epoch, index))
                if a.sync_gradients:
                    run.global_step += 1
                    update_ema([run.ema] if run.ema is not None else [], run.optimizer)
                    after_step(run, sum(micro) / len(micro), epoch, bar)
                    micro = []
                    if run.global_step >= run.max_train_steps:
                        break


# ---------------------------------------------------------------------------------------------------------------------
# outputs
def read_log(output_dir: Path, upto: int | None = None, say=None) -> list[dict]:
    """The per-step records of train_log.jsonl. A torn last line (a kill during the append) is dropped, and named
    through `say`; a bad line before the last is an error naming the file and line."""
    path = output_dir / LOG_FILE
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


def export(run: Run, seconds: float, steps_run: int) -> dict:
    """Final tuners (+ diffusers and kohya LoRA files), sample grid, loss curve and summary; main process, barrier."""
    a, out = run.accelerator, run.output_dir
    a.wait_for_everyone()
    if run.validated_at != run.global_step:
        validate(run)
    if not a.is_main_process:
        return {}
    handle = run.handle  # the tensors of the unwrapped model: keys without DDP's `module.`
    header = {k: str(v) for k, v in header_facts(run).items() if v is not None}
    files = {"tuners": str(save_tuners(out / TUNERS_FILE, handle, extra_metadata=header))}
    if run.ema is not None:
        files["tuners_ema"] = str(run.ema.save(out / EMA_FILE, header))
    if any(c.type == "lora" for c in handle.configs):
        files["lora"] = str(save_diffusers_lora(out, handle))
        files["lora_kohya"] = str(save_kohya_lora(out / KOHYA_LORA_FILE, handle,
                                                  base_model=run.args.pretrained_model_name_or_path))
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
    summary = summarize(run, files, seconds, steps_run, records)
    write_model_card(out, summary)
    return summary


def header_facts(run: Run) -> dict:
    """What the tuner file's header records about its making (weights.py): base, steps, data."""
    args, settings = run.args, run.settings
    return {"base_model": str(args.pretrained_model_name_or_path), "base_model_revision": args.revision,
            "base_model_variant": args.variant, "base_model_fingerprint": settings.get("base_model"),
            "global_step": run.global_step, "dataset": args.dataset, "data_dir": str(args.data_dir),
            "num_train_samples": len(run.loader.dataset), "data_fingerprint": settings.get("data")}


def summarize(run: Run, files: dict, seconds: float, steps_run: int, records: list | None = None) -> dict:
    """summary.json: sizes, memory, time, and the facts of the model card (modelcard.py) and the file header."""
    args, a = run.args, run.accelerator
    unet_params = sum(p.numel() for p in run.sd.unet.parameters())
    trainable = run.handle.num_parameters()
    peak, how = peak_memory_bytes(a.device)
    facts = header_facts(run)
    held = [r["val_loss"] for r in records or [] if r.get("val_loss") is not None]
    summary = {"global_step": run.global_step, "trainable_params": trainable, "unet_params": unet_params,
               "trainable_percent": 100 * trainable / unet_params, "peak_memory_bytes": peak,
               "peak_memory_kind": how, "train_seconds": seconds, "steps_run": steps_run,
               "name": args.config_name, "tuners": to_dicts(run.handle.configs),
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
    atomic_write_text(run.output_dir / "summary.json", json.dumps(summary, indent=1))
    rate = f"{steps_run / seconds:.2f} steps/s" if seconds > 0 and steps_run else "no steps run"
    run.accelerator.print(
        f"\ntrainable parameters: {trainable:,} ({summary['trainable_percent']:.3f}% of the UNet's {unet_params:,})\n"
        f"peak memory: {peak / 2**30:.2f} GiB ({how})\n"
        f"trained to step {run.global_step} in {seconds:.1f} s ({rate})\n"
        + "".join(f"{name}: {path}\n" for name, path in files.items()))
    return summary


# ---------------------------------------------------------------------------------------------------------------------
def set_tf32(args) -> None:
    """--allow_tf32: TF32 matmuls and cuDNN convolutions (Ampere and newer; nothing changes on CPU). Off leaves
    PyTorch's defaults, as diffusers' scripts do."""
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def tracker_kwargs(args) -> dict:
    """wandb writes its run folder under OUTPUT_DIR/logs (made here), not into the working directory."""
    if args.report_to not in ("wandb", "all"):
        return {}
    logs = Path(args.output_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return {"wandb": {"dir": str(logs)}}


def say_heldout(heldout, accelerator) -> None:
    if heldout is not None:
        images = len({str(s.path) for s in heldout.samples})
        accelerator.print(f"--validation_split: {images} images ({len(heldout)} samples) held out, never trained on; "
                          "their loss is logged as val_loss at each validation")


def make_accelerator(args):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    out = Path(args.output_dir)
    project = ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs"))
    log_with = None if args.report_to == "none" else args.report_to  # "all": every tracker installed
    # torchrun without CUDA: accelerate only picks up the gloo process group with cpu=True (PITFALLS, multi-CPU)
    cpu = int(os.environ.get("LOCAL_RANK", -1)) != -1 and not torch.cuda.is_available()
    return Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps, cpu=cpu,
                       mixed_precision=args.mixed_precision, log_with=log_with, project_config=project)


def check_fresh_start(output_dir: Path, resume_from: Path | None, args, accelerator) -> None:
    """A fresh run into a folder with another run's checkpoints would mix them (pruning, `latest`): refuse."""
    found = list_checkpoints(output_dir)
    if resume_from is None and found:
        raise ValueError(f"{output_dir}: holds checkpoints of an earlier run ({', '.join(p.name for p in found)}). "
                         "Pass --resume_from_checkpoint latest to continue it, or another --output_dir")
    if args.resume_from_checkpoint == "latest" and resume_from is None:
        accelerator.print(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}, starting a fresh run")


def prepare_run(args, accelerator, sd, handle, loader, weight_dtype) -> Run:
    sampler = loader.sampler  # ours, before accelerate wraps the loader
    model = TunedUNet(sd.unet, handle)
    n = accelerator.num_processes  # accelerate shards the batches: ceil(len / n) per process (even_batches)
    steps_per_epoch = math.ceil(math.ceil(len(loader) / n) / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    optimizer, schedule = build_optimizer(args, handle.trainable_parameters(), accelerator, max_steps)
    model, optimizer, loader, schedule = accelerator.prepare(model, optimizer, loader, schedule)
    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)  # per process, after sharding
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    ema = TunerEMA(handle, args.ema_decay) if args.use_ema else None
    register_state_hooks(accelerator, {TUNERS_FILE: handle}, {EMA_FILE: ema} if ema is not None else None)
    accelerator.print(
        f"{len(loader.dataset)} samples, {len(loader)} batches per epoch and process, {steps_per_epoch} steps per "
        f"epoch; {max_steps} steps = {num_epochs} epochs; batch {args.train_batch_size} per device x "
        f"{accelerator.num_processes} processes x {args.gradient_accumulation_steps} accumulation = "
        f"{args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps} per step")
    return Run(args, accelerator, sd, handle, model, optimizer, schedule, loader, sampler, weight_dtype,
               Path(args.output_dir), steps_per_epoch, max_steps, num_epochs, ema=ema)


def run_settings(args, num_processes: int) -> dict:
    """The settings a checkpoint records and a resume compares: the resolved config (flat), the tuner configs with
    their defaults filled in, and the process count."""
    resolved = resolved_config(args)
    return {**resolved["train"], **resolved["data"], "tuners": to_dicts(parse_tuner_configs(args.tuners)),
            "num_processes": num_processes}


def check_output_dir(out: Path) -> None:
    """Fail before any model loads when the output folder cannot be written: one line naming it. Then remove the
    temp files of writers killed mid-write (weights.clean_stale_temps)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"{out}: cannot write to the output folder ({err.strerror or err}); pass a writable "
                              "--output_dir") from None
    clean_stale_temps(out)


def train(args: argparse.Namespace) -> dict:
    """The whole job: returns the summary (trainable params, peak memory, files) on the main process."""
    from accelerate.utils import set_seed

    if getattr(args, "tasks", None):
        raise ValueError("several --config or a sweep make a joint run: use restune_diffusion.joint.train_joint "
                         "(train_t2i.py does)")
    check_report_to(args)
    set_tf32(args)
    accelerator = make_accelerator(args)
    out = Path(args.output_dir)
    if accelerator.is_main_process:
        check_output_dir(out)
    warn_single_process(accelerator)
    resume_from = find_checkpoint(out, args.resume_from_checkpoint, accelerator.print)  # fails before any loading
    check_fresh_start(out, resume_from, args, accelerator)
    settings = run_settings(args, accelerator.num_processes)
    notes = check_resume_settings(resume_from, settings) if resume_from else []  # refusals before any loading
    set_seed(args.seed)  # tuner initialisation; batches draw from their own seeded generators
    dataset = build_dataset(args, accelerator)
    dataset, heldout = split_heldout(dataset, args.validation_split, validation_seed(args))
    say_heldout(heldout, accelerator)
    settings["data"] = data_fingerprint(dataset)
    if resume_from:
        check_resume_settings(resume_from, {"data": settings["data"]})
    weight_dtype = weight_dtype_of(accelerator)
    sd, handle, settings["base_model"] = build_models(args, accelerator, weight_dtype)
    if resume_from:
        check_resume_settings(resume_from, {"base_model": settings["base_model"]})
    accelerator.print(format_report(handle))
    loader = build_loader(args, dataset, sd, accelerator, weight_dtype)
    run = prepare_run(args, accelerator, sd, handle, loader, weight_dtype)
    run.settings, run.resume_notes, run.heldout = settings, notes, heldout
    warn_long_warmup(args, run.max_train_steps, accelerator)
    if resume_from is not None:
        resume(run, resume_from)
    if accelerator.is_main_process:
        records = read_log(out, upto=run.global_step, say=accelerator.print)  # later steps are replayed
        atomic_write_text(out / LOG_FILE, "".join(json.dumps(r) + "\n" for r in records))
        write_resolved_config(args, out / CONFIG_FILE)
    if accelerator.is_main_process and args.report_to != "none":
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("restune-diffusion", config=config, init_kwargs=tracker_kwargs(args))
    start_step, start = run.global_step, time.time()
    train_loop(run)
    summary = export(run, time.time() - start, run.global_step - start_step)
    if args.world_report and accelerator.is_main_process:
        summary["world"] = world.before_after_report(out, out / TUNERS_FILE, args.pretrained_model_name_or_path)
    finish_trackers(accelerator)
    return summary


def finish_trackers(accelerator) -> None:
    """The end of a run, as a library call: trackers finished, the process group kept. accelerate's end_training()
    also destroys the group, and a second run in the same process (the table's rows) would then join the same
    torchrun store again with its stale rendezvous keys (3 of 4 two-process tries failed to connect); the CLI closes
    the group once, at exit (close_process_group)."""
    for tracker in accelerator.trackers:
        tracker.finish()


def close_process_group() -> None:
    """Destroy the torch.distributed group of this process, if any (the end of a CLI run)."""
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
