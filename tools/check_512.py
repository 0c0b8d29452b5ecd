"""512 px on the real architecture (issue 16 part 2): every shipped config trains and generates on the Stable Diffusion
v1.5 UNet (random weights) at 64x64 latents with 77x768 text states, in fp32 and under bf16 autocast.

    python tools/check_512.py                                   # CPU: every shipped config, fp32 + bf16
    python tools/check_512.py --configs res_tuning_bypass lora --precisions fp32
    python tools/check_512.py --device cuda                     # the same on a GPU
    python tools/check_512.py --quick --out /tmp/check          # tiny UNet, 8x8 latents, two configs: seconds (CI)

Per config and precision, on batch 1:
- training, as train/ does it (diffusion_loss on noised latents, backward, AdamW, zero_grad), for at least 2 steps
  and until every trainable tensor has had a non-zero gradient: every loss finite, every gradient present and
  finite, some non-zero at step 1, each tensor non-zero by the last step, trainables fp32. A zero-initialised last
  layer (LoRA's B, an adapter's up-projection, Res-Prompt's lambda = 0) gives the tensors before it an exactly zero
  gradient until its first update, so step 1 reaches only part of them; the bypass chains such adapters stem after
  stem and needs one update per stem (6 steps on SD v1.5). bf16: the frozen UNet in bf16 under bf16 autocast (full
  fine-tuning keeps the UNet fp32), as accelerate's mixed precision sets it up.
- generation, as generate.py does it: one DDIM step with classifier-free guidance (batch 2: unconditional +
  conditional rows) under no_grad, the UNet in the precision's dtype and the trained tuners attached: the noise
  prediction (2, 4, S, S) and the next latents (1, 4, S, S) are finite, and they differ from the base UNet's (the
  tuners are active; full fine-tuning has no base to compare with).
- time of each step and peak memory of training and of generation: each config in its own process; CPU: the
  resident set's high-water mark (VmHWM), reset after the model is built; CUDA: max_memory_allocated.
No text encoder or VAE: latents and text states are random (the checks are about shapes and numerics, not values).
Writes check-<px>-<device>[-quick].{md,json} (default folder bench/results); exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python tools/check_512.py` from anywhere, without installing the package
    sys.path.insert(0, str(ROOT))

from bench import harness as bench  # noqa: E402
from bench.harness import GB  # noqa: E402
from restune_diffusion.cli import run_cli  # noqa: E402
from restune_diffusion.files import atomic_write_text  # noqa: E402
from restune_diffusion.methods import CONFIG_DIR, methods  # noqa: E402
from restune_diffusion.sampling import DEFAULT_GUIDANCE  # noqa: E402

PRECISIONS = ("fp32", "bf16")
QUICK_CONFIGS = ("lora", "res_tuning_bypass")
LEARNING_RATE = 1e-4  # a tuner's usual rate; the first update makes every zero-initialised layer non-zero
GUIDANCE_SCALE = DEFAULT_GUIDANCE
SAMPLER_STEPS = 50  # DDIM schedule; the check takes its first (noisiest) step, as a generation does


def shipped_configs() -> list[str]:
    """Every method's config (restune_diffusion.methods): the demo config and configs/tiny/ target the tiny model."""
    return list(methods())


def config_path(name: str) -> Path:
    """A shipped config's name (`lora`) or a YAML path."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"--configs: {path} not found")
        return path
    if name not in shipped_configs():
        raise ValueError(f"--configs: unknown config {name!r}; expected a YAML path or one of {shipped_configs()}")
    return CONFIG_DIR / f"{name}.yaml"


# ---------------------------------------------------------------------------------------------------------------------
# worker: one config, every precision, in this process


def sd15_noise_scheduler():
    """The DDPM training scheduler of SD v1.5 (its scheduler_config.json)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, steps_offset=1)


