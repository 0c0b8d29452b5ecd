"""Pretrain the tiny world (issue 14): attribute classifier -> autoencoder -> UNet in its latent space.

    python tools/pretrain_tiny.py                      # writes restune_diffusion/assets/tiny_sd/ (fp16 safetensors)
    python tools/pretrain_tiny.py --pilot --out /tmp/x # a few minutes: checks the pipeline end to end

Deterministic for a seed on a given machine (CPU, fixed thread count). The text encoder is the tiny model's seeded
random CLIP text encoder, frozen (its captions' states are computed once); the UNet learns to read it, with 10 %
caption dropout so classifier-free guidance works. Prompt accuracy is measured with the classifier as training goes.
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

from restune_diffusion import world  # noqa: E402
from restune_diffusion.data import tokenize_captions  # noqa: E402
from restune_diffusion.files import atomic_write_text  # noqa: E402
from restune_diffusion.models import SDComponents, build_tiny_sd, save_components  # noqa: E402
from restune_diffusion.train.loss import min_snr_weights  # noqa: E402

TOKENS = 16  # the tokenizer's max length: captions are 9 tokens, and 77 would make cross-attention 5x dearer


def world_unet_config(width: int) -> dict:
    """The tiny UNet's pattern (cross-attention down/up blocks, a plain outer block, a mid block), twice as wide, at
    the 8 x 8 latents of 32 px images. On a shared CPU core a step at batch 32 takes ~1 s (16 x 16 latents: ~4.6 s)."""
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
def train_classifier(steps: int, batch: int, log_path: Path | None) -> world.AttributeClassifier:
    attrs = world.examples("classifier", 8192)
    images, targets = world.render_batch(attrs), world.labels(attrs)
    model = world.AttributeClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        x = images[idx]
        noise = torch.randint(-6, 7, x.shape, generator=gen)  # pixel noise: generated images are not exact
        x = (x.int() + noise).clamp(0, 255).to(torch.uint8)
        logits = model(x)
        loss = sum(F.cross_entropy(logits[h], targets[h][idx]) for h in world.HEADS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(log_path, {"stage": "classifier", "step": step, "loss": round(loss.item(), 4)})
    model.eval()
    fp16_round_trip(model)
    fresh = world.examples("classifier", 9192)[8192:]
    acc = world.prompt_accuracy(model, world.render_batch(fresh), fresh)
    log(log_path, {"stage": "classifier", "fresh_accuracy": acc})
    return model


def train_vae(vae, steps: int, batch: int, log_path: Path | None) -> float:
    """Reconstruction MSE + a small KL; returns the latent scaling factor (1 / std of the latents)."""
    attrs = world.examples("classifier", 4096)  # every shape: the autoencoder is the world's camera
    images = world.render_batch(attrs).float() / 127.5 - 1  # (N, 3, 32, 32)
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
        std = float(torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, 1024, 256)]).std())
    return 1.0 / std


@torch.no_grad()
def encode_dataset(sd: SDComponents, n: int) -> tuple[torch.Tensor, list[str]]:
    attrs = world.examples("pretrain", n)
    images = world.render_batch(attrs).float() / 127.5 - 1
    latents = torch.cat([sd.vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, n, 256)])
    return latents * sd.vae.config.scaling_factor, [a.caption for a in attrs]  # (N, 4, 16, 16)


@torch.no_grad()
def text_states(sd: SDComponents, captions: list[str]) -> torch.Tensor:
    return sd.text_encoder(tokenize_captions(sd.tokenizer, captions), return_dict=False)[0]  # (B, 77, 32)


@torch.no_grad()
def evaluate(sd: SDComponents, classifier, n_repeats: int = 1, steps: int = world.SAMPLING_STEPS,
             guidance: float = world.GUIDANCE_SCALE) -> dict:
    out = {}
    for name, shapes in (("pretrain", world.PRETRAIN_SHAPES), ("concept", (world.CONCEPT,))):
        asked = world.prompt_grid(shapes, n_repeats)
        images = world.generate(sd, [a.caption for a in asked], seed=0, steps=steps, guidance_scale=guidance)
        out[name] = world.prompt_accuracy(classifier, images, asked)
    return out


def train_unet(sd: SDComponents, classifier, args, log_path: Path | None) -> SDComponents:
    latents, captions = encode_dataset(sd, args.num_images)
    vocab = sorted(set(captions)) + [""]
    states = text_states(sd, vocab)  # (V, 77, 32): the frozen encoder's states, once per caption
    cap_idx = torch.tensor([vocab.index(c) for c in captions])
    unet, ema = sd.unet, copy.deepcopy(sd.unet).requires_grad_(False)
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=1e-2)
    warm = 200
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(s, args.unet_steps) / args.unet_steps)))
    gen = torch.Generator().manual_seed(3)
    scheduler, start, eval_sd = sd.noise_scheduler, time.time(), copy.copy(sd)
    eval_sd.unet = ema
    for step in range(args.unet_steps):
        idx = torch.randint(0, len(latents), (args.batch_size,), generator=gen)
        x0, cond = latents[idx], cap_idx[idx].clone()
        cond[torch.rand(len(idx), generator=gen) < args.caption_dropout] = len(vocab) - 1  # the empty caption
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        pred = unet(scheduler.add_noise(x0, noise, t), t, states[cond], return_dict=False)[0]
        loss = (F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3)) * min_snr_weights(scheduler, t, 5.0)).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        if step % 50 == 0:
            log(log_path, {"stage": "unet", "step": step, "loss": round(loss.item(), 4),
                           "lr": f"{sched.get_last_lr()[0]:.2e}", "seconds": round(time.time() - start)})
        if (step + 1) % args.eval_every == 0 or step == args.unet_steps - 1:
            log(log_path, {"stage": "unet", "step": step + 1, "prompt_accuracy": evaluate(eval_sd, classifier),
                           "seconds": round(time.time() - start)})
    fp16_round_trip(ema)
    return eval_sd


# ---------------------------------------------------------------------------------------------------------------------
def save_world(sd: SDComponents, classifier, out: Path, record: dict) -> None:
    """Diffusers folder layout in fp16 safetensors + classifier/ + world.json, written beside and renamed in."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for module in (sd.unet, sd.vae, sd.text_encoder):
        module.to(torch.float16)
    save_components(sd, tmp)
    world.save_classifier(classifier, tmp / "classifier")
    atomic_write_text(tmp / "model_index.json", json.dumps(world.model_index(), indent=1))
    atomic_write_text(tmp / "world.json", json.dumps(record, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(world.ASSETS))
    p.add_argument("--log", help="JSON lines log (default: <out>.log.jsonl)")
    p.add_argument("--pilot", action="store_true", help="a few minutes: tiny step counts, to check the pipeline")
    p.add_argument("--threads", type=int, default=1, help="1: on a shared CPU, 2 threads spin-wait (~3x slower)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classifier_steps", type=int, default=600)
    p.add_argument("--vae_steps", type=int, default=700)
    p.add_argument("--unet_steps", type=int, default=3000)
    p.add_argument("--unet_width", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--caption_dropout", type=float, default=0.1)
    p.add_argument("--num_images", type=int, default=8192)
    p.add_argument("--eval_every", type=int, default=500)
    args = p.parse_args(argv)
    if args.pilot:
        args.classifier_steps, args.vae_steps, args.unet_steps, args.eval_every = 40, 40, 20, 10
        args.num_images = 512
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    log_path = Path(args.log) if args.log else out.with_name(out.name + ".log.jsonl")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")
    start = time.time()
    log(log_path, {"stage": "start", "args": vars(args)})

    classifier = train_classifier(args.classifier_steps, 128, log_path)
    t_classifier = time.time() - start
    sd = build_tiny_sd(args.seed)
    sd.tokenizer.model_max_length = TOKENS
    fp16_round_trip(sd.text_encoder)
    torch.manual_seed(args.seed)
    sd.vae = world_vae()
    sd.vae.register_to_config(scaling_factor=train_vae(sd.vae, args.vae_steps, 32, log_path))
    t_vae = time.time() - start - t_classifier
    torch.manual_seed(args.seed)
    from diffusers import UNet2DConditionModel

    sd.unet = UNet2DConditionModel(**world_unet_config(args.unet_width))
    sd = train_unet(sd, classifier, args, log_path)
    final = evaluate(sd, classifier, n_repeats=4)
    seconds = time.time() - start
    record = {"command": " ".join(["python tools/pretrain_tiny.py", *(argv if argv is not None else sys.argv[1:])]),
              "seconds": {"total": round(seconds), "classifier": round(t_classifier), "vae": round(t_vae)},
              "threads": args.threads, "prompt_accuracy": final, "args": vars(args)}
    log(log_path, {"stage": "final", **record})
    save_world(sd, classifier, out, record)
    log(log_path, {"stage": "saved", "out": str(out)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
