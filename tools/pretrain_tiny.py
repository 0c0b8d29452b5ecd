"""Pretrain the tiny world (issues 14, 23): autoencoder -> two judges -> text encoder + UNet in the latent space.

    python tools/pretrain_tiny.py                      # writes restune_diffusion/assets/tiny_sd/ (fp16 safetensors)
    python tools/pretrain_tiny.py --pilot --out /tmp/x # a few minutes: checks the pipeline end to end

Deterministic for a seed on a given machine (CPU, fixed thread count). The autoencoder (the world's camera) sees
every shape, the judges every shape and the hard negatives; the UNet sees only the pretraining shapes, never the
concepts nor the held-out colour x shape x background combinations. The text encoder (the tiny CLIP's architecture)
is trained with the UNet, on captions in five phrasings with a filler word put in one time in ten and 10 % caption
dropout (so classifier-free guidance works); the token embeddings get no weight decay, so a word never seen in
pretraining (a concept's name) keeps its random start, as an unknown word would.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from restune_diffusion.data import tokenize_captions  # noqa: E402
from restune_diffusion.files import atomic_write_text  # noqa: E402
from restune_diffusion.models import (  # noqa: E402
    TINY_ASSETS,
    TINY_WORDS,
    SDComponents,
    build_tiny_sd,
    build_tiny_tokenizer,
    save_components,  # noqa: E402
)
from restune_diffusion.train.loss import min_snr_weights  # noqa: E402
from restune_diffusion.world import judge as judges  # noqa: E402
from restune_diffusion.world import protocol, scene  # noqa: E402

TOKENS = 16  # the tokenizer's max length: captions are <= 12 tokens, and 77 would make cross-attention 5x dearer


def world_unet_config(width: int) -> dict:
    """The tiny UNet's pattern (cross-attention down/up blocks, a plain outer block, a mid block), twice as wide, at
    the 8 x 8 latents of 32 px images."""
    return dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(width, 2 * width, 2 * width),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8, flip_sin_to_cos=True, freq_shift=0)


def world_vae():
    """AutoencoderKL with three levels: 32 x 32 x 3 images <-> 8 x 8 x 4 latents (x4 down, like SD's x8 at 512 px)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 64), layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, sample_size=32)


def log(path: Path | None, record: dict) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if path is not None:
        with open(path, "a") as f:
            f.write(line + "\n")


def fp16_round_trip(module: torch.nn.Module) -> None:
    """Round the weights to what the fp16 files will hold, so what we train against is what we ship."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())


# ---------------------------------------------------------------------------------------------------------------------
def vae_images(n: int) -> torch.Tensor:
    """What the autoencoder learns to see: every named and other shape at sizes 0.1-0.85 (any rotation, partly
    outside the image when large and turned), half of them, and the world's own renders of every named shape.
    (N, 3, 32, 32) in [-1, 1]. Its own stream: changing the judges' data never changes the autoencoder."""
    rng = np.random.default_rng(scene.SPLIT_SEEDS["autoencoder"])
    broad = [scene.sample_attributes(rng, scene.SHAPES + scene.OTHER_SHAPES, size_range=(0.1, 0.85), rotation=180.0)
             for _ in range(n // 2)]
    return scene.render_batch(broad + scene.examples("reference", n - n // 2)).float() / 127.5 - 1


def train_vae(vae, steps: int, batch: int, n_images: int, log_path: Path | None) -> float:
    """Reconstruction MSE + a small KL; returns the latent scaling factor (1 / std of the latents)."""
    images = vae_images(n_images)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(2)
    for step in range(steps):
        x = images[torch.randint(0, len(images), (batch,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        mse = F.mse_loss(recon, x)
        loss = mse + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(log_path, {"stage": "vae", "step": step, "mse": round(mse.item(), 5)})
    vae.eval()
    fp16_round_trip(vae)
    with torch.no_grad():
        sample = images[:1024]
        means = [vae.encode(sample[i:i + 256]).latent_dist.mean for i in range(0, len(sample), 256)]
        std = float(torch.cat(means).std())
    return 1.0 / std


JUDGE_RECIPES = {  # kind: (data split, data seed, share through the autoencoder, blur the rest, training seed)
    "judge": ("judge", 3, 0.75, False, 3),
    # the check: another architecture, its own data, half its images blurred and noised instead of round-tripped
    "check": ("judge_check", 4, 0.5, True, 4),
}


def train_one_judge(kind: str, vae_state: dict, vae_config: dict, args, log_path: Path | None) -> dict:
    """One judge from its recipe (a worker process of its own, one thread): its fp16-rounded state dict."""
    from diffusers import AutoencoderKL

    torch.set_num_threads(args.threads)
    vae = AutoencoderKL.from_config(vae_config)
    vae.load_state_dict(vae_state)
    vae.eval()
    split, data_seed, through_vae, blur, seed = JUDGE_RECIPES[kind]
    examples = judges.example_set(args.judge_images, scene.SPLIT_SEEDS[split])
    images, labels = judges.training_tensors(examples, vae, through_vae=through_vae, seed=data_seed, blur=blur)
    judge = judges.train_judge(images, labels, kind, args.judge_steps, seed=seed,
                               log=lambda record: log(log_path, record))
    fp16_round_trip(judge)
    return judge.state_dict()


def train_judges(vae, args, log_path: Path | None) -> tuple[judges.JudgeNet, judges.JudgeNet, dict]:
    """The judge (autoencoder round trips) and the check, trained side by side in two processes (each result is a
    function of its recipe only), then each one's confidence threshold and confusion table."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    say = lambda record: log(log_path, record)  # noqa: E731
    state = {k: v.detach().cpu() for k, v in vae.state_dict().items()}
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        futures = {kind: pool.submit(train_one_judge, kind, state, dict(vae.config), args, log_path)
                   for kind in JUDGE_RECIPES}
        trained = {}
        for kind, future in futures.items():
            trained[kind] = judges.JudgeNet(kind=kind)
            trained[kind].load_state_dict(future.result())
            trained[kind].eval()
    judge, check = trained["judge"], trained["check"]
    calibration = {}
    for name, j in (("judge", judge), ("check", check)):
        j.threshold, calibration[name] = judges.calibrate_threshold(j, vae, args.confusion_n)
        say({"stage": name, "threshold": j.threshold, "calibration": calibration[name]})
    tables = {name: judges.confusion(j, vae, args.confusion_n) for name, j in (("judge", judge), ("check", check))}
    for name, table in tables.items():
        short = {c: {"correct": round(r["correct"], 3), "as_concept": round(r["as_concept"], 3)}
                 for c, r in table.items()}
        say({"stage": name, "confusion": short})
    tables["calibration"] = calibration
    return judge, check, tables


# ---------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_dataset(sd: SDComponents, n: int) -> tuple[torch.Tensor, list[scene.Attributes]]:
    attrs = scene.examples("pretrain", n)
    images = scene.render_batch(attrs).float() / 127.5 - 1
    latents = torch.cat([sd.vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, n, 256)])
    return latents * sd.vae.config.scaling_factor, attrs  # (N, 4, 8, 8)


def captions_for(attrs: list[scene.Attributes], rng: np.random.Generator, dropout: float, filler: float) -> list[str]:
    out = []
    for a in attrs:
        u = rng.random()
        out.append("" if u < dropout else scene.caption_with_filler(a, rng) if u < dropout + filler else a.caption)
    return out


def text_optimizer_groups(text_encoder, weight_decay: float) -> list[dict]:
    """The token embeddings without weight decay (an unseen word keeps its random start), the rest with it."""
    embeddings = text_encoder.get_input_embeddings().weight
    rest = [p for p in text_encoder.parameters() if p is not embeddings]
    return [{"params": [embeddings], "weight_decay": 0.0}, {"params": rest, "weight_decay": weight_decay}]


def train_unet(sd: SDComponents, judge, args, log_path: Path | None) -> SDComponents:
    latents, attrs = encode_dataset(sd, args.num_images)
    unet, text_encoder = sd.unet, sd.text_encoder
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    unet.train()
    text_encoder.train()
    params = [{"params": list(unet.parameters()), "weight_decay": 1e-2}, *text_optimizer_groups(text_encoder, 1e-2)]
    opt = torch.optim.AdamW(params, lr=args.lr)
    warm = 200
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(s, args.unet_steps) / args.unet_steps)))
    gen, rng = torch.Generator().manual_seed(3), np.random.default_rng(3)
    scheduler, start = sd.noise_scheduler, time.time()
    eval_sd = copy.copy(sd)
    eval_sd.unet, eval_sd.text_encoder = ema_unet, ema_text
    trainables = [p for group in params for p in group["params"]]
    shadows = [*ema_unet.parameters(), *ema_text.parameters()]
    live = [*unet.parameters(), *text_encoder.parameters()]
    for step in range(args.unet_steps):
        idx = torch.randint(0, len(latents), (args.batch_size,), generator=gen)
        x0 = latents[idx]
        ids = tokenize_captions(sd.tokenizer, captions_for([attrs[i] for i in idx.tolist()], rng,
                                                           args.caption_dropout, args.filler))
        states = text_encoder(ids, return_dict=False)[0]  # (B, TOKENS, 32)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        pred = unet(scheduler.add_noise(x0, noise, t), t, states, return_dict=False)[0]
        loss = (F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3)) * min_snr_weights(scheduler, t, 5.0)).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainables, 1.0)
        opt.step()
        sched.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(shadows, live):
                pe.lerp_(p, 1 - decay)
        if step % 50 == 0:
            log(log_path, {"stage": "unet", "step": step, "loss": round(loss.item(), 4),
                           "lr": f"{sched.get_last_lr()[0]:.2e}", "seconds": round(time.time() - start)})
        if (step + 1) % args.eval_every == 0 or step == args.unet_steps - 1:
            ema_unet.eval()
            ema_text.eval()
            log(log_path, {"stage": "unet", "step": step + 1, "accuracy": protocol.quick_eval(eval_sd, judge),
                           "seconds": round(time.time() - start)})
    fp16_round_trip(ema_unet)
    fp16_round_trip(ema_text)
    return eval_sd


# ---------------------------------------------------------------------------------------------------------------------
def model_index() -> dict:
    """diffusers' model_index.json for the tiny base, so StableDiffusionPipeline.from_pretrained reads the folder."""
    import diffusers

    return {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
            "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]}


def save_world(sd: SDComponents, judge, check, out: Path, record: dict) -> None:
    """Diffusers folder layout in fp16 safetensors + judge/ (both judges) + world.json, written beside, renamed in."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for module in (sd.unet, sd.vae, sd.text_encoder):
        module.to(torch.float16)
    save_components(sd, tmp)
    (tmp / "judge").mkdir()
    judges.save_judge(judge, tmp / "judge" / judges.JUDGE_FILE)
    judges.save_judge(check, tmp / "judge" / judges.CHECK_FILE)
    atomic_write_text(tmp / "model_index.json", json.dumps(model_index(), indent=1))
    atomic_write_text(tmp / "world.json", json.dumps(record, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def retrain_judges(folder: Path, args, log_path: Path, argv) -> int:
    """The judges of an existing world, remade: the same function of its autoencoder and the arguments as in a full
    run (the UNet's training never reads the judges but for its progress log), so the full command still remakes
    the world exactly."""
    from restune_diffusion.models import load_sd15

    start = time.time()
    sd = load_sd15(folder)
    judge, check, tables = train_judges(sd.vae, args, log_path)
    final = protocol.quick_eval(sd, judge, repeats=4)
    record = json.loads((folder / "world.json").read_text())
    record["seconds"]["judges"] = round(time.time() - start)
    record.update(accuracy=final, confusion=tables, judges_command=" ".join(
        ["python tools/pretrain_tiny.py", *(argv if argv is not None else sys.argv[1:])]))
    record["args"].update({k: v for k, v in vars(args).items() if k.startswith(("judge", "confusion"))})
    judges.save_judge(judge, folder / "judge" / judges.JUDGE_FILE)
    judges.save_judge(check, folder / "judge" / judges.CHECK_FILE)
    atomic_write_text(folder / "world.json", json.dumps(record, indent=1))
    log(log_path, {"stage": "judges saved", "accuracy": final, "seconds": record["seconds"]["judges"]})
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(TINY_ASSETS))
    p.add_argument("--log", help="JSON lines log (default: <out>.log.jsonl)")
    p.add_argument("--pilot", action="store_true", help="a few minutes: tiny step counts, to check the pipeline")
    p.add_argument("--threads", type=int, default=1, help="1: on a shared CPU, 2 threads spin-wait (~3x slower)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae_steps", type=int, default=1500)
    p.add_argument("--vae_images", type=int, default=12288)
    p.add_argument("--judge_steps", type=int, default=6000)
    p.add_argument("--judge_images", type=int, default=60000)
    p.add_argument("--confusion_n", type=int, default=200, help="images per hard-negative category in world.json")
    p.add_argument("--unet_steps", type=int, default=5000)
    p.add_argument("--unet_width", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--caption_dropout", type=float, default=0.1)
    p.add_argument("--filler", type=float, default=0.1, help="share of captions with a filler word put in")
    p.add_argument("--num_images", type=int, default=16384)
    p.add_argument("--eval_every", type=int, default=1000)
    p.add_argument("--judges_only", metavar="WORLD", help="retrain only the judges of the world in this folder (on its "
                   "autoencoder, as the full run does) and write them into it, with its world.json updated")
    args = p.parse_args(argv)
    if args.pilot:
        args.vae_steps, args.vae_images, args.judge_steps, args.judge_images = 30, 512, 30, 1024
        args.unet_steps, args.eval_every, args.num_images, args.confusion_n = 20, 10, 512, 8
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    log_path = Path(args.log) if args.log else out.with_name(out.name + ".log.jsonl")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")
    start = time.time()
    log(log_path, {"stage": "start", "args": vars(args)})

    if args.judges_only:
        return retrain_judges(Path(args.judges_only), args, log_path, argv)
    sd = build_tiny_sd(args.seed)
    sd.tokenizer = build_tiny_tokenizer([*TINY_WORDS, *scene.WORDS])
    sd.tokenizer.model_max_length = TOKENS
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(args.seed)
    config = CLIPTextConfig(**{**sd.text_encoder.config.to_dict(), "vocab_size": len(sd.tokenizer)})
    sd.text_encoder = CLIPTextModel(config)
    torch.manual_seed(args.seed)
    sd.vae = world_vae()
    sd.vae.register_to_config(scaling_factor=train_vae(sd.vae, args.vae_steps, 32, args.vae_images, log_path))
    t_vae = time.time() - start
    judge, check, tables = train_judges(sd.vae, args, log_path)
    t_judges = time.time() - start - t_vae
    torch.manual_seed(args.seed)
    from diffusers import UNet2DConditionModel

    sd.unet = UNet2DConditionModel(**world_unet_config(args.unet_width))
    sd = train_unet(sd, judge, args, log_path)
    final = protocol.quick_eval(sd, judge, repeats=4)
    seconds = time.time() - start
    record = {"command": " ".join(["python tools/pretrain_tiny.py", *(argv if argv is not None else sys.argv[1:])]),
              "seconds": {"total": round(seconds), "vae": round(t_vae), "judges": round(t_judges)},
              "threads": args.threads, "accuracy": final, "confusion": tables, "args": vars(args)}
    log(log_path, {"stage": "final", "accuracy": final, "seconds": record["seconds"]})
    save_world(sd, judge, check, out, record)
    log(log_path, {"stage": "saved", "out": str(out)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