def build(path: Path, precision: str, opts: dict, device):
    """The seeded random UNet with the config attached; frozen weights in the precision's dtype, trainables fp32
    (train/setup.py build_models). Returns (unet, handle, named trainables)."""
    import torch

    from restune_diffusion.attach import attach
    from restune_diffusion.models import build_unet

    torch.manual_seed(0)  # the same weights and tuner init for every config and precision
    unet = build_unet(opts["model"], device=device)
    handle = attach(unet, path, name="default")
    dtype = bench.torch_dtype(precision)
    if not handle.full_unet and dtype != torch.float32:
        unet.to(dtype)
        handle.module.float()  # peft-built tuners sit in the UNet's tree and were cast with it: back to fp32
    named = [(n, p) for n, p in handle.module.named_parameters() if p.requires_grad]
    if handle.full_unet:
        named += [(f"unet.{n}", p) for n, p in unet.named_parameters() if p.requires_grad]
    return unet, handle, named


def gradient_report(named: list) -> dict:
    """How many trainable tensors have no gradient, a non-finite one, or an exactly zero one (first names of each)."""
    import torch

    none = [n for n, p in named if p.grad is None]
    with torch.no_grad():
        nonfinite = [n for n, p in named if p.grad is not None and not torch.isfinite(p.grad).all()]
        zero = [n for n, p in named if p.grad is not None and not p.grad.any()]
    return {"tensors": len(named), "no_grad": len(none), "nonfinite": len(nonfinite), "zero": len(zero),
            "no_grad_names": none[:5], "nonfinite_names": nonfinite[:5], "zero_names": zero[:5]}


def train_steps(unet, named: list, precision: str, opts: dict, device) -> dict:
    """Steps of training's objective (train/loss.py) on random latents/text until every trainable tensor has had a
    non-zero gradient (at least 2 steps, at most opts["max_train_steps"]): loss, time and a gradient report per
    step."""
    import torch

    from restune_diffusion.train.loss import diffusion_loss

    dtype, size, scheduler = bench.torch_dtype(precision), opts["latent_size"], sd15_noise_scheduler()
    weight_dtype = next(unet.parameters()).dtype
    optimizer = torch.optim.AdamW([p for _, p in named], lr=LEARNING_RATE)
    g = torch.Generator().manual_seed(1)

    def forward_backward(latents, text, noise, timesteps):
        with bench.autocast(device, dtype):  # accelerate's mixed precision: autocast around the forward
            loss = diffusion_loss(unet, scheduler, latents, text, noise, timesteps)
        loss.backward()
        return loss.detach()

    unet.train()
    losses, times, grads, reached = [], [], [], set()
    # at least 2 steps: the second shows an update leaves everything finite, and times the steady step
    while len(losses) < max(2, opts["max_train_steps"]) and (len(reached) < len(named) or len(losses) < 2):
        latents = torch.randn(1, 4, size, size, generator=g).to(device, weight_dtype)  # (B, 4, S, S)
        noise = torch.randn(1, 4, size, size, generator=g).to(device, weight_dtype)
        text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g).to(device, weight_dtype)
        timesteps = torch.randint(0, 1000, (1,), generator=g).to(device)
        seconds, loss = bench.timed(functools.partial(forward_backward, latents, text, noise, timesteps), device)
        report = gradient_report(named)  # untimed
        reached |= {n for n, p in named if p.grad is not None and p.grad.any()}
        report["reached"] = len(reached)
        seconds += bench.timed(lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)), device)[0]
        losses.append(float(loss))
        times.append(seconds)
        grads.append(report)
    return {"loss": losses, "step_s": times, "grads": grads, "never_reached": [n for n, _ in named
                                                                               if n not in reached][:5],
            "trainables_fp32": all(p.dtype == torch.float32 for _, p in named)}


