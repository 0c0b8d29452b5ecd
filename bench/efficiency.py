"""Efficiency of every tuner on the Stable Diffusion v1.5 UNet: trainable parameters, peak memory and time of one
training step, and multi-task bypass inference (DESIGN.md, "Benchmark"; paper arXiv 2310.19859, SD v1.5 table).

    python bench/efficiency.py                                  # CPU: batch 2, 32x32 latents, fp32 (~10 min)
    python bench/efficiency.py --device cuda --latent_size 64 --batch_size 8 --dtype fp16    # 512 px on a GPU
    python bench/efficiency.py --latent_size 64 --batch_size 1 --methods joint_training    # one row, into cpu-512
    python bench/efficiency.py --quick --out /tmp/bench         # tiny UNet, every method, seconds (CI)

Each method runs in its own subprocess so memory peaks don't mix (--quick shares one, on one thread: a tiny
model's peaks are not the point, and each process pays ~7 s of imports). A run adds its rows to a results file
written with the same settings (bench/README.md). The real architecture runs with random weights: time and memory
don't depend on the values. Parameter counts always come from the SD v1.5 UNet built on the meta device.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/efficiency.py` from anywhere, without installing the package
    sys.path.insert(0, str(ROOT))
from bench import harness  # noqa: E402
from bench.harness import (  # noqa: E402
    DTYPES,
    autocast,
    cpu_jiffies,
    environment,
    fmt,
    fmt_gb,
    fmt_s,
    machine,
    memory_in_use,
    peak_memory,
    ratio,
    reset_peak,
    steal_pct,
    timed,
    torch_dtype,
)
from restune_diffusion.files import atomic_write_text  # noqa: E402
from restune_diffusion.methods import config_path, label, methods, paper_methods  # noqa: E402
from restune_diffusion.paper import PAPER as PAPER_TABLE  # noqa: E402

PEFT = "peft_lora"  # the peer users run today (diffusers' train_text_to_image_lora.py): 9,964,800 params on SD v1.5
PEFT_LORA = dict(r=50, lora_alpha=50, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"])
# the frozen forward, then every method (restune_diffusion.methods), the peer beside our LoRA
METHODS = ("floor", *[m for method in methods() for m in ((method, PEFT) if method == "lora" else (method,))])
MULTITASK = "multitask"
JOINT = "joint_training"  # K bypasses trained in one backbone pass (restune_diffusion.train.joint) vs K separate runs
CONFIGS = {m: config_path(m) for m in METHODS if m not in ("floor", PEFT)}
MULTITASK_KS = (1, 2, 4, 8)

# Paper, SD v1.5 on COCO2017: row, FID, params (M), train memory (GB), hours/epoch
PAPER_ROW = {"floor": "base", PEFT: "lora"}  # our rows measured against another paper row
PAPER = {m: (label(PAPER_ROW.get(m, m)), *PAPER_TABLE[PAPER_ROW.get(m, m)].values()) for m in METHODS
         if PAPER_ROW.get(m, m) in PAPER_TABLE}
BYPASS = "res_tuning_bypass"
TUNED_ROWS = tuple(m for m in METHODS if PAPER_ROW.get(m, m) in paper_methods() and m != "full")  # a paper ratio


# ---------------------------------------------------------------------------------------------------------------------
# methods



def prepare(unet, method: str) -> list:
    """Freeze the UNet and put `method` on it; returns the trainable parameters (fp32, as in training)."""
    import torch

    unet.requires_grad_(False)
    if method == "floor":
        return []
    if method == PEFT:
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(**PEFT_LORA))
        params = [p for p in unet.parameters() if p.requires_grad]
        for p in params:  # diffusers' cast_training_params: the LoRA weights train in fp32 on an fp16 UNet
            p.data = p.data.to(torch.float32)
        return params
    from restune_diffusion.attach import attach

    return attach(unet, CONFIGS[method], name=method).trainable_parameters()


def count_parameters(method: str) -> dict:
    """Trainable parameters of `method` on the SD v1.5 UNet, built on the meta device (no memory, no init)."""
    from restune_diffusion.models import build_unet

    unet = build_unet("sd15", device="meta")
    total = sum(p.numel() for p in unet.parameters())
    trainable = sum(p.numel() for p in prepare(unet, method))
    return {"params": trainable, "unet_params": total, "params_pct": 100 * trainable / total}


def make_inputs(unet, batch: int, latent: int, device, dtype):
    """Seeded (latents (B, 4, S, S), timesteps (B,), text states (B, 77, D), target like latents)."""
    import torch

    g = torch.Generator().manual_seed(0)
    cfg = unet.config
    sample = torch.randn(batch, cfg.in_channels, latent, latent, generator=g)
    text = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g)
    target = torch.randn(batch, cfg.out_channels, latent, latent, generator=g)
    timesteps = torch.randint(0, 1000, (batch,), generator=g)
    return (sample.to(device, dtype), timesteps.to(device), text.to(device, dtype)), target.to(device)



def make_step(unet, params: list, inputs, target, amp_dtype, device):
    """One training step (forward, MSE vs the target, backward, AdamW, zero_grad(set_to_none)); the floor: a frozen
    forward under no_grad. Returns a closure that runs it and gives the loss."""
    import torch
    import torch.nn.functional as F

    if not params:
        def floor_step():
            with torch.no_grad(), autocast(device, amp_dtype):
                return unet(*inputs).sample.float().pow(2).mean()
        return floor_step
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def train_step():
        with autocast(device, amp_dtype):
            pred = unet(*inputs).sample  # (B, 4, S, S)
        loss = F.mse_loss(pred.float(), target.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return train_step



def measure_method(method: str, opts: dict) -> dict:
    """Build the UNet, put the method on it, run warm-up + timed steps; memory and times of this process."""
    import torch

    from restune_diffusion.models import build_unet

    device, dtype = torch.device(opts["device"]), torch_dtype(opts["dtype"])
    # trainable weights stay fp32: full fine-tuning keeps the whole UNet fp32 (autocast computes in --dtype)
    weight_dtype = torch.float32 if method == "full" else dtype
    start = time.perf_counter()
    torch.manual_seed(0)  # the same random weights in every run
    unet = build_unet(opts["model"], device=device, dtype=weight_dtype)
    params = prepare(unet, method)
    unet.train(bool(params))
    build_s = time.perf_counter() - start
    inputs, target = make_inputs(unet, opts["batch_size"], opts["latent_size"], device, weight_dtype)
    weights = memory_in_use(device)
    peak_reset = reset_peak(device)
    step = make_step(unet, params, inputs, target, dtype, device)
    times, losses = [], []
    for i in range(opts["warmup"] + opts["steps"]):
        seconds, loss = timed(step, device)
        losses.append(float(loss))
        if i >= opts["warmup"]:
            times.append(seconds)
    peak = peak_memory(device)
    return {
        "params_bench_model": sum(p.numel() for p in params),
        "shapes": {"sample": list(inputs[0].shape), "text": list(inputs[2].shape), "weights": str(weight_dtype)},
        "weights_bytes": weights, "peak_bytes": peak, "above_weights_bytes": peak - weights,
        "peak_reset_after_build": peak_reset, "step_s": statistics.median(times), "step_times_s": times,
        "loss_finite": all(map(lambda x: x == x and abs(x) != float("inf"), losses)), "build_s": build_s,
    }


# ---------------------------------------------------------------------------------------------------------------------
# multi-task inference: K bypasses on one backbone pass vs K passes


def measure_multitask(opts: dict) -> dict:
    """K task bypasses (K in MULTITASK_KS) under no_grad, with restune_diffusion.multitask:
    one backbone pass on B rows feeding all K bypasses (the same input for every task, as at the first denoising
    step) vs K separate passes; and the K tasks' inputs stacked into one call of K·B rows (later steps)."""
    import torch

    from restune_diffusion.attach import attach
    from restune_diffusion.models import build_unet
    from restune_diffusion.multitask import multitask_unet_forward

    device, dtype = torch.device(opts["device"]), torch_dtype(opts["dtype"])
    torch.manual_seed(0)
    unet = build_unet(opts["model"], device=device, dtype=dtype).eval()
    handles = [attach(unet, CONFIGS[BYPASS], name=f"task{i}") for i in range(max(MULTITASK_KS))]
    (sample, timestep, text), _ = make_inputs(unet, opts["multitask_batch_size"], opts["latent_size"], device, dtype)
    forward = functools.partial(multitask_unet_forward, unet)
    rows = []
    for k in MULTITASK_KS:
        tasks = handles[:k]
        one = functools.partial(forward, tasks, sample, timestep, text, broadcast=True)
        separate = functools.partial(forward, tasks, sample, timestep, text, shared=False, broadcast=True)
        stacked = functools.partial(forward, tasks, sample.repeat(k, 1, 1, 1), timestep.repeat(k), text.repeat(k, 1, 1))
        t_one, t_sep, t_stack = (_median_time(fn, device, opts) for fn in (one, separate, stacked))
        rows.append({"k": k, "one_pass_s": t_one, "separate_s": t_sep, "speedup": t_sep / t_one,
                     "stacked_s": t_stack, "stacked_speedup": t_sep / t_stack})
    return {"batch_size": opts["multitask_batch_size"], "rows": rows}


