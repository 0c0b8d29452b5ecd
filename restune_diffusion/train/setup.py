"""Everything a run builds before its first step, in diffusers' script order: the accelerator, the data set (scanned
before any model loads), the models with each task's tuners attached, the loader, the optimizer and the prepared
modules. Mixed precision has one source (accelerate's): the frozen parts in its dtype, every trainable in fp32
(PITFALLS: "Attempting to unscale FP16 gradients").
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from pathlib import Path

import torch
from torch import nn

from restune_diffusion.attach import attach
from restune_diffusion.data import (
    KOHYA_DATA_KEYS,
    PairedDataset,
    TaskDatasets,
    build_dataloader,
    load_dataset,
    report_buckets,
    write_caption_set,
)
from restune_diffusion.ema import EMA_FILE, TunerEMA
from restune_diffusion.files import clean_stale_temps
from restune_diffusion.latent_cache import build_latent_cache, open_latent_cache
from restune_diffusion.models import load_model
from restune_diffusion.train.checkpoints import list_checkpoints, register_state_hooks
from restune_diffusion.train.joint import routed, shared_pass, task_args
from restune_diffusion.train.loop import Run, Task
from restune_diffusion.train.optimizer import build_optimizer
from restune_diffusion.train.outputs import TUNERS_FILE
from restune_diffusion.train.prior import class_cache_key
from restune_diffusion.train.resume import weights_fingerprint

LATENT_CACHE_DIR = os.path.join(".restune_cache", "latents")  # inside the data folder, beside the scan cache


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


def check_output_dir(out: Path) -> None:
    """Fail before any model loads when the output folder cannot be written: one line naming it. Then remove the
    temp files of writers killed mid-write (files.clean_stale_temps)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"{out}: cannot write to the output folder ({err.strerror or err}); pass a writable "
                              "--output_dir") from None
    clean_stale_temps(out)


def check_fresh_start(output_dir: Path, resume_from: Path | None, args, accelerator) -> None:
    """A fresh run into a folder with another run's checkpoints would mix them (pruning, `latest`): refuse."""
    found = list_checkpoints(output_dir)
    if resume_from is None and found:
        raise ValueError(f"{output_dir}: holds checkpoints of an earlier run ({', '.join(p.name for p in found)}). "
                         "Pass --resume_from_checkpoint latest to continue it, or another --output_dir")
    if args.resume_from_checkpoint == "latest" and resume_from is None:
        accelerator.print(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}, starting a fresh run")


def warn_single_process(accelerator) -> None:
    """`accelerate launch --num_processes N --cpu` starts ONE process (PITFALLS, multi-CPU): it sets MASTER_ADDR for
    N processes but no WORLD_SIZE. Say so instead of training N times slower in silence."""
    asked = "MASTER_ADDR" in os.environ and "ACCELERATE_USE_CPU" in os.environ and "WORLD_SIZE" not in os.environ
    if asked and accelerator.num_processes == 1:
        accelerator.print("warning: several processes were asked for (accelerate launch --num_processes) but ONE "
                          "started: accelerate's CPU launcher runs a single process. For N processes on CPU use "
                          "`torchrun --nproc_per_node N train_t2i.py ...`; on GPUs drop --cpu")


def warn_long_warmup(task: Task, max_train_steps: int, accelerator) -> None:
    args = task.args
    if args.lr_scheduler != "constant" and args.lr_warmup_steps >= max_train_steps:
        accelerator.print(f"warning: --lr_warmup_steps {args.lr_warmup_steps} is not shorter than the run "
                          f"({max_train_steps} steps): the learning rate never reaches {args.learning_rate:g}. "
                          "Pass a smaller --lr_warmup_steps")


def make_tasks(args) -> list[Task]:
    """A single run is one task writing into the output folder; a joint run one task per bypass (joint.task_args),
    each in its sub-folder."""
    if not args.tasks:
        return [Task(args.config_name, args, Path(args.output_dir))]
    return [Task(spec["name"], task_args(args, spec), Path(args.output_dir) / spec["name"], f"{spec['name']}/")
            for spec in args.tasks]


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
               "scan_mode": args.scan_mode, "progress": accelerator.is_local_main_process,
               **{k: getattr(args, k) for k in KOHYA_DATA_KEYS}}
    with accelerator.main_process_first():
        dataset = load_dataset(args.dataset, args.dataset_name if args.dataset == "hf" else args.data_dir, **options)
    accelerator.print(dataset.report.summary())
    buckets = report_buckets(dataset, args.output_dir if accelerator.is_main_process else None)  # bucket_table.json
    if buckets:
        accelerator.print(buckets)
    if accelerator.is_main_process:
        path = write_caption_set(dataset.report, args.output_dir)
        if path is not None:
            accelerator.print(f"caption set ({len(dataset.report.derived_captions)} captions with counts): {path}")
    return dataset