def denoise_step(unet, handle, precision: str, opts: dict, device) -> dict:
    """One DDIM step with classifier-free guidance, under no_grad, the UNet in the precision's dtype (generate.py
    --dtype), the tuners attached (fp32, cast at their boundary); and the base UNet's prediction beside it."""
    import torch

    from restune_diffusion.samplers import make_scheduler

    dtype, size = bench.torch_dtype(precision), opts["latent_size"]
    unet.to(dtype).eval()  # non-full: already in dtype; full: the trained fp32 UNet as generation loads it
    sampler = make_scheduler("ddim", sd15_noise_scheduler().config)
    sampler.set_timesteps(SAMPLER_STEPS)
    t = sampler.timesteps[0]
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(1, 4, size, size, generator=g).to(device, dtype)  # (1, 4, S, S)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g).to(device, dtype)  # unconditional, prompt
    model_input = sampler.scale_model_input(torch.cat([latents] * 2), t)  # (2, 4, S, S)

    @torch.no_grad()
    def step():
        eps = unet(model_input, t, text).sample  # (2, 4, S, S)
        uncond, cond = eps.chunk(2)
        guided = uncond + GUIDANCE_SCALE * (cond - uncond)
        return eps, sampler.step(guided, t, latents, return_dict=False)[0]  # (1, 4, S, S)

    seconds, (eps, nxt) = bench.timed(step, device)
    active = None
    if not handle.full_unet:
        with handle.disabled(), torch.no_grad():
            active = not torch.equal(unet(model_input, t, text).sample, eps)
    return {"step_s": seconds, "noise_shape": list(eps.shape), "latents_shape": list(nxt.shape),
            "finite": bool(torch.isfinite(eps).all() and torch.isfinite(nxt).all()), "tuners_active": active}


def checks(train: dict, gen: dict, size: int) -> dict:
    """Each check's verdict (None: does not apply)."""
    first, later = train["grads"][0], train["grads"][1:]
    return {
        "loss finite": all(x == x and abs(x) != float("inf") for x in train["loss"]),
        "step 1: every trainable has a finite gradient": first["no_grad"] == 0 and first["nonfinite"] == 0,
        "step 1: some gradients non-zero": first["zero"] < first["tensors"],
        "every step: gradients finite": all(r["no_grad"] == 0 and r["nonfinite"] == 0 for r in later),
        "every trainable tensor got a non-zero gradient": not train["never_reached"],
        "trainables fp32": train["trainables_fp32"],
        "denoise output finite": gen["finite"],
        "denoise shapes": gen["noise_shape"] == [2, 4, size, size] and gen["latents_shape"] == [1, 4, size, size],
        "tuners active in generation": gen["tuners_active"],
    }


def check_precision(path: Path, precision: str, opts: dict) -> dict:
    import torch

    device = torch.device(opts["device"])
    start = time.perf_counter()
    unet, handle, named = build(path, precision, opts, device)
    row = {"params": sum(p.numel() for _, p in named), "text_width": unet.config.cross_attention_dim,
           "build_s": time.perf_counter() - start,
           "weights_bytes": bench.memory_in_use(device), "peak_reset": bench.reset_peak(device)}
    row["train"] = train_steps(unet, named, precision, opts, device)
    row["train_peak_bytes"] = bench.peak_memory(device)
    bench.reset_peak(device)
    row["generate"] = denoise_step(unet, handle, precision, opts, device)
    row["generate_peak_bytes"] = bench.peak_memory(device)
    row["checks"] = checks(row["train"], row["generate"], opts["latent_size"])
    row["passed"] = all(v is not False for v in row["checks"].values())
    handle.detach()
    return row


def worker(names: list[str], opts: dict, result_path: Path) -> int:
    import torch

    if opts["quick"]:
        torch.set_num_threads(1)  # tiny ops: threads only add synchronisation
    result = {"environment": bench.environment(opts["device"]), "configs": {}}
    for name in names:
        done = result["configs"].setdefault(name, {})
        for precision in opts["precisions"]:
            try:
                done[precision] = {"status": "ok", **check_precision(Path(opts["paths"][name]), precision, opts)}
            except Exception as err:  # one failing precision must not hide the others; the report names it
                done[precision] = {"status": "error", "passed": False, "note": f"{type(err).__name__}: {err}"}
                print(f"[check] {name} {precision}: {type(err).__name__}: {err}", file=sys.stderr)
            gc.collect()
            atomic_write_text(result_path, json.dumps(result))  # what ran survives a crash later on
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# parent: one process per config (--quick: one for all), then the report


