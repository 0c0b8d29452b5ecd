"""Memory of this process, measured one way for training summaries, the table and the benchmarks: the CUDA allocator
on a GPU, the resident set on CPU (Linux /proc; getrusage elsewhere)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import sys

import torch


def proc_status(field: str) -> int | None:
    """A byte figure of /proc/self/status (VmRSS: resident now, VmHWM: its high-water mark), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    """(peak, how it was measured). CUDA: max_memory_allocated; CPU: the process's peak resident set (getrusage,
    which on Linux follows the high-water mark that reset_peak_memory resets)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "CUDA max_memory_allocated"
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024), "peak RSS of the process"


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak from what is in use now (work measured one after another in one process: the table's rows,
    a benchmark's methods). CUDA's peak counter; on CPU (Linux) freed heap is handed back and the resident-set
    high-water mark reset (proc(5) clear_refs "5"). False where it cannot be reset: the peak then includes earlier
    work."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return True
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