def make_joint_steps(unet, handles: list, inputs, target, amp_dtype, device):
    """(joint, separate) training steps of K bypasses on one batch. Joint, as train/joint.py: one backbone
    pass feeds every bypass (route_bypasses broadcast), K losses summed, one AdamW with a param group each. Separate:
    K runs' steps one after another, each a full forward + backward + AdamW of one bypass."""
    import torch
    import torch.nn.functional as F

    from restune_diffusion.multitask import route_bypasses

    joint_opt = torch.optim.AdamW([{"params": h.trainable_parameters()} for h in handles], lr=1e-5)
    alone_opts = [torch.optim.AdamW(h.trainable_parameters(), lr=1e-5) for h in handles]

    def joint():
        with route_bypasses(unet, handles, broadcast=True), autocast(device, amp_dtype):
            pred = unet(*inputs).sample  # (K·B, 4, S, S)
        losses = [F.mse_loss(rows.float(), target.float()) for rows in pred.chunk(len(handles))]
        sum(losses).backward()
        joint_opt.step()
        joint_opt.zero_grad(set_to_none=True)
        return losses[0].detach()

    def separate():
        for handle, opt in zip(handles, alone_opts):
            with route_bypasses(unet, [handle]), autocast(device, amp_dtype):
                pred = unet(*inputs).sample  # (B, 4, S, S)
            loss = F.mse_loss(pred.float(), target.float())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.detach()

    return joint, separate


