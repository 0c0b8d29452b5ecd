"""The run's options: flags with diffusers' names over the --config YAML's train:/data: sections over defaults, checked
before anything loads. Several --config (or a sweep, or a YAML `tasks:` list) make a joint run (joint.py).

Every flag is declared once, in FLAGS (section, names, argparse keywords): the parser, the YAML's valid keys and their
types, and the defaults all come from that list.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from restune_diffusion import world
from restune_diffusion.config import load_yaml
from restune_diffusion.data import INTERPOLATION_MODES, KINDS, KOHYA_FLAGS, SCAN_MODES
from restune_diffusion.ema import DEFAULT_DECAY
from restune_diffusion.files import atomic_write_text
from restune_diffusion.flags import OneLineParser, check_flags
from restune_diffusion.methods import CONFIG_DIR
from restune_diffusion.models import TINY_NAMES, load_model, native_resolution, resolve_model
from restune_diffusion.sampling import DEFAULT_GUIDANCE, DEFAULT_SCHEDULER, DEFAULT_STEPS, SamplingSettings
from restune_diffusion.train.joint import PER_TASK, TASK_DATA, check_routed, joint_tasks, routed, task_args
from restune_diffusion.tuners import parse_tuner_configs

DEMO_CONFIG = CONFIG_DIR / "tiny_demo.yaml"  # the default job (`python train_t2i.py` with no arguments)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
REPORT_TO = ("tensorboard", "wandb", "all", "none")
NOT_IN_CONFIG = ("config", "config_name", "tuners", "resume_from_checkpoint", "tasks", "sweep_learning_rate",
                 "sweep_seed")
BOOL = argparse.BooleanOptionalAction


@dataclass(frozen=True)
class Flag:
    section: str  # "config", "joint", "data" (YAML data:) or "train" (YAML train:)
    names: tuple[str, ...]
    kwargs: dict

    @property
    def dest(self) -> str:
        return self.kwargs.get("dest") or self.names[0].removeprefix("--")


def _flags(section: str, *entries: tuple) -> list[Flag]:
    """Flags of one section from (name, ..., argparse keywords) entries."""
    return [Flag(section, entry[:-1], entry[-1]) for entry in entries]


FLAGS: tuple[Flag, ...] = (*_flags(
    "config",
    ("--config", dict(action="append", help="YAML with tuners: and optional train:/data: sections (default: "
                      "configs/tiny_demo.yaml, the tiny demo). Repeat it for a joint run: K bypasses trained in one "
                      "backbone pass, one sub-folder each"))), *_flags(
    "joint",
    ("--sweep_learning_rate", dict(type=float, nargs="+", help="one bypass per learning rate (and config)")),
    ("--sweep_seed", dict(type=int, nargs="+", help="one bypass per initialisation seed (and config); the data "
                          "order and noise follow --seed"))), *_flags(
    "data",
    ("--dataset", dict(choices=KINDS, help="the layout of --data_dir (auto: detected); hf: --dataset_name; cub200, "
                       "stanford_dogs, stanford_cars, flowers102, fgvc_aircraft, food101: a fine-grained set in its "
                       "published layout (finegrained: detected, or class folders)")),
    ("--data_dir", "--train_data_dir", dict(dest="data_dir", help="dataset folder (demo: default "
                                            "<output_dir>/demo_data, made if missing)")),
    ("--dataset_name", dict(help="a Hugging Face datasets data set: a save_to_disk folder, a folder of parquet/arrow "
                            "files, or a hub id in the local cache (offline; pip install datasets)")),
    ("--dataset_config_name", dict(help="--dataset_name: its configuration")),
    ("--split", dict(default="train", help="train or test (val, trainval where the set has them; COCO: val)")),
    ("--resolution", dict(type=int, help="default: the model's native size (512 for SD v1.5, 32 for tiny)")),
    ("--center_crop", dict(action=BOOL, default=False)),
    ("--random_flip", dict(action=BOOL, default=False)),
    ("--image_interpolation_mode", dict(choices=sorted(INTERPOLATION_MODES), default="bicubic",
                                        help="the resize filter (diffusers' names; PIL's filters)")),
    ("--caption_mode", dict(choices=("random", "all", "first"), default="random")),
    ("--caption_column", dict(default="text", help="caption column of metadata.jsonl/.csv or --dataset_name")),
    ("--image_column", dict(help="image column: file_name in metadata.jsonl/.csv ('image' is taken as file_name "
                            "there, as in HF imagefolder), image in --dataset_name (diffusers' defaults)")),
    ("--category", dict(help="finegrained: the {category} of the caption template (e.g. bird)")),
    ("--caption_template", dict(help="finegrained: the caption, {} the class name (default: the set's, e.g. 'a photo "
                                "of a {}, a type of bird')")),
    ("--class_names", dict(help="finegrained: a file with one class name per line, in the set's class order")),
    ("--caption_dropout_rate", dict(type=float, default=0.0, help="probability of an empty caption, so "
                                    "classifier-free guidance keeps working")),
    *KOHYA_FLAGS,  # kohya's caption flags, declared by the data layer (data/kohya.py)
    ("--max_train_samples", dict(type=int, help="train on the first N after a shuffle seeded by --seed")),
    ("--skip_bad_images", dict(action=BOOL, default=False)),
    ("--scan_mode", dict(choices=SCAN_MODES, default="decode", help="decode: every image decoded once before "
                         "training (cached); header: headers only")),
    ("--cache_latents", dict(action=BOOL, default=False, help="VAE latents cached on disk once and reused by later "
                             "runs (center crop only)")),
    ("--latent_cache_dir", dict(help="default: <data_dir>/.restune_cache/latents")),
    ("--dataloader_num_workers", dict(type=int, default=0)),
    # prior preservation (diffusers' DreamBooth flags; train/prior.py)
    ("--class_data_dir", dict(help="--with_prior_preservation: the class images; the missing ones (up to "
                              "--num_class_images) are generated there by the frozen base")),
    ("--class_prompt", dict(action="append", help="the class images' prompt; repeat it for several (the images cycle "
                            "over them). Also the preservation prompts when --preservation_prompts is not given")),
    ("--num_class_images", dict(type=int, default=100, help="class images to train with (generated if missing)")),
    ("--sample_batch_size", dict(type=int, default=4, help="images per pipeline call when generating class images "
                                 "(the images do not depend on it)")),
    ("--class_scheduler", dict(default=DEFAULT_SCHEDULER, help="the sampler that generates class images "
                               "(generate.py's --scheduler names)")),
    ("--class_sampling_steps", dict(type=int, default=DEFAULT_STEPS, help="denoising steps of the class images")),
    ("--class_guidance_scale", dict(type=float, default=DEFAULT_GUIDANCE, help="classifier-free guidance of the "
                                    "class images"))), *_flags(
    "train",
    ("--pretrained_model_name_or_path", dict(help="local SD v1.5 folder (diffusers layout), a hub id in the local "
                                             "Hugging Face cache (stable-diffusion-v1-5/stable-diffusion-v1-5; "
                                             "offline), or 'tiny'")),
    ("--revision", dict(help="hub id: a branch, tag or commit of the cached model (default: main)")),
    ("--variant", dict(help="weight files of this variant, e.g. fp16 (diffusion_pytorch_model.fp16.*)")),
    ("--output_dir", dict(help="default: outputs/<config name>")),
    ("--seed", dict(type=int, default=0)),
    ("--world_report", dict(action=BOOL, default=False, help="tiny world: train on a held-out concept "
                            "(--world_concept), then report base vs tuned (restune_diffusion/world)")),
    ("--world_concept", dict(default=world.CONCEPT, choices=world.CONCEPTS, help="the tiny world's concept for "
                             "--world_report")),
    ("--train_batch_size", dict(type=int, default=16, help="per device")),
    ("--num_train_epochs", dict(type=int, default=100)),
    ("--max_train_steps", dict(type=int, help="overrides --num_train_epochs")),
    ("--gradient_accumulation_steps", dict(type=int, default=1)),
    ("--gradient_checkpointing", dict(action=BOOL, default=False)),
    ("--learning_rate", dict(type=float, default=1e-4)),
    ("--scale_lr", dict(action=BOOL, default=False, help="lr x accumulation x batch size x processes (off: the lr is "
                        "used as given)")),
    ("--lr_scheduler", dict(choices=LR_SCHEDULERS, default="constant")),
    ("--lr_warmup_steps", dict(type=int, default=500)),
    ("--snr_gamma", dict(type=float, help="min-SNR weighting (5.0 recommended); off when not given")),
    ("--noise_offset", dict(type=float, default=0.0)),
    ("--prediction_type", dict(choices=("epsilon", "v_prediction"), help="default: the model's scheduler")),
    ("--use_8bit_adam", dict(action=BOOL, default=False)),
    ("--adam_beta1", dict(type=float, default=0.9)),
    ("--adam_beta2", dict(type=float, default=0.999)),
    ("--adam_weight_decay", dict(type=float, default=1e-2)),
    ("--adam_epsilon", dict(type=float, default=1e-8)),
    ("--max_grad_norm", dict(type=float, default=1.0, help="0: no clipping")),
    ("--with_prior_preservation", dict(action=BOOL, default=False, help="DreamBooth's prior preservation: each batch "
                                       "pairs its images with class images of the frozen base (--class_data_dir, "
                                       "--class_prompt), their loss weighted by --prior_loss_weight")),
    ("--prior_loss_weight", dict(type=float, default=1.0, help="the class images' loss weight")),
    ("--preservation_prompts", dict(help="base-prediction preservation: a file of prompts, one a line (default: the "
                                    "--class_prompt values)")),
    ("--preservation_weight", dict(type=float, default=0.0, help="> 0: add weight x MSE(tuned, frozen base "
                                   "prediction) on preservation prompts at each step's noisy latents and timesteps "
                                   "(0: off)")),
    ("--mixed_precision", dict(choices=("no", "fp16", "bf16"), help="default: accelerate's config")),
    ("--enable_xformers_memory_efficient_attention", dict(action=BOOL, default=False)),
    ("--allow_tf32", dict(action=BOOL, default=False, help="TF32 matmuls and convolutions on Ampere+ GPUs (faster, "
                          "~10-bit mantissa); no effect on CPU")),
    ("--use_ema", dict(action=BOOL, default=False, help="keep an EMA of the tuner weights: validation uses it, "
                       "exported as tuners_ema.safetensors")),
    ("--ema_decay", dict(type=float, default=DEFAULT_DECAY, help="the EMA's decay, ramped up as min(decay, "
                         "(1+k)/(10+k)) at update k (diffusers' EMAModel); 0.999: ~1,000 steps (ema.py)")),
    ("--checkpointing_steps", dict(type=int, default=500, help="0: no checkpoints")),
    ("--checkpoints_total_limit", dict(type=int, help="keep the newest N checkpoints")),
    ("--resume_from_checkpoint", dict(help="a checkpoint folder (or its name in output_dir), or 'latest'")),
    ("--validation_prompt", dict(action="append", help="repeat for several prompts")),
    ("--num_validation_images", dict(type=int, default=4, help="per prompt; 0: no validation")),
    ("--validation_steps", dict(type=int, default=500, help="0: validate only at the end")),
    ("--validation_epochs", dict(type=int, help="also validate every N epochs (diffusers' flag)")),
    ("--validation_split", dict(type=float, default=0.0, help="hold out this fraction of the images (kohya's flag): "
                                "never trained on, their loss at fixed noise and timesteps logged at each "
                                "validation")),
    ("--validation_seed", dict(type=int, help="which images are held out and their noise (default: --seed)")),
    ("--report_to", dict(choices=REPORT_TO, default="none", help="wandb offline: WANDB_MODE=offline"))))
DATA_KEYS = tuple(f.dest for f in FLAGS if f.section == "data")
TITLES = {"joint": "joint bypass runs (restune_diffusion/train/joint.py)", "data": "data (YAML section data:)",
          "train": "train (YAML section train:)"}


def build_parser(given_only: bool = False) -> argparse.ArgumentParser:
    """train_t2i.py's parser; given_only: no defaults, so parsing returns only the flags typed."""
    p = OneLineParser(prog="train_t2i.py", argument_default=argparse.SUPPRESS if given_only else None,
                      description="Fine-tune Stable Diffusion v1.5 with Res-Tuning and other tuners. With no "
                      "arguments: the tiny demo on CPU. Flags override the --config YAML's train:/data: keys.")
    groups = {section: p.add_argument_group(title) for section, title in TITLES.items()}
    for flag in FLAGS:
        kwargs = {k: v for k, v in flag.kwargs.items() if not (given_only and k == "default")}
        groups.get(flag.section, p).add_argument(*flag.names, **kwargs)
    return p


