"""The ``latency_target`` policy: the highest-scored channels whose predicted latency fits a budget.

Registered with the other policies in :mod:`scop_ext.prune.select` (``select(space, scores,
"latency_target", latency_model=..., latency_reduction=...)``); the latency model is
:class:`~scop_ext.prune.latency.LatencyModel`, the knapsack :mod:`.knapsack`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .groups import Plan
from .knapsack import choose_widths
from .space import PruningSpace, check_common, n_keep, plan_from_keep, scored

__all__ = ["latency_target"]

CALIBRATION_TOLERANCE = 0.02  # measured within 2% of the latency asked for ends the calibration


def latency_target(
    space: PruningSpace,
    scores: Mapping[str, Tensor],
    latency_model,
    *,
    latency_reduction: float | None = None,
    latency_ms: float | None = None,
    normalize: str | None = None,
    calibrate: int = 3,
    min_channels: int = 1,
    round_to: int = 1,
) -> Plan:
    """Keep the highest-scored channels whose predicted latency fits a budget (a knapsack over groups).

    Each scored group may take the widths :meth:`~scop_ext.prune.latency.LatencyModel.candidates`
    finds among those ``min_channels`` and ``round_to`` allow (the last width before each step
    of its measured time), worth the sum of its kept channels' scores; unscored groups stay
    whole. :func:`~scop_ext.prune.knapsack.choose_widths` picks one width per group.

    Args:
        latency_model: a :class:`~scop_ext.prune.latency.LatencyModel` built on ``space.groups``.
        latency_reduction: the budget as a fraction of the dense network's predicted latency, in (0, 1);
        latency_ms: or as absolute milliseconds at the model's batch (give exactly one).
        normalize: as in :func:`~scop_ext.prune.select.global_ranking` (``"max"`` for criteria whose scale differs per
            layer); scores are then shifted so the lowest is 0, so every kept channel adds value.
        calibrate: rounds of measuring the chosen network (for ``latency_reduction``: its ratio
            to the dense network, timed in turns) and solving again at a corrected budget, until
            within 2%; the plan measured closest to the target is kept (only for a latency model
            that times the network; 0: trust the prediction).
        min_channels, round_to: see :mod:`scop_ext.prune.select`.

    Raises:
        ValueError: when even the narrowest allowed widths predict more than the budget.
    """
    if (latency_reduction is None) == (latency_ms is None):
        raise ValueError("give exactly one of latency_reduction and latency_ms")
    if latency_reduction is not None and not 0.0 < latency_reduction < 1.0:
        raise ValueError(f"latency_reduction must be in (0, 1), got {latency_reduction}")
    if latency_ms is not None and not latency_ms > 0:
        raise ValueError(f"latency_ms must be > 0, got {latency_ms}")
    if list(latency_model.sizes) != [g.size for g in space.groups]:
        raise ValueError("latency_model must be built on this space's groups (LatencyModel(model, x, space.groups))")
    check_common(min_channels, round_to)
    if normalize not in ("max", None):
        raise ValueError(f"normalize must be 'max' or None, got {normalize!r}")
    group_scores = scored(space, scores)
    ranked = [None if s is None else (s / s.abs().max() if normalize and bool(s.abs().max() > 0) else s)
              for s in group_scores]
    low = min(float(s.min()) for s in ranked if s is not None)
    values = []
    for i, (g, s) in enumerate(zip(space.groups, ranked)):
        if s is None:
            values.append({g.size: 0.0})
            continue
        gains = [0.0, *torch.sort(s - low, descending=True).values.cumsum(0).tolist()]
        allowed = sorted({n_keep(g.size, w, min_channels, round_to) for w in range(1, g.size + 1)})
        values.append({w: gains[w] for w in latency_model.candidates(i, allowed)})
    budget = latency_ms if latency_ms is not None else (1 - latency_reduction) * latency_model.dense_ms
    widths = choose_widths(latency_model, values, budget)
    latency_model.save()
    if widths is None:
        floor = latency_model.predict([min(v) for v in values])
        raise ValueError(f"a latency of {budget:.3f} ms is out of reach: the narrowest allowed widths predict "
                         f"{floor:.3f} ms (lower min_channels/round_to or remove entries from ignored_layers)")

    def plan_of(widths):
        keep = {i: w for i, w in enumerate(widths) if group_scores[i] is not None}
        return plan_from_keep(space, group_scores, keep, min_channels, round_to)

    if not calibrate or not latency_model.measure_network:
        return plan_of(widths)

    def error(plan):  # measured ÷ asked
        measured, ratio = latency_model.measure_plan(plan)
        return ratio / (1 - latency_reduction) if latency_ms is None else measured / latency_ms

    return _calibrated(lambda aim: choose_widths(latency_model, values, aim), plan_of, error, budget, widths,
                       calibrate, latency_model.save)


def _calibrated(solve, plan_of, error, budget: float, widths, rounds: int, save) -> Plan:
    """Measure the plan for ``widths`` (solved at ``budget``) and solve again at a corrected budget
    until the measured latency is within :data:`CALIBRATION_TOLERANCE` of the one asked for,
    ``rounds`` times at most; the plan measured closest to it is returned.

    The next budget divides the last by its error (measured ÷ asked) until two budgets bracket
    the goal, then interpolates between the closest two on either side: measured latency grows
    with the budget, but in steps, so a plain ratio correction can swing from one side to the
    other. Widths met before are not measured again."""
    tried = {}  # widths -> (budget, error, plan)
    aim = budget
    for _ in range(rounds + 1):
        plan = plan_of(widths)
        miss = error(plan)
        tried[tuple(widths)] = (aim, miss, plan)
        if abs(miss - 1) <= CALIBRATION_TOLERANCE:
            break
        below = [(a, e) for a, e, _ in tried.values() if e < 1]
        above = [(a, e) for a, e, _ in tried.values() if e > 1]
        if below and above:
            (a0, e0), (a1, e1) = max(below, key=lambda t: t[1]), min(above, key=lambda t: t[1])
            aim = a0 + (1 - e0) * (a1 - a0) / (e1 - e0)
        else:
            aim /= miss
        widths = solve(aim)
        save()
        if widths is None or tuple(widths) in tried:
            break  # as close as the groups allow, or nothing new to measure
    return min(tried.values(), key=lambda t: abs(t[1] - 1))[2]