def measure_joint(opts: dict) -> dict:
    """Training K bypasses (K in MULTITASK_KS): step time and peak memory of one joint step vs K separate runs'
    steps (the same batch each). Peak memory is reset before each measurement (CUDA allocator / VmHWM)."""
    import torch

    from restune_diffusion.attach import attach
    from restune_diffusion.models import build_unet

    device, dtype = torch.device(opts["device"]), torch_dtype(opts["dtype"])
    torch.manual_seed(0)
    unet = build_unet(opts["model"], device=device, dtype=dtype)
    unet.requires_grad_(False)
    unet.train()
    handles = [attach(unet, CONFIGS[BYPASS], name=f"task{i}") for i in range(max(MULTITASK_KS))]
    inputs, target = make_inputs(unet, opts["batch_size"], opts["latent_size"], device, dtype)
    rows = []
    for k in MULTITASK_KS:
        joint, separate = make_joint_steps(unet, handles[:k], inputs, target, dtype, device)
        row = {"k": k}
        for name, fn in (("joint", joint), ("separate", separate)):
            reset_peak(device)
            row[f"{name}_s"] = _median_time(fn, device, opts)
            row[f"{name}_peak_bytes"] = peak_memory(device)
        row["speedup"] = row["separate_s"] / row["joint_s"]
        rows.append(row)
    one = rows[0]["joint_peak_bytes"]
    for row in rows:
        row["peak_vs_k1"] = row["joint_peak_bytes"] / one
    return {"batch_size": opts["batch_size"], "rows": rows}


def _median_time(fn, device, opts) -> float:
    times = [timed(fn, device)[0] for _ in range(opts["warmup"] + opts["steps"])]
    return statistics.median(times[opts["warmup"]:])


# ---------------------------------------------------------------------------------------------------------------------
# worker: one process, one or more methods, results as JSON to a file