def option_names() -> list[str]:
    """Every option string the parser takes: argparse's help, ours, and --no-<name> of a BooleanOptionalAction."""
    return ["-h", "--help"] + [n for f in FLAGS for name in f.names
                               for n in (name, "--no-" + name[2:]) if n == name or f.kwargs.get("action") is BOOL]


def _coerce(flag: Flag, value: Any, where: str) -> Any:
    """A YAML value as the flag would give it (PyYAML reads `1e-4` as a string), or an error naming the key."""
    if value is None:
        return None
    kw, bad = flag.kwargs, None
    if kw.get("action") is BOOL:
        bad = None if isinstance(value, bool) else "true or false"
    elif kw.get("action") == "append":
        value = [value] if isinstance(value, str) else value
        bad = None if isinstance(value, list) and all(isinstance(v, str) for v in value) else "a string or a list"
    elif kw.get("type") is int:
        bad = None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    elif kw.get("type") is float:
        try:
            value = float(value)
        except (TypeError, ValueError):
            bad = "a number"
    elif value is False and "no" in kw.get("choices", ()):
        value = "no"  # YAML 1.1 reads `mixed_precision: no` as false
    elif not isinstance(value, str):
        bad = "a string"
    if bad is None and kw.get("choices") is not None and value not in kw["choices"]:
        bad = f"one of {list(kw['choices'])}"
    if bad:
        raise ValueError(f"{where}: {flag.dest} must be {bad}, got {value!r}")
    return value


