"""Wall-clock timing: of a callable (warm-up, then timed blocks), of a whole network's forward, and
the settings a time belongs to.

Networks and latency tables are timed with glibc's malloc keeping freed memory
(:func:`malloc_for_timing`): by default it hands a freed block of a few MiB back to the system
and the next allocation faults every page in again, zeroed. At batch 64 an activation is such a
block; a 16 -> 16 channel 3x3 conv at 32x32 then took 4.4 ms alone against 2.7 ms with the
memory kept, while inside a network, where other tensors hold the heap, the faults came and went
with the widths (benchmarks/README.md, "Latency target"). A long-running inference process (or
one under jemalloc/tcmalloc) runs in the kept regime.
"""

from __future__ import annotations

import copy
import ctypes
import os
import platform
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..nn.scop_conv import restore

__all__ = ["time_ms", "fastest_ms", "measure_latency", "measure_latencies", "settings", "malloc_for_timing", "MEMORY_FORMATS",
           "DTYPES", "load_average"]

MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

try:
    LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: its malloc is left alone
    LIBC = None


def malloc_for_timing() -> None:
    """Let glibc keep freed blocks up to 32 MiB for reuse (its dynamic mmap threshold's ceiling,
    fixed so it does not depend on what ran before) and not hand the heap's free top back to the
    system: timings then exclude the page faults of re-mapping every activation, which otherwise
    vary run to run by 2x (with a 64 MiB trim threshold a 2N = 256, 16@32 step, whose tensors
    are 16 MiB each, still flipped between 40 and 80 ms). Process-wide and lasting."""
    if LIBC is not None:
        LIBC.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD
        LIBC.mallopt(-1, 2**30)  # M_TRIM_THRESHOLD


def time_ms(fn: Callable[[], object], device: torch.device | str, min_time: float, warmup: int = 2,
            fastest: bool = False) -> float:
    """Median milliseconds of ``fn`` over 5 blocks that together last about ``min_time`` seconds.

    ``warmup`` calls come first: they create the kernels' primitives (and compile, for a
    ``torch.compile``d ``fn``). On CUDA every block ends with a synchronize. ``fastest``: the
    fastest block instead of the median (see :func:`fastest_ms`).
    """
    if fastest:
        return fastest_ms([fn], device, min_time, warmup=warmup)[0]
    return float(np.median(_blocks([fn], device, min_time, 5, warmup)[0])) * 1e3


def fastest_ms(fns: Sequence[Callable[[], object]], device: torch.device | str, min_time: float, blocks: int = 5,
               warmup: int = 2) -> list[float]:
    """Milliseconds of each of ``fns``: its fastest of ``blocks`` blocks (each about ``min_time``
    / ``blocks`` seconds), the blocks of all ``fns`` taken in turns (A B A B ...).

    Other processes only ever add time, so on a shared machine the fastest block is the least
    disturbed one; and a busy spell (this machine has run 50% slower for seconds at a time) then
    falls on blocks of every candidate alike, instead of on whichever was being timed.
    """
    return [min(b) * 1e3 for b in _blocks(fns, device, min_time, blocks, warmup)]


def _blocks(fns, device, min_time: float, blocks: int, warmup: int) -> list[list[float]]:
    """Seconds per call of each fn in each block (warm-up calls first, then one call that sizes
    the blocks); the blocks of the fns interleaved."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    repeats = []
    for fn in fns:
        for _ in range(warmup):
            fn()
        sync()
        t = time.perf_counter()
        fn()
        sync()
        repeats.append(max(1, int(min_time / blocks / max(time.perf_counter() - t, 1e-7))))
    times = [[] for _ in fns]
    for _ in range(blocks):
        for fn, n, out in zip(fns, repeats, times):
            t = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            out.append((time.perf_counter() - t) / n)
    return times


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def settings(device: str | torch.device, dtype: str, memory_format: str, batch: int) -> dict:
    """The settings a latency table belongs to (its cache key)."""
    device = torch.device(device)
    return {"device": _device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "dtype": dtype, "memory_format": memory_format, "batch": batch,
            "malloc": "glibc, freed memory kept" if LIBC is not None else "system"}


def _runnable(model: nn.Module, fmt: torch.memory_format, dtype: torch.dtype, fold_bn: bool, device) -> nn.Module:
    model = restore(copy.deepcopy(model)).eval()  # plain convs: SCOP mode would need a paired batch
    if fold_bn:
        from torch.fx.experimental.optimization import fuse

        model = fuse(model)
    return model.to(device=device, dtype=dtype, memory_format=fmt)


@torch.no_grad()
def measure_latency(model: nn.Module, example: Tensor, batch: int, device: str | torch.device, *,
                    dtype: str = "float32", memory_format: str = "contiguous", fold_bn: bool = False,
                    min_run_time: float = 0.5) -> float:
    """Forward latency in ms of ``model`` on ``batch`` inputs shaped like ``example`` (1, C, H, W).

    The model is run as a plain-conv copy in eval mode, in ``dtype`` and ``memory_format``
    (weights and input), with every BatchNorm folded into its conv first when ``fold_bn``, and
    malloc set by :func:`malloc_for_timing`; the fastest of 5 blocks counts.
    """
    return measure_latencies([model], example, batch, device, dtype=dtype, memory_format=memory_format,
                             fold_bn=fold_bn, min_run_time=min_run_time)[0]


@torch.no_grad()
def measure_latencies(models: Sequence[nn.Module], example: Tensor, batch: int, device: str | torch.device, *,
                      dtype: str = "float32", memory_format: str = "contiguous", fold_bn: bool = False,
                      min_run_time: float = 0.5, blocks: int = 5, tune_malloc: bool = True) -> list[float]:
    """:func:`measure_latency` of several networks, their blocks timed in turns
    (:func:`fastest_ms`), so their ratios hold when the machine's load changes: what latency
    targets are measured against. ``tune_malloc=False`` leaves the process's malloc as it is
    (:func:`malloc_for_timing` changes it for the whole process, for good)."""
    if tune_malloc:
        malloc_for_timing()
    device = torch.device(device)
    fmt = MEMORY_FORMATS[memory_format]
    runs = [_runnable(m, fmt, DTYPES[dtype], fold_bn, device) for m in models]
    x = example[:1].expand(batch, *example.shape[1:]).to(device=device, dtype=DTYPES[dtype])
    x = x.contiguous(memory_format=fmt)
    return fastest_ms([lambda run=run: run(x) for run in runs], device, min_run_time, blocks)


def load_average() -> float | None:
    """The machine's 1-minute load average (None where the OS has none): timings are only
    comparable at a similar load, so it is reported beside them."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None