def worker(methods: list[str], opts: dict, result_path: Path) -> int:
    if opts["quick"]:  # tiny ops: threads only add synchronisation, and thrash when other jobs share the cores
        import torch

        torch.set_num_threads(1)
    results: dict = {"environment": environment(opts["device"]), "methods": {}}
    for method in methods:
        load_before, cpu_before = os.getloadavg()[0], cpu_jiffies()
        try:
            if method in SPECIAL:
                results[method] = {"status": "ok", **SPECIAL[method](opts)}
            else:
                row = {"status": "ok", **count_parameters(method), **measure_method(method, opts)}
                results["methods"][method] = row
        except Exception as err:  # one broken method must not take the others down; the report names it
            entry = {"status": "error", "note": f"{type(err).__name__}: {err}"}
            if method in SPECIAL:
                results[method] = entry
            else:
                results["methods"][method] = entry
            print(f"[bench] {method}: {entry['note']}", file=sys.stderr)
        entry = results[method] if method in SPECIAL else results["methods"][method]
        # other processes, or the hypervisor (steal time), skew the times: say how busy the machine was
        entry["load_avg"] = [load_before, os.getloadavg()[0]]
        entry["cpu_steal_pct"] = steal_pct(cpu_before, cpu_jiffies())
        gc.collect()
        atomic_write_text(result_path, json.dumps(results))  # partial results survive a crash in a later method
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# parent: run workers, gather, judge, write



def available(method: str) -> str | None:
    """None if `method` can run here, else why not."""
    if method in CONFIGS and not CONFIGS[method].is_file():
        return f"{CONFIGS[method].relative_to(ROOT)} not found"
    if method == PEFT and importlib.util.find_spec("peft") is None:
        return "peft not installed (pip install peft)"
    if method in SPECIAL:
        module = "restune_diffusion.multitask" if method == MULTITASK else "restune_diffusion.train.joint"
        if importlib.util.find_spec(module) is None:
            return f"{module.replace('.', '/')}.py not found"
        if not CONFIGS[BYPASS].is_file():
            return f"{CONFIGS[BYPASS].relative_to(ROOT)} not found"
    return None


def run_worker(methods: list[str], opts: dict) -> dict:
    data, why = harness.run_worker(__file__, methods, opts)
    data = data or {"methods": {}}
    for method in methods:
        done = data.get(method) if method in SPECIAL else data["methods"].get(method)
        if done is None:
            entry = {"status": "error", "note": why}
            data.__setitem__(method, entry) if method in SPECIAL else data["methods"].__setitem__(method, entry)
    return data


def _minus(a, b):
    return None if a is None or b is None else a - b


def derive(rows: dict) -> None:
    """Add ratios to full fine-tuning and to the floor (measured in this run), and to the paper's rows."""
    ok = {m: r for m, r in rows.items() if r.get("status") == "ok"}
    full, floor = ok.get("full", {}), ok.get("floor", {})
    full_above = _minus(full.get("peak_bytes"), floor.get("peak_bytes"))
    for row in ok.values():
        # what a method needs beyond the frozen forward (weights + no_grad activations): grads, optimizer state,
        # stored activations; the paper's ratio is of total training memory on GPUs, where activations dominate
        row["above_floor_bytes"] = _minus(row["peak_bytes"], floor.get("peak_bytes"))
        row["above_floor_vs_full"] = ratio(row["above_floor_bytes"], full_above)
        row["peak_vs_full"] = ratio(row["peak_bytes"], full.get("peak_bytes"))
        row["peak_vs_floor"] = ratio(row["peak_bytes"], floor.get("peak_bytes"))
        row["above_vs_full"] = ratio(row["above_weights_bytes"], full.get("above_weights_bytes"))
        row["step_vs_full"] = ratio(row["step_s"], full.get("step_s"))
        row["step_vs_floor"] = ratio(row["step_s"], floor.get("step_s"))
    for method, row in rows.items():
        paper = PAPER.get(method)
        if paper:
            row["paper"] = dict(zip(("row", "fid", "params_m", "memory_gb", "hours_per_epoch"), paper))
            row["paper"]["memory_vs_full"], row["paper"]["hours_vs_full"] = paper_ratios(method)


def paper_ratios(method: str) -> tuple:
    """The paper's (training memory, hours/epoch) of `method` as ratios to Full's: Bypass 0.29, 0.41."""
    paper, full = PAPER.get(method) or (None,) * 5, PAPER["full"]
    return ratio(paper[3], full[3]), ratio(paper[4], full[4])