def _section_values(config: dict, section: str, where: str) -> dict:
    flags = {f.dest: f for f in FLAGS if f.section == section}
    body = config.get(section) or {}
    if not isinstance(body, dict):
        raise ValueError(f"{where}: section {section}: must be a mapping, got {type(body).__name__}")  # noqa: TRY004
    unknown = sorted(set(body) - set(flags))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} in section {section}:; valid keys are {list(flags)}")
    return {k: _coerce(flags[k], v, f"{where} {section}") for k, v in body.items()}


def config_values(defaults: dict, given: dict, path: str | os.PathLike) -> list[dict]:
    """Defaults < the YAML's train:/data: < a task's train: < flags given on the command line; `tuners` from the
    YAML. One dict, or one per entry of a `tasks:` list (a joint run: name, tuners, train: with PER_TASK keys)."""
    config, where = load_yaml(path), str(path)
    values = dict(defaults)
    for section in ("train", "data"):
        values.update({k: v for k, v in _section_values(config, section, where).items() if v is not None})
    entries = config.get("tasks") if "tasks" in config else [{"name": Path(path).stem, **config}]
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"{where}: tasks: expected a non-empty list of {{name, tuners, train}} mappings, got "
                         f"{str(entries)[:80]!r}")
    runs = []
    for i, entry in enumerate(entries):
        field = f"{where}: tasks[{i}]" if "tasks" in config else where
        unknown = sorted(set(entry) - {"name", "tuners", "train", "data", "description"}) if "tasks" in config else []
        if unknown:
            raise ValueError(f"{field}: unknown key(s) {unknown}; expected name, tuners, train and data (per-task "
                             "keys)")
        if "tuners" not in entry:
            raise ValueError(f"{field}: no tuners: section; expected a list like [{{type: res_adapter, dim: 100}}]")
        parse_tuner_configs(entry["tuners"])  # named errors now, not after the models are loaded
        own = _section_values({"train": entry.get("train")}, "train", field) if "tasks" in config else {}
        if set(own) - set(PER_TASK):
            raise ValueError(f"{field}: train: keys {sorted(set(own) - set(PER_TASK))} are shared by every task of "
                             f"a joint run; set them in the top-level train: section. Per task: {', '.join(PER_TASK)}")
        own_data = _section_values({"data": entry.get("data")}, "data", field) if "tasks" in config else {}
        if set(own_data) - set(TASK_DATA):
            raise ValueError(f"{field}: data: keys {sorted(set(own_data) - set(TASK_DATA))} are shared by every "
                             "task of a joint run; set them in the top-level data: section. Per task: "
                             f"{', '.join(TASK_DATA)}")
        own.update(own_data)
        name = entry.get("name", f"task{i}")
        if not isinstance(name, str) or not re.fullmatch(r"[\w.+-]+", name):
            raise ValueError(f"{field}: name must be a folder name (letters, digits, . _ + -), got {name!r}")
        runs.append({**values, **{k: v for k, v in own.items() if v is not None}, **given, "tuners": entry["tuners"],
                     "config": str(path), "config_name": name, "joint": "tasks" in config})
    return runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Defaults < the YAML's train:/data: < flags given on the command line (no --config: configs/tiny_demo.yaml).
    Several --config, a sweep or a `tasks:` list make a joint run: `args.tasks` holds one entry per bypass."""
    argv, notes = check_flags(sys.argv[1:] if argv is None else argv, option_names())  # diffusers/kohya: one line
    for note in notes:
        print(note)
    defaults = {f.dest: f.kwargs.get("default") for f in FLAGS if f.dest != "config"}
    given = vars(build_parser(given_only=True).parse_args(argv))
    paths = given.pop("config", None) or [DEMO_CONFIG]
    runs = [run for path in paths for run in config_values(defaults, given, path)]
    single = [run.pop("joint") for run in runs] == [False]
    if single and runs[0]["sweep_learning_rate"] is None and runs[0]["sweep_seed"] is None:
        return check_args(argparse.Namespace(**runs[0], tasks=None))
    return check_args(argparse.Namespace(**joint_tasks(runs)))


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
    check_preservation_args(args)
    if args.resolution is None:
        args.resolution = model_resolution(args.pretrained_model_name_or_path, args.revision)
    args.output_dir = args.output_dir or os.path.join("outputs", args.config_name)
    if args.world_report:
        world.use_concept_data(args)
    default_data_dir(args)
    if args.tasks:
        check_task_data(args)
    return args


def default_data_dir(args) -> None:
    """The demo writes its images into <output_dir>/demo_data; every other layout needs its folder."""
    if args.data_dir is None and args.dataset != "hf":
        if args.dataset != "demo":
            raise ValueError(f"--dataset {args.dataset} needs --data_dir (the dataset folder)")
        args.data_dir = os.path.join(args.output_dir, "demo_data")


def check_task_data(args) -> None:
    """A joint run: tasks given the same data read the run's (resolved above); tasks on data of their own (a routed
    run, joint.py) each have theirs checked and resolved as an alone run of the task would, and what a routed run
    cannot take is refused."""
    if not routed(args):
        for task in args.tasks:
            task["data"] = {k: getattr(args, k) for k in TASK_DATA}
        return
    for task in args.tasks:
        alone = task_args(args, task)
        check_data_args(alone)
        default_data_dir(alone)
        task["data"] = {k: getattr(alone, k) for k in TASK_DATA}
    if routed(args):
        check_routed(args)


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


def check_preservation_args(args) -> None:
    """Prior preservation needs its class folder and prompts (as in diffusers), base-prediction preservation its
    prompts; the numbers in range; the class sampler valid. Before anything loads."""
    for name in ("num_class_images", "sample_batch_size", "class_sampling_steps"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    for name in ("prior_loss_weight", "preservation_weight"):
        if not getattr(args, name) >= 0:
            raise ValueError(f"--{name} must be a number >= 0, got {getattr(args, name)}")
    if args.class_prompt is not None and not all(p.strip() for p in args.class_prompt):
        raise ValueError(f"--class_prompt: expected non-empty prompts, got {args.class_prompt!r}")
    SamplingSettings(scheduler=args.class_scheduler, steps=args.class_sampling_steps)  # a bad sampler name, now
    if args.with_prior_preservation:
        if not args.class_data_dir:
            raise ValueError("--with_prior_preservation needs --class_data_dir (the class images' folder; the missing "
                             "ones are generated there)")
        if not args.class_prompt:
            raise ValueError("--with_prior_preservation needs --class_prompt (the class images' prompt, e.g. 'a photo "
                             "of a dog'; repeat it for several)")
        if args.enable_bucket:
            raise ValueError("--with_prior_preservation with --enable_bucket: the class images are square and each "
                             "batch pairs them with instance images of one size; train without --enable_bucket")
    elif args.class_data_dir:
        print("--class_data_dir: not used without --with_prior_preservation")
    weight = max(preservation_weights(args))
    if weight:
        if args.preservation_prompts is None and not args.class_prompt:
            raise ValueError(f"--preservation_weight {weight:g} needs prompts: "
                             "--preservation_prompts FILE (one a line) or --class_prompt")
        if args.preservation_prompts is not None:
            read_prompts(args.preservation_prompts)  # a missing or empty file, now


def read_prompts(path: str | os.PathLike) -> list[str]:
    """The prompts of a --preservation_prompts file: one a line, blank lines skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read the --preservation_prompts file ({err}); expected a UTF-8 text file "
                         "with one prompt a line") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: the --preservation_prompts file holds no prompt; expected one prompt a line")
    return prompts


