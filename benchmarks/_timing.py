"""The timing and memory tools the speed benchmarks share.

Memory. CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before the call.
CPU: the peak resident set size above the resident size before the call (``VmHWM`` after
resetting it through ``/proc/self/clear_refs``, with glibc told to map every block above 64 KiB
on its own so freed tensors leave the resident set) and, for eager code, the bytes autograd
saves for the backward (unique storages, via saved-tensor hooks:
``scop_ext.resources.saved_for_backward``). Times are medians of 5 timed blocks after 3 warm-up
calls (``scop_ext.timing.time_ms``, what the latency policy times with too), with glibc keeping
freed blocks up to 32 MiB for reuse (see ``malloc_for_timing``).
"""

from __future__ import annotations

import math
import os
import re

import torch

from scop_ext.train.resources import saved_for_backward
from scop_ext.train.timing import LIBC as _LIBC, malloc_for_timing, time_ms  # noqa: F401 (malloc_for_timing: speed.py's)


def malloc_for_memory() -> None:
    """Map every block above 64 KiB on its own and return free memory to the system, so the
    resident set follows live tensors while a peak is measured."""
    if _LIBC is not None:
        _LIBC.mallopt(-3, 64 * 2**10)
        _LIBC.mallopt(-1, 128 * 2**10)
        _LIBC.malloc_trim(0)


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+)", f.read()).group(1))


class PeakMemory:
    """Peak memory above the level at entry, in bytes: CUDA allocator or CPU resident set."""

    def __init__(self, device: str):
        self.device = device
        self.cpu_ok = os.path.exists("/proc/self/clear_refs")

    def __call__(self, fn) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            return float(torch.cuda.max_memory_allocated() - before)
        if not self.cpu_ok or _LIBC is None:
            return math.nan
        malloc_for_memory()
        try:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM to the current resident size
            except OSError:
                self.cpu_ok = False
                return math.nan
            before = _proc_kib("VmRSS")
            fn()
            return float(_proc_kib("VmHWM") - before) * 1024
        finally:
            malloc_for_timing()


def saved_bytes(fn) -> float:
    """Bytes of the unique storages autograd saves for the backward while ``fn`` runs."""
    with saved_for_backward() as saved:
        fn()
    return float(sum(n for n, _ in saved))


def timed(fn, min_run_time: float, device: str) -> float:
    """Median milliseconds of ``fn`` (after 3 warm-up calls, which also compile)."""
    return time_ms(fn, device, min_run_time, warmup=3)


def mib(b: float) -> str:
    return "–" if b is None or math.isnan(b) else f"{b / 2**20:.1f}"


def ratio(a: float, b: float) -> str:
    return "–" if (a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0) else f"{a / b:.2f}"