def targets(rows: dict, multitask: dict | None, joint: dict | None = None) -> list[dict]:
    """The benchmark's targets (figures to reach, not tests): name, measured, bound, passed (None = not measured)."""
    ok = {m: r for m, r in rows.items() if r.get("status") == "ok"}
    found = []

    def check(name, value, bound, passed_if, unit=""):
        passed = None if value is None or bound is None else passed_if(value, bound)
        found.append({"target": name, "measured": value, "bound": bound, "unit": unit, "passed": passed})

    for method, paper in PAPER.items():
        if paper[2] is not None and method in rows:
            count = ok.get(method, {}).get("params")
            error = None if count is None else abs(count / 1e6 - paper[2]) / paper[2]
            check(f"params {method} within 1 % of the paper's {paper[2]} M", error, 0.01, float.__le__)
    get = lambda m, k: ok.get(m, {}).get(k)  # noqa: E731
    for method in TUNED_ROWS:  # issue 16: each tuned row at or below the paper's ratio to Full
        if method in rows:
            memory, hours = paper_ratios(method)
            check(f"{method} memory above floor / Full's <= paper's memory / Full's {memory:.2f}",
                  get(method, "above_floor_vs_full"), memory, float.__le__, "x")
            check(f"{method} step time / Full's <= paper's hours / Full's {hours:.2f}",
                  get(method, "step_vs_full"), hours, float.__le__, "x")
    res, above = "res_tuning", "above_floor_bytes"
    for peer in ("lora", PEFT):  # Res-Tuning below LoRA, ours and peft's
        if peer in rows:
            check(f"Res-Tuning memory above floor < {peer}'s", ratio(get(res, above), get(peer, above)), 1.0,
                  float.__lt__, "x")
            check(f"Res-Tuning step time < {peer}'s", ratio(get(res, "step_s"), get(peer, "step_s")), 1.0,
                  float.__lt__, "x")
    check("bypass peak memory <= 1.05 x floor", ratio(get(BYPASS, "peak_bytes"), get("floor", "peak_bytes")), 1.05,
          float.__le__, "x")
    check("bypass step time <= 1.15 x floor", ratio(get(BYPASS, "step_s"), get("floor", "step_s")), 1.15,
          float.__le__, "x")
    check("bypass memory above weights <= 0.25 x full's",
          ratio(get(BYPASS, "above_weights_bytes"), get("full", "above_weights_bytes")), 0.25, float.__le__, "x")
    check("bypass step time <= 0.45 x full's", ratio(get(BYPASS, "step_s"), get("full", "step_s")), 0.45,
          float.__le__, "x")
    k4 = next((r for r in (multitask or {}).get("rows", []) if r["k"] == 4), None)
    check("K=4 bypasses in one pass >= 3.2 x faster than 4 passes", k4 and k4["speedup"], 3.2, float.__ge__, "x")
    by_k = {r["k"]: r for r in (joint or {}).get("rows", [])}
    get_k = lambda k, key: by_k.get(k, {}).get(key)  # noqa: E731
    check("K=4 bypasses trained jointly >= 3 x faster than 4 runs", get_k(4, "speedup"), 3.0, float.__ge__, "x")
    check("K=8 bypasses trained jointly >= 5 x faster than 8 runs", get_k(8, "speedup"), 5.0, float.__ge__, "x")
    check("K=8 joint training peak memory <= 1.2 x K=1's", get_k(8, "peak_vs_k1"), 1.2, float.__le__, "x")
    return found


# ---------------------------------------------------------------------------------------------------------------------
# markdown





def _spread(row: dict) -> str:
    times = row["step_times_s"]
    spread = f" ({fmt_s(min(times))}–{fmt_s(max(times))})" if len(times) > 1 else ""
    return fmt_s(row["step_s"]) + spread


def method_table(rows: dict) -> list[str]:
    head = ("method | params (M) | % UNet | peak mem (GB) | weights (GB) | above weights (GB) | mem / full | "
            "mem / floor | step (s) | step / full | step / floor || paper row | paper params (M) | "
            "paper mem (GB) | paper mem / full | paper h/epoch | paper h / full | paper FID")
    lines = ["| " + head + " |", "|" + "---|" * (head.count("|") + 1)]
    for method, r in rows.items():
        p = r.get("paper") or {}
        paper = [p.get("row", "–"), fmt(p.get("params_m"), 2), fmt(p.get("memory_gb"), 2),
                 fmt(p.get("memory_vs_full"), 2), fmt(p.get("hours_per_epoch"), 2), fmt(p.get("hours_vs_full"), 2),
                 fmt(p.get("fid"), 2)]
        if r.get("status") != "ok":
            ours = [f"{r.get('status')}: {r.get('note', '')}"] + ["–"] * 10
        else:
            ours = [fmt(r["params"] / 1e6, 3), fmt(r["params_pct"], 3), fmt_gb(r["peak_bytes"]),
                    fmt_gb(r["weights_bytes"]), fmt_gb(r["above_weights_bytes"]), fmt(r["peak_vs_full"]),
                    fmt(r["peak_vs_floor"]), _spread(r),
                    fmt(r["step_vs_full"]), fmt(r["step_vs_floor"])]
        lines.append("| " + " | ".join([f"`{method}`", *ours, "", *paper]) + " |")
    return lines