def preservation_weights(args) -> list[float]:
    """--preservation_weight of the run, and of each task of a joint run (a per-task setting)."""
    return [args.preservation_weight, *(t["preservation_weight"] for t in args.tasks or [])]


def preservation_prompts(args) -> list[str] | None:
    """The prompts of base-prediction preservation (one list for every task of a run: the tasks of a joint run share
    their batches): the file's, else the class prompts; None when no task uses them."""
    if not max(preservation_weights(args)):
        return None
    return read_prompts(args.preservation_prompts) if args.preservation_prompts else list(args.class_prompt)


def model_resolution(name_or_path: str, revision: str | None = None) -> int:
    """The model's native image size (models.native_resolution), read from its config files before any weights
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


def resolved_config(args: argparse.Namespace) -> dict:
    """The run's settings as a --config YAML body: train:/data: with every value in effect, and tuners:."""
    values = {k: v for k, v in vars(args).items() if k not in NOT_IN_CONFIG}
    return {"description": f"resolved by train_t2i.py from {args.config} and the command-line flags",
            "train": {k: v for k, v in values.items() if k not in DATA_KEYS},
            "data": {k: v for k, v in values.items() if k in DATA_KEYS},
            "tuners": args.tuners}


def write_resolved_config(args: argparse.Namespace, path: Path) -> Path:
    return atomic_write_text(path, yaml.safe_dump(resolved_config(args), sort_keys=False))
