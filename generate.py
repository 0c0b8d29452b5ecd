"""Generate images from Stable Diffusion v1.5 with tuned weights.

    python generate.py --pretrained_model_name_or_path DIR --tuners out/tuners.safetensors --prompt "a cat" \
        --num_images 4 --steps 50 --guidance_scale 7.5 --seed 0 --out samples/

Several --tuners files are mixed on one UNet, each at its weight (--tuners a.safetensors:0.8 --tuners b.safetensors:0.5;
the weight is read only from a trailing :NUMBER). Several bypass files are tasks instead: one backbone pass per step
serves them all and images go to out/<task>/, <task> being the file's stem, or its run folder when stems collide
(out/dogs/tuners.safetensors -> dogs), or --task_names; the other files then sit on the shared backbone, and a task
file holding other tuners beside its bypass is refused (they would act on every task). --mix sums the bypasses as
weighted deltas into one image set. Every other flag means the same with one file or several.
--fuse folds LoRA into the weights and computes prompt/prefix K/V once; --compile runs the UNet through torch.compile.
Each PNG carries its prompt, seed, steps, guidance, sampler and tuner file in its text metadata (A1111's
"parameters"), and out/index.json lists them; a rerun into the same folder continues the numbering.
Errors are one line (exit 2); RESTUNE_DEBUG=1 shows the traceback.
"""

import argparse

from restune_diffusion.cli import run_cli
from restune_diffusion.generate import run
from restune_diffusion.sampling import add_sampling_args


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", default="tiny",
                   help="local SD v1.5 folder, a hub id in the local Hugging Face cache (offline), or 'tiny'")
    p.add_argument("--revision", help="hub id: a branch, tag or commit of the cached model (default: main)")
    p.add_argument("--variant", help="weight files of this variant, e.g. fp16")
    p.add_argument("--tuners", action="append",
                   help="tuner .safetensors, optionally FILE:WEIGHT (repeat: the files are mixed on one UNet at their "
                        "weights; several bypass files are tasks, one folder each, unless --mix)")
    p.add_argument("--mix", action="store_true",
                   help="several bypass files: sum them as weighted deltas on one UNet (one image set), not as tasks")
    p.add_argument("--task_names", action="append", help="a folder name per bypass task file, in order (repeat)")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts_file", help="a text file, one prompt a line")
    p.add_argument("--num_images", type=int, default=4, help="images per prompt")
    p.add_argument("--scale", type=float, default=1.0, help="the weight of --tuners files given without :WEIGHT")
    p.add_argument("--fuse", action="store_true",
                   help="fold what is exact into the UNet first: LoRA into its weights, prompt/prefix K/V computed "
                        "once (a line says what stays unfused and why)")
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="torch.compile the UNet (fullgraph); MODE: default, reduce-overhead (CUDA graphs), "
                        "max-autotune")
    add_sampling_args(p, helps={"seed": "stride 1: image i uses seed + i, the seed written into its metadata"})
    p.add_argument("--height", type=int, default=None,
                   help="default: the model's native size (512 for SD v1.5, 32 for tiny)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default: fp16 on CUDA, else fp32")
    p.add_argument("--out", default="samples")
    return p.parse_args(argv)


def main(argv=None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "generate.py"))
