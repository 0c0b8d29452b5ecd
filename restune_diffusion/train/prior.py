"""Prior preservation (DreamBooth; diffusers' --with_prior_preservation): class images drawn by the frozen base,
made once in --class_data_dir and paired with every batch (data.PairedDataset; their loss term: loss.py).

The folder holds the user's own images, if any (any name; captioned by the class prompts in turn, in name order),
then ours, `class-NNNNN.png`: image i is prompt i mod P, drawn by the one sampling path (sampling.sample) from the
seed image_seed(CLASS_SEED, i), so it is the same image whatever --sample_batch_size or the number of processes. The
main process draws the missing ones with every tuner set disabled (the base UNet) and writes them atomically, one at
a time; the other processes wait. Beside them `class_images.json` records what made them (the base model and its
fingerprint, the sampler settings, the class prompts, each file's prompt), written before the first image. So a run
killed midway draws only the missing images when started again, and a run asking for other prompts, another base or
another sampler stops with one line naming the folder and the field instead of mixing two sets.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from pathlib import Path

from restune_diffusion.data import IMAGE_EXTENSIONS, CaptionDataset, ImageTransform, Sample
from restune_diffusion.files import atomic_write, atomic_write_text, clean_stale_temps
from restune_diffusion.models import build_pipeline
from restune_diffusion.sampling import SamplingSettings, sample

RECORD = "class_images.json"
RECORD_VERSION = 1
CLASS_SEED = 0  # fixed, not --seed: runs of several seeds share one class folder
GENERATED = re.compile(r"class-\d{5}\.png")
FIELD_FLAGS = {"class_prompts": "--class_prompt", "base_fingerprint": "--pretrained_model_name_or_path",
               "sampler": "--class_scheduler, --class_sampling_steps, --class_guidance_scale"}


def class_sampling(args) -> SamplingSettings:
    """How the class images are drawn: the --class_* sampler flags, seeds CLASS_SEED + i."""
    return SamplingSettings(scheduler=args.class_scheduler, steps=args.class_sampling_steps,
                            guidance_scale=args.class_guidance_scale, seed=CLASS_SEED,
                            batch_size=args.sample_batch_size)


def wanted(args, base_fingerprint: str | None = None) -> dict:
    """The fields a class folder's record must hold for this run (the base's only once the model is loaded)."""
    s = class_sampling(args)
    sampler = {"scheduler": s.scheduler, "karras_sigmas": s.karras_sigmas, "steps": s.steps,
               "guidance_scale": float(s.guidance_scale), "negative_prompt": s.negative_prompt, "seed": s.seed,
               "seed_stride": s.seed_stride}
    fields = {"class_prompts": list(args.class_prompt), "sampler": sampler}
    if base_fingerprint is not None:
        fields["base_fingerprint"] = base_fingerprint
    return fields


def read_record(folder: Path) -> dict | None:
    path = Path(folder) / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable class image record ({err}); remove it and the class-*.png beside it to "
                         "draw the class images again") from None
    if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
        raise ValueError(f"{path}: not a class image record of version {RECORD_VERSION}")
    return record


def _difference(field: str, old, new) -> tuple[str, object, object]:
    """The first differing sub-field of two record values ('sampler.steps', 20, 50)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in new:
            if old.get(key) != new[key]:
                return f"{field}.{key}", old.get(key), new[key]
    return field, old, new


def check_record(folder: str, want: dict) -> None:
    """One line naming the folder and the field when the class images there were made otherwise than `want` says."""
    record = read_record(Path(folder))
    for field, value in want.items():
        if record is not None and field in record and record[field] != value:
            name, old, new = _difference(field, record[field], value)
            raise ValueError(f"{folder}: its class images were made with {name} {old!r}, this run asks for {new!r} "
                             f"({FIELD_FLAGS[field]}); pass the same settings, another --class_data_dir, or empty the "
                             "folder to draw them again")


def own_images(folder: Path) -> list[Path]:
    """The user's images in the class folder (not ours), in name order."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not p.name.startswith(".") and not GENERATED.fullmatch(p.name))


def plan(folder: Path, args) -> list[tuple[str, str]]:
    """(file name, prompt) of the generated images this run trains with: --num_class_images minus the user's own."""
    count = max(0, args.num_class_images - len(own_images(folder)))
    prompts = args.class_prompt
    return [(f"class-{i:05d}.png", prompts[i % len(prompts)]) for i in range(count)]