def build_datasets(args, tasks: list[Task], accelerator):
    """The run's data set: one, or for a joint run whose tasks read their own data (joint.routed) one per task in
    a data.TaskDatasets, each scanned and reported as its alone run would (caption set in the task's folder)."""
    if not routed(args):
        return build_dataset(args, accelerator)
    parts = []
    for task in tasks:
        accelerator.print(f"task {task.name}:")
        parts.append(build_dataset(task.args, accelerator))
    return TaskDatasets(parts, [t.name for t in tasks])


def build_loader(args, dataset, sd, accelerator, weight_dtype: torch.dtype, class_data=None):
    """The loader; with --cache_latents over the on-disk latent cache (latent_cache.py): each process encodes its
    share of what is missing, then all read it (a later run encodes nothing). With class images (prior
    preservation) each item pairs an instance and a class item (data.PairedDataset), the class latents cached in
    their own folder (<class_data_dir>/.restune_cache/latents, or --latent_cache_dir), keyed by the class folder and
    what drew its images too."""
    def own_cache(data):
        return cached(args, data, sd, accelerator, weight_dtype,
                      args.latent_cache_dir or os.path.join(data.report.data_dir, LATENT_CACHE_DIR))

    if args.cache_latents and isinstance(dataset, TaskDatasets):  # each task's data in its own cache
        dataset = TaskDatasets([own_cache(part) for part in dataset.parts], dataset.names)
    elif args.cache_latents:
        dataset = own_cache(dataset)
        if class_data is not None:
            class_data = cached(args, class_data, sd, accelerator, weight_dtype,
                                args.latent_cache_dir or os.path.join(args.class_data_dir, LATENT_CACHE_DIR),
                                class_cache_key(args))
    if class_data is not None:
        dataset = PairedDataset(dataset, class_data)
    return build_dataloader(dataset, args.train_batch_size, shuffle=True, seed=args.seed,
                            num_workers=args.dataloader_num_workers, num_processes=accelerator.num_processes)


def cached(args, dataset, sd, accelerator, weight_dtype, cache_dir: str, extra_key: dict | None = None):
    """`dataset` over its latent cache, encoded first where missing by every process, its share each."""
    folder = build_latent_cache(dataset, sd.vae, cache_dir, rank=accelerator.process_index,
                                num_processes=accelerator.num_processes, batch_size=args.train_batch_size,
                                device=accelerator.device, dtype=weight_dtype, extra_key=extra_key)
    accelerator.wait_for_everyone()
    accelerator.print(f"--cache_latents: the VAE posteriors of {len(dataset)} samples from {folder}")
    return open_latent_cache(folder, dataset)


