r"""FID, KID and CLIP score of Stable Diffusion v1.5, base and tuned, on COCO captions; FID between two folders; or
prompt accuracy and domain FID in the tiny world (--world concept).

    python eval_fid.py --pretrained_model_name_or_path PATH_TO_SD15 --coco_dir data/coco2017 \
        --base --tuners out/lora/tuners.safetensors --tuners out/res_tuning/tuners.safetensors \
        --guidance_scale 1.5 2 3 4 5 6 7 8 --clip_model clip-vit-large-patch14/ \
        --inception_weights pt_inception-2015-12-05-6726825d.pth --output_dir out/eval
    python eval_fid.py ... --tuners 'out/run/checkpoint-*'            # one row per checkpoint
    accelerate launch eval_fid.py ...                                 # N processes (CPU: torchrun --nproc_per_node N)
    python eval_fid.py --real_dir a/ --fake_dir b/ --inception_weights ... --output_dir out/fid
    python eval_fid.py --world concept --base --tuners out/demo/tuners.safetensors --output_dir out/eval_world

Writes eval.json, eval.md and fid_vs_clip.png (tiny world: fid_vs_accuracy.png), and fid_vs_step.png for
checkpoints; the protocols are in restune_diffusion/evaluation/coco.py and restune_diffusion/world/evaluation.py, and
in eval.json; the metrics in restune_diffusion/metrics/.
Errors are one line (exit 2); RESTUNE_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import argparse

from restune_diffusion.cli import run_cli
from restune_diffusion.sampling import (
    DEFAULT_GUIDANCE,
    DEFAULT_SCHEDULER,
    DEFAULT_STEPS,
    PROTOCOL_STRIDE,
    add_sampling_args,
)

# COCO / folder-mode flags that mean nothing in the tiny world
COCO_BATCH = 8  # generation and Inception feature batch of the COCO protocol
WORLD_REFUSES = ("coco_dir", "real_dir", "fake_dir", "inception_weights", "clip_model", "stats_cache_dir", "resolution")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="local diffusers SD v1.5 folder, or 'tiny' for the built-in tiny model (--world: default tiny)")
    p.add_argument("--revision", help="hub id in the local Hugging Face cache: a branch, tag or commit (default main)")
    p.add_argument("--variant", help="weight files of this variant, e.g. fp16")
    p.add_argument("--world", default=None, choices=["star", "heart", "cross", "crescent", "concept"],
                   help="tiny-world mode: prompt accuracy and domain FID (the world's judge) on a held-out concept's "
                        "prompts ('concept': the star); no COCO, Inception or CLIP")
    p.add_argument("--tuners", action="append", default=None,
                   help="tuner .safetensors file, checkpoint folder or glob (repeat: one row each)")
    p.add_argument("--base", action="store_true", help="also the untuned base (the paper's SD row; the default "
                                                        "when no --tuners is given)")
    p.add_argument("--coco_dir", default=None, help="COCO root: annotations/captions_val2017.json, val2017/")
    p.add_argument("--coco_year", default="2017", choices=["2014", "2017"])
    p.add_argument("--split", default="val", choices=["val", "train"])
    p.add_argument("--num_samples", type=int, default=None,
                   help="N images (default 5000 = all of val2017; 64 for tiny). Beyond the split: captions drawn "
                        "with replacement (FID-10K/30K). --world: a multiple of 12, default 96")
    add_sampling_args(p, None, sweep=True, omit=("negative_prompt", "karras_sigmas"), helps={
        "seed": f"also the caption draw; stride {PROTOCOL_STRIDE:,} (default 0)",
        "steps": f"default {DEFAULT_STEPS}; --world: the tiny world's protocol (world.SAMPLING_STEPS)",
        "guidance_scale": f"one or several (a sweep); default {DEFAULT_GUIDANCE:g}; --world: the tiny world's",
        "batch_size": f"generation and feature batch (recorded); default {COCO_BATCH}; --world: the tiny world's",
        "scheduler": f"default {DEFAULT_SCHEDULER}"})
    p.add_argument("--resolution", type=int, default=None,
                   help="default: the model's native size (512 for SD v1.5, 32 for tiny)")
    p.add_argument("--inception_weights", default=None,
                   help="pt_inception-2015-12-05-6726825d.pth (or $RESTUNE_FID_INCEPTION)")
    p.add_argument("--clip_model", default=None, help="local CLIP folder for CLIP score (or $RESTUNE_CLIP_MODEL; "
                                                      "SD v1.x cards use openai/clip-vit-large-patch14)")
    p.add_argument("--kid_subsets", type=int, default=100)
    p.add_argument("--kid_subset_size", type=int, default=1000, help="capped at N")
    p.add_argument("--output_dir", default="eval_output", help="eval.json, eval.md, fid_vs_clip.png, images")
    p.add_argument("--real_dir", default=None, help="folder-vs-folder mode: real images")
    p.add_argument("--fake_dir", default=None, help="folder-vs-folder mode: generated images")
    p.add_argument("--stats_cache_dir", default=None,
                   help="where real-image features are cached (default ~/.cache/restune_diffusion/fid_stats)")
    p.add_argument("--skip_bad_images", action="store_true", help="skip and count unreadable real/folder images")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"],
                   help="dtype of the generating model; the Inception and CLIP run in fp32")
    args = p.parse_args(argv)
    args.seed = 0 if args.seed is None else args.seed
    args.scheduler = args.scheduler or DEFAULT_SCHEDULER
    if args.world is not None:
        given = [f"--{name}" for name in WORLD_REFUSES if getattr(args, name) is not None]
        if given:
            p.error(f"{', '.join(given)}: not used with --world (the tiny world has its own prompts, real images "
                    f"and classifier)")
        args.pretrained_model_name_or_path = args.pretrained_model_name_or_path or "tiny"
        return args
    for name, default in (("steps", DEFAULT_STEPS), ("guidance_scale", [DEFAULT_GUIDANCE]), ("batch_size", COCO_BATCH)):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if (args.real_dir is None) != (args.fake_dir is None):
        p.error("--real_dir and --fake_dir go together (folder-vs-folder mode)")
    if args.real_dir is None and (args.coco_dir is None or args.pretrained_model_name_or_path is None):
        p.error("COCO mode needs --coco_dir and --pretrained_model_name_or_path (or give --real_dir/--fake_dir)")
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    from restune_diffusion.evaluation.runner import evaluate, evaluate_folders
    from restune_diffusion.evaluation.sweep import evaluate_protocol
    from restune_diffusion.world.evaluation import evaluation_protocol, sampling

    if args.world is not None:  # the world's protocol through evaluation's loop
        settings = sampling(args.scheduler, args.steps, args.batch_size, args.seed)
        result = evaluate_protocol(
            evaluation_protocol(settings, args.world, args.num_samples, args.pretrained_model_name_or_path),
            args.pretrained_model_name_or_path, args.output_dir, settings, guidance_scales=args.guidance_scale,
            tuners=args.tuners, base=args.base, device=args.device, mixed_precision=args.mixed_precision,
            revision=args.revision, variant=args.variant)
        if result is not None:
            for row in result["rows"]:
                print(f"{row['model']} cfg {row['guidance_scale']:g}: concept accuracy "
                      f"{row['concept_accuracy']['all']:.3f} (shape {row['concept_accuracy']['shape']:.3f}) domain FID "
                      f"{row['domain_fid']:.2f} pretraining-prompt accuracy {row['pretrain_accuracy']['all']:.3f} "
                      f"(N={row['n']})")
            print(f"-> {args.output_dir}/eval.json, eval.md, fid_vs_accuracy.png")
        return result
    if args.real_dir is not None:
        result = evaluate_folders(args.real_dir, args.fake_dir, args.output_dir,
                                  inception_weights=args.inception_weights, batch_size=args.batch_size,
                                  device=args.device, stats_cache_dir=args.stats_cache_dir,
                                  skip_bad_images=args.skip_bad_images, kid_subsets=args.kid_subsets,
                                  kid_subset_size=args.kid_subset_size)
        print(f"FID {result['fid']:.4f} KID {result['kid_mean']:.5f} (N={result['n']}) -> {args.output_dir}/eval.json")
        return result
    result = evaluate(
        args.pretrained_model_name_or_path, args.coco_dir, args.output_dir, tuners=args.tuners, base=args.base,
        guidance_scales=args.guidance_scale, num_samples=args.num_samples, coco_year=args.coco_year,
        split=args.split, seed=args.seed, steps=args.steps, scheduler=args.scheduler, resolution=args.resolution,
        batch_size=args.batch_size, inception_weights=args.inception_weights, clip_model=args.clip_model,
        stats_cache_dir=args.stats_cache_dir, device=args.device, mixed_precision=args.mixed_precision,
        kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size, skip_bad_images=args.skip_bad_images,
        revision=args.revision, variant=args.variant)
    if result is not None:  # the main process
        for row in result["rows"]:
            clip = f" CLIP {row['clip_score']:.2f}" if row["clip_score"] is not None else ""
            print(f"{row['model']} cfg {row['guidance_scale']:g}: FID {row['fid']:.4f} KID {row['kid_mean']:.5f}"
                  f"{clip} (N={row['n']})")
        print(f"-> {args.output_dir}/eval.json, eval.md, fid_vs_clip.png")
    return result


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "eval_fid.py"))
