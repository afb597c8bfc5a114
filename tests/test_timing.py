"""scop_ext.timing: what time_ms runs (the figures themselves are measured in benchmarks/)."""

from __future__ import annotations

import pytest

from scop_ext.timing import time_ms


@pytest.mark.parametrize("warmup", [0, 2, 3])
def test_time_ms_warms_up_then_times_five_blocks(warmup):
    calls = []
    ms = time_ms(lambda: calls.append(1), "cpu", 0.0, warmup=warmup)  # no time asked: one call per block
    assert len(calls) == warmup + 1 + 5  # warm-up, the probe that sizes the blocks, 5 blocks
    assert ms >= 0.0