def ratio_table(rows: dict) -> list[str]:
    """Each row's memory above the frozen floor and step time as ratios to Full's, beside the paper's (issue 16)."""
    lines = ["| method | above floor (GB) | ÷ Full's | paper memory ÷ Full's | step (s) | ÷ Full's | "
             "paper hours ÷ Full's |", "|---|---|---|---|---|---|---|"]
    for method, r in rows.items():
        if r.get("status") != "ok" or method == "floor":
            continue
        memory, hours = paper_ratios(method)
        lines.append(f"| `{method}` | {fmt_gb(r.get('above_floor_bytes'))} | {fmt(r.get('above_floor_vs_full'), 3)} | "
                     f"{fmt(memory)} | {fmt_s(r['step_s'])} | {fmt(r.get('step_vs_full'), 3)} | {fmt(hours)} |")
    return lines + ["", "Ours: peak memory minus the floor's (the frozen forward under no_grad: weights + its "
                    "activations), i.e. what training adds: gradients, optimizer state, stored activations; ÷ the same "
                    "for Full. The paper's: total training memory and hours/epoch ÷ Full's, on GPUs at 512 px."]


def multitask_table(multitask: dict | None) -> list[str]:
    if not multitask:
        return ["(not run)"]
    if multitask.get("status") != "ok":
        return [f"{multitask.get('status')}: {multitask.get('note', '')}"]
    lines = ["| K tasks | K separate passes (s) | one backbone pass + K bypasses (s) | speedup | "
             "one call on K·B stacked rows (s) | speedup |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['k']} | {fmt_s(r['separate_s'])} | {fmt_s(r['one_pass_s'])} | {fmt(r['speedup'])}x | "
              f"{fmt_s(r['stacked_s'])} | {fmt(r['stacked_speedup'])}x |" for r in multitask["rows"]]
    return lines + ["", "One backbone pass feeds every task only when their inputs are equal (same latents, timestep "
                    "and text: the first denoising step). From the second step each task has its own latents; "
                    "`generate_multitask` then stacks them into one call (last columns: the same FLOPs as K passes)."]


def joint_table(joint: dict | None) -> list[str]:
    if not joint:
        return ["(not run)"]
    if joint.get("status") != "ok":
        return [f"{joint.get('status')}: {joint.get('note', '')}"]
    lines = ["| K bypasses | K separate runs: step (s) | joint: step (s) | speedup | separate peak (GB) | "
             "joint peak (GB) | joint peak vs K=1 |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['k']} | {fmt_s(r['separate_s'])} | {fmt_s(r['joint_s'])} | {fmt(r['speedup'])}x | "
              f"{fmt_gb(r['separate_peak_bytes'])} | {fmt_gb(r['joint_peak_bytes'])} | {fmt(r['peak_vs_k1'])}x |"
              for r in joint["rows"]]
    return lines + ["", "Joint: one frozen backbone pass feeds K bypasses (their features are detached), the K losses "
                    "are summed for one backward, one AdamW with a param group per bypass (`train_t2i.py --config "
                    "a.yaml --config b.yaml ...`). Separate: K runs' steps, each with its own backbone pass."]


def target_lines(found: list[dict], quick: bool) -> list[str]:
    lines = []
    for t in found:
        verdict = {True: "PASS", False: "MISS", None: "SKIP"}[t["passed"]]
        value = "not measured" if t["measured"] is None else (
            f"{100 * t['measured']:.2f} % off" if t["target"].startswith("params") else f"{t['measured']:.3f}x")
        note = " (tiny model: indicative only)" if quick and not t["target"].startswith("params") else ""
        lines.append(f"{verdict}  {t['target']}: {value}{note}")
    return lines


