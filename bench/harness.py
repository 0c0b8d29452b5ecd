"""What bench/ and tools/ share: dtypes and autocast as training sets them up, timing, this process's memory (the CUDA
allocator on a GPU, the resident set on CPU), the machine and library versions, and one worker process per method or
config so that memory peaks don't mix. Imported as `bench.harness` (the scripts put the repository root on sys.path);
no torch at module level, so a parent process that only runs workers never loads it.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9
DTYPES = ("fp32", "fp16", "bf16")


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def autocast(device, dtype):
    """Mixed precision as accelerate sets it up for training: autocast in the weight dtype, nothing for fp32."""
    import torch

    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def timed(fn, device) -> tuple[float, object]:
    """(seconds, fn()) with the device synchronised before and after."""
    import torch

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


# ---------------------------------------------------------------------------------------------------------------------
# memory of this process: the CUDA allocator on a GPU, the resident set on CPU
def memory_in_use(device) -> int:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    from restune_diffusion.memory import proc_status

    rss = proc_status("VmRSS")
    return rss if rss is not None else peak_memory(device)


def reset_peak(device) -> bool:
    from restune_diffusion.memory import reset_peak_memory

    return reset_peak_memory(device)


def peak_memory(device) -> int:
    """CUDA: max_memory_allocated; Linux: VmHWM (reset by reset_peak); elsewhere: memory.peak_memory_bytes."""
    import torch

    from restune_diffusion.memory import peak_memory_bytes, proc_status

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    hwm = proc_status("VmHWM") if device.type == "cpu" else None
    return hwm if hwm is not None else peak_memory_bytes(device)[0]


# ---------------------------------------------------------------------------------------------------------------------
# where it ran
def environment(device_name: str) -> dict:
    import diffusers
    import torch

    env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "torch_threads": torch.get_num_threads()}
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        env["peft"] = importlib.metadata.version("peft")
    if device_name == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count(),
            "cpu": platform.processor() or platform.machine()}
    with contextlib.suppress(OSError):
        names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        info["cpu"] = names[0] if names else info["cpu"]
    with contextlib.suppress(OSError, AttributeError):
        info["ram_gb"] = int(re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text()).group(1)) * 1024 / GB
    return info


def cpu_jiffies() -> list[int] | None:
    """The machine's CPU time counters from /proc/stat (user nice system idle iowait irq softirq steal ...)."""
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def steal_pct(before, after) -> float | None:
    """% of CPU time the hypervisor gave to other guests between two readings."""
    if not before or not after or len(before) < 8:
        return None
    delta = [a - b for a, b in zip(after, before)]
    return 100 * delta[7] / max(1, sum(delta[:8]))


# ---------------------------------------------------------------------------------------------------------------------
# one worker process per method or config
def run_worker(script: str | os.PathLike, names: list[str], opts: dict) -> tuple[dict | None, str]:
    """Run `script --worker NAMES --result FILE --opts JSON` in a fresh process. Returns (the JSON it wrote, or None;
    one line saying how the worker ended, for the rows it left without a result)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(script).resolve()), "--worker", ",".join(names), "--result", str(result),
               "--opts", json.dumps(opts)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        data = json.loads(result.read_text()) if result.is_file() else None
    why = (f"worker exited with {proc.returncode}" + (" (killed: out of memory?)" if proc.returncode < 0 else "")
           + ": " + " | ".join(proc.stderr.strip().splitlines()[-3:]))
    return data, why


# ---------------------------------------------------------------------------------------------------------------------
# reports: ratios and numbers as the tables print them, results files that grow run by run
def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def fmt(value, digits: int = 2, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def fmt_gb(value) -> str:
    return "–" if value is None else f"{value / GB:.{2 if value >= GB else 3}f}"


def fmt_s(value) -> str:
    return "–" if value is None else f"{value:.{2 if value >= 1 else 4}f}"


def merge_earlier(path: Path, opts: dict, rows: dict, specials: dict | None = None,
                  special_names: Collection[str] = (), ignore: Collection[str] = ()) -> list[dict]:
    """Add the rows of an earlier run written to `path` with the same settings that this run did not measure, so a
    slow table can be run a few rows at a time (a run of one row adds it instead of replacing the table). Rows sit
    under the report's "methods"; `special_names` are entries kept at the report's top level (into `specials`).
    Returns the earlier runs ({command, at, measured}) that still supply a row; none if the file is absent or its
    settings differ (other than in `ignore`)."""
    specials = {} if specials is None else specials
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    def compared(settings):  # `ignore`: settings that add columns to a row without changing the others
        return {k: v for k, v in (settings or {}).items() if k not in ignore}

    if compared(earlier.get("settings")) != compared(opts):
        print(f"[bench] {path} was written with other settings: replacing it", flush=True)
        return []
    now = set(rows) | set(specials)
    found = {**earlier.get("methods", {}), **{m: earlier[m] for m in special_names if earlier.get(m)}}
    kept = [m for m in found if m not in now]
    for name in kept:
        (specials if name in special_names else rows)[name] = found[name]
    runs = earlier.get("runs") or [{"command": earlier.get("command"), "at": None, "measured": list(found)}]
    if kept:
        print(f"[bench] kept from earlier runs in {path} (same settings): {', '.join(kept)}", flush=True)
    return [r for r in runs if set(r["measured"]) - now]  # a run all of whose rows were measured again is gone


def write_report(out: Path, tag: str, report: dict, text: str, prefix: str = "bench") -> None:
    """out/<tag>.json (the report) and out/<tag>.md (its table, also printed), each written atomically."""
    from restune_diffusion.files import atomic_write_text  # here: importing the package loads torch

    atomic_write_text(out / f"{tag}.json", json.dumps(report, indent=1))
    atomic_write_text(out / f"{tag}.md", text)
    print(text)
    print(f"[{prefix}] wrote {out / tag}.md and .json")
