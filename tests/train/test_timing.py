"""scop_ext.timing: what time_ms runs (the figures themselves are measured in benchmarks/)."""

from __future__ import annotations

import pytest

from scop_ext.train.timing import fastest_ms, time_ms


@pytest.mark.parametrize("warmup", [0, 2, 3])
def test_time_ms_warms_up_then_times_five_blocks(warmup):
    calls = []
    ms = time_ms(lambda: calls.append(1), "cpu", 0.0, warmup=warmup)  # no time asked: one call per block
    assert len(calls) == warmup + 1 + 5  # warm-up, the probe that sizes the blocks, 5 blocks
    assert ms >= 0.0



def test_fastest_ms_times_the_candidates_in_turns():
    calls = []
    fns = [lambda: calls.append("a"), lambda: calls.append("b")]
    ms = fastest_ms(fns, "cpu", 0.0, blocks=4, warmup=1)  # one call per block
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 4  # warm-up + probe each, then blocks A B A B ...
    assert len(ms) == 2 and min(ms) >= 0.0


def test_fastest_ms_keeps_the_least_disturbed_block():
    import time

    slow = iter([0.0, 0.0, 0.03, 0.03, 0.0, 0.03])  # probe, then blocks: a busy spell on all but one

    def fn():
        time.sleep(next(slow, 0.0))

    ms = fastest_ms([fn], "cpu", 0.0, blocks=4, warmup=1)[0]
    assert ms < 15  # the undisturbed block counts (a median would read ~30 ms)