def make_class_images(args, sd, handles: list, base_fingerprint: str, weight_dtype, say=print) -> int:
    """Draw the missing class images with the frozen base (every set in `handles` disabled); returns how many."""
    folder = Path(args.class_data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(folder)  # the temp file of a writer killed mid-image
    want = wanted(args, base_fingerprint)
    check_record(folder, want)
    planned = plan(folder, args)
    missing = [(i, name, prompt) for i, (name, prompt) in enumerate(planned) if not (folder / name).is_file()]
    if not missing:
        return 0
    images = {**(read_record(folder) or {}).get("images", {}), **dict(planned)}
    atomic_write_text(folder / RECORD, json.dumps({"version": RECORD_VERSION, "base_model":
                                                   args.pretrained_model_name_or_path, **want,
                                                   "resolution": args.resolution, "images": images}, indent=1))
    settings = class_sampling(args)
    say(f"--with_prior_preservation: drawing {len(missing)} class images into {folder} with the frozen base "
        f"({settings.label()}, {settings.steps} steps, guidance {settings.guidance_scale:g})")
    pipe = build_pipeline(sd)
    with contextlib.ExitStack() as stack:
        for handle in handles:
            stack.enter_context(handle.disabled())
        for lo in range(0, len(missing), settings.batch_size):
            chunk = missing[lo:lo + settings.batch_size]
            pixels = sample(pipe, [p for _, _, p in chunk], [i for i, _, _ in chunk], settings,
                            height=args.resolution, width=args.resolution, amp_dtype=weight_dtype,
                            fp32_decode=True)[0]  # (B, H, W, 3) in [0, 1]
            for (_, name, _), image in zip(chunk, pipe.numpy_to_pil(pixels)):
                atomic_write(folder / name, lambda tmp, image=image: image.save(tmp, format="PNG"))
    return len(missing)


def class_samples(args) -> list[Sample]:
    """The class images a run trains with: the user's own (the class prompts in turn), then ours, the first
    --num_class_images; an error naming the folder when one is missing (a process that did not wait)."""
    folder = Path(args.class_data_dir)
    prompts = args.class_prompt
    samples = [Sample(p, [prompts[j % len(prompts)]]) for j, p in enumerate(own_images(folder))]
    samples += [Sample(folder / name, [prompt]) for name, prompt in plan(folder, args)]
    samples = samples[:args.num_class_images]
    missing = [s.path.name for s in samples if not s.path.is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: {len(missing)} class images missing (e.g. {missing[0]})")
    return samples


def class_fingerprint(args, samples: list[Sample]) -> str:
    """A hash of the class images (names in the folder, captions) and of what drew them: what a resume compares."""
    digest = hashlib.sha256(json.dumps(wanted(args)).encode())
    for s in samples:
        digest.update(json.dumps([s.path.name, s.captions]).encode())
    return digest.hexdigest()[:16]


def class_dataset(args, accelerator, sd, handles: list, base_fingerprint: str, weight_dtype) -> CaptionDataset | None:
    """--with_prior_preservation: the class images as a data set (with the instance images' transform), drawn first
    where missing by the main process while the others wait. None without the flag."""
    if not args.with_prior_preservation:
        return None
    check_record(args.class_data_dir, wanted(args, base_fingerprint))  # on every process: all stop together
    made = 0
    if accelerator.is_main_process:
        made = make_class_images(args, sd, handles, base_fingerprint, weight_dtype, accelerator.print)
    accelerator.wait_for_everyone()
    samples = class_samples(args)
    accelerator.print(f"--with_prior_preservation: {len(samples)} class images from {args.class_data_dir} ({made} "
                      f"drawn now), paired with every batch")
    transform = ImageTransform(args.resolution, args.center_crop, args.random_flip, args.image_interpolation_mode)
    return CaptionDataset(samples, transform, seed=args.seed)


def class_cache_key(args) -> dict:
    """What cached class latents depend on beyond the image list: the folder and what drew the images."""
    return {"class_data_dir": str(Path(args.class_data_dir).resolve()), "class_images": wanted(args)}