# ---------------------------------------------------------------------------------------------------------------------
# models
def weight_dtype_of(accelerator) -> torch.dtype:
    """The dtype of the frozen weights, from the one source of mixed precision (PITFALLS: unscale FP16 gradients)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def build_models(args, tasks: list[Task], accelerator, weight_dtype: torch.dtype):
    """SD components on the device, each task's tuners attached (fp32) right after seeding with its seed (what an
    alone run draws for its initialisation), frozen parts in `weight_dtype`. Returns (sd, the base UNet's
    fingerprint, taken before any cast)."""
    from accelerate.utils import set_seed

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
    for task in tasks:
        set_seed(task.args.seed)
        task.handle = attach(sd.unet, task.args.tuners, name=task.name if task.prefix else "default")
    if any(t.args.preservation_weight for t in tasks):
        for task in tasks:  # base-prediction preservation disables full sets: their base weights must be kept
            task.handle.keep_base_weights()
    freeze_and_cast(args, sd, [t.handle for t in tasks], weight_dtype)
    return sd, base_fingerprint


def freeze_and_cast(args, sd, handles: list, weight_dtype: torch.dtype) -> None:
    """The frozen parts in `weight_dtype`, every trainable in fp32 (PITFALLS: unscale FP16 gradients)."""
    sd.vae.requires_grad_(False)
    sd.text_encoder.requires_grad_(False)
    full = any(h.full_unet for h in handles)
    frozen = [sd.vae, sd.text_encoder] + ([] if full else [sd.unet])  # full: the UNet trains, in fp32
    for module in frozen if weight_dtype != torch.float32 else []:
        module.to(weight_dtype)
    for h in handles:  # peft-built tuners (dora, loha, lokr, oft) sit in the UNet's tree and were cast with it
        h.module.float()
    if args.gradient_checkpointing:
        sd.unet.enable_gradient_checkpointing()  # diffusers 0.42: non-reentrant (PITFALLS: starved adapters)
    not_fp32 = [tuple(p.shape) for h in handles for p in h.trainable_parameters() if p.dtype != torch.float32]
    if not_fp32:
        raise RuntimeError(f"trainable parameters must be fp32 (mixed precision keeps master weights in fp32); "
                           f"{len(not_fp32)} are not, e.g. shape {not_fp32[0]}")


class TunedUNet(nn.Module):
    """The UNet and the run's tuner sets as one module for `accelerator.prepare`: the tuners live outside the UNet's
    module tree (attach.py), so without this DDP would neither see nor sync their gradients. A joint run's forward is
    the shared backbone pass (joint.shared_pass): N rows in, K·N out.

    frozen_rows P > 0 (base-prediction preservation): returns (the K·N rows, the frozen base's prediction of the last
    P input rows). Bypasses only: one backbone pass, the base as one more routed copy (the bypass replaces only the
    target's input, so the base prediction is the tail on the unchanged input: conv_norm_out, act, conv_out on N more
    rows). Other tuners sit inside the backbone: a second forward of the P rows under no_grad with every set disabled,
    run first (a full set's disabled() swaps the UNet's weights in place, which must not happen under a graph); the
    N rows then run as R + P in two calls, so the R rows' numbers are those of a run without preservation.

    routed=True (a joint run's tasks on their own data): the input holds K·N rows, task k's in rows k·N.., and one
    backbone pass on them feeds bypass k its own rows."""

    def __init__(self, unet, handles: list, shared: bool):
        super().__init__()
        self.unet = unet
        self.tuners = nn.ModuleList([h.module for h in handles])
        self.handles, self.shared = handles, shared
        self.bypasses_only = all(c.type == "bypass" for h in handles for c in h.configs)

    def forward(self, sample, timestep, encoder_hidden_states, return_dict: bool = True, frozen_rows: int = 0,
                routed: bool = False):
        if not frozen_rows:  # routed: K·N rows in, task k's own in rows k·N.. (tasks on their own data)
            with shared_pass(self.unet, self.handles, routed=routed) if self.shared else contextlib.nullcontext():
                return self.unet(sample, timestep, encoder_hidden_states, return_dict=return_dict)
        n, kept = sample.shape[0], slice(sample.shape[0] - frozen_rows, None)
        if self.bypasses_only:
            with shared_pass(self.unet, self.handles, with_base=True):
                out = self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]  # ((K+1)·N, ...)
            return out[:-n], out[-n:][kept].detach()
        with torch.no_grad(), contextlib.ExitStack() as stack:
            for handle in self.handles:
                stack.enter_context(handle.disabled())
            frozen = self.unet(sample[kept], timestep[kept], encoder_hidden_states[kept], return_dict=False)[0]
        main = slice(0, n - frozen_rows)
        parts = [self.unet(sample[r], timestep[r], encoder_hidden_states[r], return_dict=False)[0]
                 for r in (main, kept)]
        return torch.cat(parts), frozen


def prepare_run(args, tasks: list[Task], accelerator, sd, loader, weight_dtype) -> Run:
    """The optimizer (one param group per task) and the prepared modules; each task's EMA under --use_ema; the
    checkpoint hooks that carry every task's tuners."""
    sampler = loader.batch_sampler.sampler  # ours (data.EpochSampler), before accelerate wraps the loader
    model = TunedUNet(sd.unet, [t.handle for t in tasks], shared=bool(args.tasks))
    n = accelerator.num_processes  # accelerate shards the batches: ceil(len / n) per process (even_batches)
    steps_per_epoch = math.ceil(math.ceil(len(loader) / n) / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    optimizer, schedule = build_optimizer(tasks, accelerator, max_steps, args.use_8bit_adam)
    model, optimizer, loader, schedule = accelerator.prepare(model, optimizer, loader, schedule)
    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)  # per process, after sharding
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    for task in tasks:
        task.ema = TunerEMA(task.handle, args.ema_decay) if args.use_ema else None
    register_state_hooks(accelerator, TunedUNet, {t.prefix + TUNERS_FILE: t.handle for t in tasks},
                         {t.prefix + EMA_FILE: t.ema for t in tasks if t.ema is not None})
    names = f"{len(tasks)} bypasses ({', '.join(t.name for t in tasks)}) in one backbone pass per step; " \
        if args.tasks else ""
    if isinstance(loader.dataset, TaskDatasets):
        sizes = ", ".join(f"{t.name} {len(p)}" for t, p in zip(tasks, loader.dataset.parts))
        names = f"{names}each on its own data ({sizes} samples; a step's backbone batch holds every task's rows); "
    accelerator.print(
        f"{names}{len(loader.dataset)} samples, {len(loader)} batches per epoch and process, {steps_per_epoch} steps "
        f"per epoch; {max_steps} steps = {num_epochs} epochs; batch {args.train_batch_size} per device x {n} "
        f"processes x {args.gradient_accumulation_steps} accumulation = "
        f"{args.train_batch_size * n * args.gradient_accumulation_steps} per step")
    return Run(args, accelerator, sd, tasks, model, optimizer, schedule, loader, sampler, weight_dtype,
               Path(args.output_dir), steps_per_epoch, max_steps, num_epochs)