def markdown(report: dict) -> str:
    s = report["settings"]
    env, mach = report["environment"], report["machine"]
    where = env.get("gpu") or mach.get("cpu")
    shapes = next((r["shapes"] for r in report["methods"].values() if "shapes" in r), None)
    text_shape = "x".join(map(str, shapes["text"][1:])) if shapes else "77x768"
    lines = [
        f"# Efficiency: {'tiny UNet (--quick)' if s['quick'] else 'SD v1.5 UNet architecture (random weights)'}",
        "",
        *[f"`{r['command']}`" + (f" ({r['at'] or 'earlier'}: {', '.join(r['measured'])})"
                                  if len(report.get("runs", [])) > 1 else "") + "  "
          for r in report.get("runs") or [{"command": report["command"]}]],
        f"{s['device']} ({where}, {mach.get('cores')} cores, {fmt(mach.get('ram_gb'), 0)} GB RAM), "
        f"torch {env.get('torch')}, diffusers {env.get('diffusers')}, peft {env.get('peft', '–')}; "
        f"batch {s['batch_size']}, latents {s['latent_size']}x{s['latent_size']}, text {text_shape}, "
        f"{s['dtype']} frozen UNet, fp32 trainables; step time: median (min–max) of {s['steps']} steps after "
        f"{s['warmup']} warm-up.",
        "",
        "Params: trainable parameters on the SD v1.5 UNet (meta device) and % of its "
        f"{report['unet_params'] / 1e6:.1f} M. Memory: "
        + ("CUDA max_memory_allocated; weights = allocated after build + attach." if s["device"] == "cuda" else
           "peak resident set (VmHWM) of the method's own process; weights = RSS after build + attach (includes "
           "~0.4 GB of interpreter and libraries)."),
        "One step = forward + MSE + backward + AdamW + zero_grad(set_to_none); floor = frozen forward under no_grad. "
        "Paper figures: 512 px training on GPUs (their hardware, batch and epoch), for shape comparison only.",
        "",
        *method_table(report["methods"]),
        "",
        "## Ratios to Full, beside the paper's",
        "",
        *ratio_table(report["methods"]),
        "",
        f"## Multi-task inference (no_grad, batch {s['multitask_batch_size']})",
        "",
        *multitask_table(report.get("multitask")),
        "",
        f"## Joint bypass training (batch {s['batch_size']})",
        "",
        *joint_table(report.get(JOINT)),
        "",
        "## Targets",
        "",
        "```",
        *target_lines(report["targets"], s["quick"]),
        "```",
    ]
    notes = [f"- `{m}`: {r['note']}" for m, r in report["methods"].items() if r.get("status") != "ok"]
    if "sc_tuner" in report["methods"]:
        notes.append("- `sc_tuner`: SC-Tuner from SCEdit (arXiv 2312.11392), not a row of the Res-Tuning table; "
                     "SCEdit reports 19.68 M parameters for it on SD v1.5.")
    loads = [x for r in [*report["methods"].values(), report.get("multitask") or {}] for x in r.get("load_avg", [])]
    steal = [r.get("cpu_steal_pct") or 0 for r in [*report["methods"].values(), report.get("multitask") or {}]]
    if steal and max(steal) > 5:
        notes.append(f"- The hypervisor took up to {max(steal):.0f} % of CPU time (steal) during a method; its step "
                     "times are inflated.")
    if loads and max(loads) > 1.5 * (mach.get("cores") or 1):
        notes.append(f"- The machine was shared: 1-min load average up to {max(loads):.1f} on {mach.get('cores')} "
                     "cores during the run; step times are inflated and noisy.")
    return "\n".join(lines + (["", "## Notes", "", *notes] if notes else [])) + "\n"


def default_latent_size(quick: bool) -> int:
    return 8 if quick else 32


def device_tag(settings: dict, env: dict) -> str:
    """cpu, cpu-512 (64x64 latents), cuda-nvidia-h100-80gb-hbm3-fp16-512, cpu-quick: a file per setting."""
    tag = "cpu" if settings["device"] == "cpu" else "cuda-" + re.sub(r"[^a-z0-9]+", "-", env.get("gpu", "").lower())
    tag = tag.strip("-")
    if settings["dtype"] != "fp32":
        tag += f"-{settings['dtype']}"
    if settings["latent_size"] != default_latent_size(settings["quick"]):
        tag += f"-{settings['latent_size'] * 8}"  # in pixels
    return tag + ("-quick" if settings["quick"] else "")


def merge_earlier(path: Path, opts: dict, rows: dict, specials: dict) -> list[dict]:
    """harness.merge_earlier with this bench's top-level entries (multi-task inference, joint training)."""
    return harness.merge_earlier(path, opts, rows, specials, SPECIAL)

