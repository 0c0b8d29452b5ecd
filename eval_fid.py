r"""FID of Stable Diffusion v1.5, base or tuned, on COCO2017 val (the paper's protocol), or between two image folders.

    python eval_fid.py --pretrained_model_name_or_path PATH_TO_SD15 --tuners out/tuners.safetensors \
        --coco_dir data/coco2017 --inception_weights pt_inception-2015-12-05-6726825d.pth --output_dir out/fid
    python eval_fid.py --real_dir a/ --fake_dir b/ --inception_weights ... --output_dir out/fid

The protocol is described in restune_diffusion/fid.py and written into fid.json.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="local diffusers SD v1.5 folder, or 'tiny' for the built-in tiny model")
    p.add_argument("--tuners", default=None, help="tuner .safetensors file; omit for the base model (paper's SD row)")
    p.add_argument("--coco_dir", default=None, help="COCO2017 root: annotations/captions_val2017.json, val2017/")
    p.add_argument("--split", default="val", choices=["val", "train"])
    p.add_argument("--num_samples", type=int, default=5000, help="N images (5000 = all of val2017, the protocol)")
    p.add_argument("--seed", type=int, default=0, help="caption choice, subset and per-image generation seeds")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--scheduler", default="ddim", choices=["ddim", "pndm", "dpm"])
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=8, help="generation and Inception batch (recorded)")
    p.add_argument("--inception_weights", default=None,
                   help="pt_inception-2015-12-05-6726825d.pth (or $RESTUNE_FID_INCEPTION)")
    p.add_argument("--output_dir", default="fid_output", help="fid.json and fake/ go here")
    p.add_argument("--real_dir", default=None, help="folder-vs-folder mode: real images")
    p.add_argument("--fake_dir", default=None, help="folder-vs-folder mode: generated images")
    p.add_argument("--stats_cache_dir", default=None,
                   help="where real-image statistics are cached (default ~/.cache/restune_diffusion/fid_stats)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"],
                   help="dtype of the generating model; the Inception always runs in fp32")
    p.add_argument("--no_keep_images", action="store_true", help="delete fake/ after measuring")
    args = p.parse_args(argv)
    if (args.real_dir is None) != (args.fake_dir is None):
        p.error("--real_dir and --fake_dir go together (folder-vs-folder mode)")
    if args.real_dir is None and (args.coco_dir is None or args.pretrained_model_name_or_path is None):
        p.error("COCO mode needs --coco_dir and --pretrained_model_name_or_path (or give --real_dir/--fake_dir)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from restune_diffusion import fid

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if args.real_dir is not None:
            result = fid.compute_fid_folders(
                args.real_dir, args.fake_dir, inception_weights=args.inception_weights, batch_size=args.batch_size,
                device=device, stats_cache_dir=args.stats_cache_dir, output_dir=args.output_dir)
        else:
            result = fid.evaluate_coco_fid(
                args.pretrained_model_name_or_path, args.coco_dir, args.output_dir, tuners=args.tuners,
                split=args.split, num_samples=args.num_samples, seed=args.seed, steps=args.steps,
                guidance_scale=args.guidance_scale, scheduler=args.scheduler, resolution=args.resolution,
                batch_size=args.batch_size, inception_weights=args.inception_weights,
                stats_cache_dir=args.stats_cache_dir, device=device, mixed_precision=args.mixed_precision,
                keep_images=not args.no_keep_images)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"eval_fid.py: error: {err}")
    print(f"FID {result['fid']:.4f} (N={result['n']}) -> {args.output_dir}/fid.json")
    return result


if __name__ == "__main__":
    main()