def run_worker(names: list[str], opts: dict) -> dict:
    """{"environment": ..., "configs": {name: {precision: row}}}; a worker that died leaves an error row."""
    data, why = bench.run_worker(__file__, names, opts)
    data = data or {"configs": {}}
    for name in names:
        for precision in opts["precisions"]:
            data["configs"].setdefault(name, {}).setdefault(precision, {"status": "error", "passed": False,
                                                                         "note": why})
    return data


def _gb(value) -> str:
    return "–" if value is None else f"{value / GB:.2f}"


def _s(value) -> str:
    return "–" if value is None else f"{value:.2f}" if value >= 0.1 else f"{value:.4f}"


def row_cells(r: dict) -> list[str]:
    t, g = r["train"], r["generate"]
    first, steps = t["grads"][0], len(t["loss"])
    reached = next((i + 1 for i, x in enumerate(t["grads"]) if x["reached"] == x["tensors"]), None)
    later = statistics.median(t["step_s"][1:]) if steps > 1 else None
    return [f"{r['params'] / 1e6:.3f}", str(steps), f"{t['loss'][0]:.4f} → {t['loss'][-1]:.4f}",
            f"{first['tensors'] - first['zero']}/{first['tensors']}", f"step {reached}" if reached else "NOT ALL",
            _s(t["step_s"][0]), _s(later), _gb(r["train_peak_bytes"]), _s(g["step_s"]), _gb(r["generate_peak_bytes"]),
            {True: "yes", False: "NO", None: "– (full)"}[g["tuners_active"]], "PASS" if r["passed"] else "FAIL"]


def table(results: dict) -> list[str]:
    head = ("config | precision | trainable (M) | steps | loss (first → last) | non-zero grads, step 1 | "
            "all tensors reached | step 1 (s) | later steps, median (s) | train peak (GB) | denoise step (s) | "
            "denoise peak (GB) | tuners active | result")
    lines = ["| " + head + " |", "|" + "---|" * (head.count("|") + 1)]
    for name, data in results.items():
        for precision, r in data["precisions"].items():
            cells = row_cells(r) if r.get("status") == "ok" else [r.get("note", "")] + ["–"] * 10 + ["FAIL"]
            lines.append("| " + " | ".join([f"`{name}`", precision, *cells]) + " |")
    return lines


def failures(results: dict) -> list[str]:
    found = []
    for name, data in results.items():
        for precision, r in data["precisions"].items():
            if r.get("status") != "ok":
                found.append(f"{name} {precision}: {r.get('note')}")
            found += [f"{name} {precision}: {check}" for check, ok in r.get("checks", {}).items() if ok is False]
    return found


def text_width(results: dict):
    return next((r["text_width"] for d in results.values() for r in d["precisions"].values() if "text_width" in r),
                "–")


