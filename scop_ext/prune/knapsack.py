"""Spending a latency budget: one width per channel group, as much importance kept as fits.

A multiple-choice knapsack over the groups (the idea of HALP, Shen et al., NeurIPS 2022,
"Structural Pruning via Latency-Saliency Knapsack"; our own formulation): each group offers
the candidate widths of :meth:`~scop_ext.prune.latency.LatencyModel.candidates`, each with a value
(the importance it keeps) and a cost (predicted ms).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from .latency import LatencyModel

__all__ = ["knapsack", "choose_widths"]


def knapsack(values: Sequence[Sequence[float]], costs: Sequence[Sequence[float]], budget: float,
             bins: int = 2000) -> list[int] | None:
    """Multiple-choice knapsack: one option per group, total cost <= ``budget``, total value maximal.

    Costs are rounded *up* to multiples of ``budget / bins`` (so the answer is always within
    budget, and at most one unit per group short of the optimum); by dynamic programming over
    the discretised budget, O(groups x options x bins).

    Args:
        values, costs: per group, one entry per option (costs >= 0).
        budget: the total cost allowed (> 0).

    Returns:
        The chosen option of every group, or None when even the cheapest options exceed the budget.
    """
    if not budget > 0:
        return None
    unit = budget / bins
    dp = np.zeros(bins + 1)  # dp[b]: best value with total rounded cost <= b
    picks = []
    for vals, cs in zip(values, costs):
        new = np.full(bins + 1, -np.inf)
        pick = np.full(bins + 1, -1)
        for j, (v, c) in enumerate(zip(vals, cs)):
            w = math.ceil(c / unit - 1e-9)
            if w > bins:
                continue
            shifted = np.full(bins + 1, -np.inf)
            shifted[w:] = dp[: bins + 1 - w] + v
            better = shifted > new
            new[better], pick[better] = shifted[better], j
        dp = new
        picks.append(pick)
    if not np.isfinite(dp[bins]):
        return None
    choice, b = [], bins
    for g in reversed(range(len(picks))):
        j = int(picks[g][b])
        choice.append(j)
        b -= math.ceil(costs[g][j] / unit - 1e-9)
    return choice[::-1]


def choose_widths(lat: LatencyModel, values: Sequence[Mapping[int, float]], budget: float,
                  iterations: int = 6) -> list[int] | None:
    """One width per group from ``values[i]`` (``{candidate width: value}``), predicted latency
    <= ``budget`` ms, total value as high as the knapsack finds.

    A conv's time depends on two groups (its input and output widths), so the latency is not a
    sum over groups. It is linearised around the current widths (each group's cost is the time
    of the convs it touches, the other groups held), the knapsack solved, and the linearisation
    moved to the answer, a few times; the best answer within the exact prediction's budget is
    then filled greedily (best value per ms first) while it stays within budget.

    Returns:
        The widths, or None when the narrowest candidates already predict more than ``budget``.
    """
    options = [sorted(v) for v in values]
    floor = [o[0] for o in options]
    if lat.predict(floor) > budget:
        return None
    total = lambda w: sum(values[i][x] for i, x in enumerate(w))  # noqa: E731
    best, widths = floor, [o[-1] for o in options]
    for _ in range(iterations):
        costs = [[lat.group_ms(i, x, widths) for x in o] for i, o in enumerate(options)]
        held = lat.predict(widths) - sum(costs[i][o.index(widths[i])] for i, o in enumerate(options))
        choice = knapsack([[values[i][x] for x in o] for i, o in enumerate(options)], costs, budget - held)
        if choice is None:
            break
        new = [o[j] for o, j in zip(options, choice)]
        if lat.predict(new) <= budget and total(new) > total(best):
            best = new
        if new == widths:
            break
        widths = new
    return _fill(lat, values, options, best, budget)


def _fill(lat: LatencyModel, values, options, widths: list[int], budget: float) -> list[int]:
    widths = list(widths)
    now = lat.predict(widths)
    while True:
        moves = []
        for i, o in enumerate(options):
            k = o.index(widths[i])
            if k + 1 < len(o):
                trial = widths[:i] + [o[k + 1]] + widths[i + 1:]
                after = lat.predict(trial)
                if after <= budget:
                    gain = values[i][o[k + 1]] - values[i][widths[i]]
                    moves.append((gain / max(after - now, 1e-9), i, o[k + 1], after))
        if not moves:
            return widths
        _, i, x, now = max(moves)
        widths[i] = x