# ---------------------------------------------------------------------------------------------------------------------
# command line


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--methods", nargs="+", default=[*METHODS, MULTITASK, JOINT], choices=[*METHODS, *SPECIAL],
                   help="what to measure (default: every method, multi-task inference, joint bypass training)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=DTYPES, help="dtype of the frozen UNet (trainables stay fp32)")
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--latent_size", type=int, default=None, help="latent side (default 32; 64 = 512 px; quick: 8)")
    p.add_argument("--steps", type=int, default=None, help="timed steps, median reported (default: cpu 3, cuda 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: cpu 1, cuda 3)")
    p.add_argument("--multitask_batch_size", type=int, default=None, help="default: 1 on cpu, --batch_size on cuda")
    p.add_argument("--quick", action="store_true", help="the tiny UNet, every method in one process: seconds (CI)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for <device>.md / .json (default bench/results)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: methods to run in this process
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--opts", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("batch_size", "latent_size", "steps", "multitask_batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be a positive integer, got {value}")
    if args.warmup is not None and args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def settings_from(args) -> dict:
    cpu = args.device == "cpu"
    return {
        "device": args.device, "dtype": args.dtype, "quick": args.quick, "model": "tiny" if args.quick else "sd15",
        "batch_size": args.batch_size, "latent_size": args.latent_size or default_latent_size(args.quick),
        "steps": args.steps or (3 if cpu or args.quick else 10),
        "warmup": args.warmup if args.warmup is not None else (1 if cpu or args.quick else 3),
        "multitask_batch_size": args.multitask_batch_size or (1 if cpu else args.batch_size),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker.split(","), json.loads(args.opts), args.result)
    if args.device == "cuda" and importlib.util.find_spec("torch") and not _cuda_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch; run with --device cpu")
    opts = settings_from(args)
    methods, rows, specials, env = list(dict.fromkeys(args.methods)), {}, {}, {}
    runnable = []
    for method in methods:
        why = available(method)
        if why:
            print(f"[bench] skipping {method}: {why}", flush=True)
            entry = {"status": "skipped", "note": why}
            specials.update({method: entry} if method in SPECIAL else {})
            rows.update({} if method in SPECIAL else {method: entry})
        else:
            runnable.append(method)
    groups = [runnable] if args.quick else [[m] for m in runnable]
    for group in filter(None, groups):
        start = time.perf_counter()
        data = run_worker(group, opts)
        env = data.get("environment", env)
        specials.update({m: data[m] for m in SPECIAL if m in data})
        rows.update(data["methods"])
        for method in group:
            print(f"[bench] {method}: {summary(rows.get(method) or specials.get(method))} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    out = args.out or ROOT / "bench" / "results"
    tag = device_tag(opts, env)
    command = shlex.join(["python", "bench/efficiency.py", *(sys.argv[1:] if argv is None else argv)])
    runs = merge_earlier(out / f"{tag}.json", opts, rows, specials)
    runs.append({"command": command, "at": time.strftime("%Y-%m-%d %H:%M:%S"), "measured": methods})
    rows = {m: rows[m] for m in [*METHODS, *methods] if m in rows}
    derive(rows)
    report = {
        "command": command, "runs": runs, "settings": opts, "machine": machine(), "environment": env,
        "unet_params": next((r["unet_params"] for r in rows.values() if "unet_params" in r), 859_520_964),
        "methods": rows, **{m: specials.get(m) for m in SPECIAL},
    }
    ok = {m: e if (e or {}).get("status") == "ok" else None for m, e in specials.items()}
    report["targets"] = targets(rows, ok.get(MULTITASK), ok.get(JOINT))
    text = markdown(report)
    harness.write_report(out, tag, report, text)
    return 0


def summary(row: dict | None) -> str:
    if not row:
        return "no result"
    if row.get("status") != "ok":
        return f"{row.get('status')}: {row.get('note')}"
    if "rows" in row:
        return ", ".join(f"K={r['k']} {r['speedup']:.2f}x" for r in row["rows"])
    return (f"{row['params'] / 1e6:.3f} M params, peak {fmt_gb(row['peak_bytes'])} GB "
            f"(weights {fmt_gb(row['weights_bytes'])}), step {fmt_s(row['step_s'])} s")


def _cuda_available() -> bool:
    # a subprocess, so the parent never initialises CUDA itself
    code = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", code]).returncode == 0


SPECIAL = {MULTITASK: measure_multitask, JOINT: measure_joint}  # rows of their own in the report

if __name__ == "__main__":
    raise SystemExit(main())