def markdown(report: dict) -> str:
    s, env, mach = report["settings"], report["environment"], report["machine"]
    size = s["latent_size"]
    memory = ("CUDA max_memory_allocated" if s["device"] == "cuda" else
              "peak resident set (VmHWM) of the config's own process, reset after the model is built: it includes "
              "the weights (and ~0.4 GB of interpreter and libraries)")
    failed = failures(report["results"])
    lines = [
        f"# {size * 8} px on the {'tiny UNet (--quick)' if s['quick'] else 'SD v1.5 UNet architecture'} "
        "(random weights): one training and one denoising step per config",
        "",
        f"`{report['command']}`  ",
        f"{s['device']} ({env.get('gpu') or mach.get('cpu')}, {mach.get('cores')} cores), torch {env.get('torch')}, "
        f"diffusers {env.get('diffusers')}; latents {size}x{size}, text 77x{text_width(report['results'])}, batch 1 "
        f"(denoising: 2 rows, classifier-free guidance {GUIDANCE_SCALE}, one DDIM step); training steps (AdamW, "
        f"lr {LEARNING_RATE:g}) until every trainable tensor has had a non-zero gradient, at least 2, at "
        f"most {s['max_train_steps']}.",
        "",
        "fp32: everything fp32. bf16: the frozen UNet in bf16 under bf16 autocast, trainables fp32 (full fine-tuning "
        "keeps the UNet fp32); denoising with the UNet in bf16 and fp32 tuners, as `generate.py --dtype bf16`. "
        f"Step times per step; memory: {memory}.",
        "At step 1 only part of the tensors can have a non-zero gradient: a zero-initialised last layer (LoRA's B, "
        "the adapters' up-projection, Res-Prompt's lambda = 0) passes none to what lies before it until it has "
        "been updated once; the bypass chains such layers stem after stem (state_i feeds state_i+1 through the "
        "zero-initialised V_i+1), so its first stem's tensors are reached one update per stem later. Step 1 "
        "includes one-time allocations (AdamW state); later steps are the steady cost.",
        "",
        *table(report["results"]),
        "",
        f"**{'PASS' if not failed else 'FAIL'}**: "
        + ("every config trains (finite loss, finite gradients reaching every trainable tensor) and denoises "
           "(finite, right shapes, tuners active) in every precision." if not failed else "; ".join(failed)),
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--configs", nargs="+", default=None,
                   help="shipped config names or YAML paths (default: every configs/*.yaml but tiny_demo; "
                        f"quick: {' '.join(QUICK_CONFIGS)})")
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--latent_size", type=int, default=None, help="latent side (default 64 = 512 px; quick: 8)")
    p.add_argument("--max_train_steps", type=int, default=8,
                   help="train until every trainable tensor has had a non-zero gradient (at least 2 steps, at most\n"
                        "this many; default 8): d zero-initialised layers in a chain need d steps (SD v1.5 bypass: 6)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="the tiny UNet at 8x8 latents, two configs: seconds (CI)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results",
                   help="folder for check-<px>-<device>[-quick].md / .json (default bench/results)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: the config to run in this process
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--opts", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("latent_size", "max_train_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be a positive integer, got {value}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker.split(","), json.loads(args.opts), args.result)
    names = args.configs or list(QUICK_CONFIGS if args.quick else shipped_configs())
    paths = {Path(n).stem if n.endswith((".yaml", ".yml")) else n: str(config_path(n)) for n in names}
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device visible to torch; run with --device cpu")
    opts = {"device": args.device, "quick": args.quick, "model": "tiny-random" if args.quick else "sd15",
            "latent_size": args.latent_size or (8 if args.quick else 64), "max_train_steps": args.max_train_steps,
            "precisions": list(dict.fromkeys(args.precisions)), "paths": paths}
    results, env = {}, {}
    for group in [list(paths)] if args.quick else [[name] for name in paths]:  # quick: one process pays the imports
        start = time.perf_counter()
        data = run_worker(group, opts)
        env = data.get("environment", env)
        for name in group:
            results[name] = {"precisions": data["configs"][name]}
            rows = data["configs"][name].items()
            verdicts = ", ".join(f"{p} {'PASS' if r.get('passed') else 'FAIL'}" for p, r in rows)
            print(f"[check] {name}: {verdicts} ({time.perf_counter() - start:.0f} s)", flush=True)
    report = {"command": shlex.join(["python", "tools/check_512.py", *(sys.argv[1:] if argv is None else argv)]),
              "settings": {k: v for k, v in opts.items() if k != "paths"}, "configs": paths,
              "machine": bench.machine(), "environment": env,
              "results": results, "passed": not failures(results)}
    tag = f"check-{opts['latent_size'] * 8}-{args.device}" + ("-quick" if args.quick else "")
    text = markdown(report)
    bench.write_report(args.out, tag, report, text, "check")
    if not report["passed"]:
        raise SystemExit(1)  # a failed check is not a usage error (run_cli's 2): the report above names it
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "check_512.py"))
