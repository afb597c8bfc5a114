"""Wall-clock timing of a callable: warm-up, then the median of timed blocks."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

__all__ = ["time_ms"]


def time_ms(fn: Callable[[], object], device: torch.device | str, min_time: float, warmup: int = 2) -> float:
    """Median milliseconds of ``fn`` over 5 blocks that together last about ``min_time`` seconds.

    ``warmup`` calls come first: they create the kernels' primitives (and compile, for a
    ``torch.compile``d ``fn``). On CUDA every block ends with a synchronize.
    """
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    t = time.perf_counter()
    fn()
    sync()
    once = max(time.perf_counter() - t, 1e-7)
    repeats = max(1, int(min_time / 5 / once))
    blocks = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        blocks.append((time.perf_counter() - t) / repeats)
    return float(np.median(blocks)) * 1e3
