"""Selection policies: from per-channel scores to a pruning plan (DESIGN.md §1, stage 3).

A policy takes a :class:`~scop_ext.prune.space.PruningSpace` (what can be pruned, and the FLOPs
of the result) and the scores of an importance criterion and returns a plan, ``{conv name:
[channel indices to remove]}`` (:data:`~scop_ext.prune.groups.Plan`), which
:func:`~scop_ext.prune.surgery.apply_plan` executes.

**Coupled groups.** Channels that must go together (residual adds, depthwise convs,
concatenations) are decided together: a group's score for channel ``k`` is the **mean** of the
scores its member convs give channel ``k``; members without a score (e.g. convs SCOP did not
wrap) are left out of the mean, and a group none of whose members has a score is not pruned.
The mean keeps SCOP's statistic on its scale (in [-1, 1], symmetric about 0 for null channels)
so the FDR threshold applies to groups unchanged.

**Common constraints** (keyword arguments of every policy):

- ``min_channels``: a group never keeps fewer channels (default 1; its top-scored ones).
- ``round_to``: the kept count of every pruned group is rounded *up* to a multiple of
  ``round_to`` (capped at the group's size), so pruned layers keep hardware-friendly widths;
  rounding keeps the next best channels, never removes more than the policy chose.

Ties between equal scores go to the lower channel index (it is kept).

**Grouped convs.** A group meeting a grouped conv's slices loses channels a whole unit at a
time (:attr:`~scop_ext.prune.groups.ChannelGroup.units`): each unit scores the mean of its
channels, and a policy's kept count is rounded up to whole units.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor

from .groups import Plan
from .latency_policy import latency_target
from .space import PruningSpace, check_common, lowest, plan_from_keep, scored

__all__ = [
    "PruningSpace",
    "knockoff_threshold",
    "uniform",
    "global_ranking",
    "flops_target",
    "latency_target",
    "fdr",
    "select",
    "make_policy",
    "policy_names",
    "cuts",
]


# --------------------------------------------------------------------------- shared pieces


def _check_ratio(ratio: float) -> None:
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")


# --------------------------------------------------------------------------- policies


def _uniform_keep(space: PruningSpace, group_scores: list[Tensor | None], ratio: float) -> dict[int, int]:
    return {
        i: g.size - math.floor(ratio * g.size + 1e-9)
        for i, (g, s) in enumerate(zip(space.groups, group_scores))
        if s is not None
    }


def uniform(
    space: PruningSpace, scores: Mapping[str, Tensor], ratio: float, *, min_channels: int = 1, round_to: int = 1
) -> Plan:
    """Remove the same fraction of channels from every group (the authors' choice).

    Each scored group of ``C`` channels loses its ``floor(ratio * C)`` lowest-scored channels
    (then ``min_channels`` and ``round_to`` apply).
    """
    _check_ratio(ratio)
    check_common(min_channels, round_to)
    group_scores = scored(space, scores)
    return plan_from_keep(space, group_scores, _uniform_keep(space, group_scores, ratio), min_channels, round_to)


def _global_order(
    space: PruningSpace, group_scores: list[Tensor | None], normalize: str | None, min_channels: int
) -> list[int]:
    """The group of each removable channel, lowest normalised score first (floors excluded)."""
    if normalize not in ("max", None):
        raise ValueError(f"normalize must be 'max' or None, got {normalize!r}")
    candidates = []
    for i, (g, s) in enumerate(zip(space.groups, group_scores)):
        if s is None:
            continue
        ns = (s if normalize is None or not bool(s.abs().max() > 0) else s / s.abs().max()).tolist()
        for k in lowest(s, g.size - min(min_channels, g.size)):
            candidates.append((ns[k], i, -k))
    return [i for _, i, _ in sorted(candidates)]


def _global_keep(
    space: PruningSpace, group_scores: list[Tensor | None], order: list[int], ratio: float
) -> dict[int, int]:
    keep = {i: g.size for i, (g, s) in enumerate(zip(space.groups, group_scores)) if s is not None}
    total = sum(keep.values())
    for i in order[: math.floor(ratio * total + 1e-9)]:
        keep[i] -= 1
    return keep


def global_ranking(
    space: PruningSpace,
    scores: Mapping[str, Tensor],
    ratio: float,
    *,
    normalize: str | None = "max",
    min_channels: int = 1,
    round_to: int = 1,
) -> Plan:
    """Remove the ``floor(ratio * total)`` lowest-ranked channels across all scored groups.

    Args:
        ratio: fraction of all channels of the scored groups to remove.
        normalize: ``"max"`` divides each group's scores by their largest absolute value, so every
            group's best channel scores 1 (or -1) and criteria whose scale differs from layer to
            layer (weight norms, |gamma|) become comparable; ``None`` ranks raw scores, the right
            choice for SCOP's ``2 beta - 1``, already on one scale in [-1, 1].
        min_channels, round_to: see the module docstring; a group at its floor loses no more
            channels and the next lowest channel elsewhere goes instead.
    """
    _check_ratio(ratio)
    check_common(min_channels, round_to)
    group_scores = scored(space, scores)
    order = _global_order(space, group_scores, normalize, min_channels)
    return plan_from_keep(space, group_scores, _global_keep(space, group_scores, order, ratio), min_channels, round_to)


def flops_target(
    space: PruningSpace,
    scores: Mapping[str, Tensor],
    reduction: float,
    *,
    search: str = "uniform",
    normalize: str | None = "max",
    tolerance: float = 0.01,
    min_channels: int = 1,
    round_to: int = 1,
) -> Plan:
    """Prune with :func:`uniform` or :func:`global_ranking` to a target FLOPs reduction.

    The pruned network's FLOPs are predicted exactly by :meth:`PruningSpace.flops` (nothing is
    pruned during the search). The reduction grows with the ratio, so the ratio is bisected;
    it is a step function, and where one step jumps over the target the last channels are
    taken one group at a time, skipping any that would overshoot:

    - ``"uniform"``: at the ratio where the reduction jumps past the target, groups take the
      next step (one channel each) largest FLOPs saving first, so the groups' ratios differ
      by at most one step;
    - ``"global_ranking"``: channels keep being removed in ranking order, except from a group
      whose next channel would overshoot.

    The result is within ``tolerance`` (absolute, as a fraction of the original FLOPs:
    0.01 = 1 percentage point) of ``reduction``.

    Args:
        reduction: target fraction of FLOPs removed, in (0, 1).
        search: ``"uniform"`` or ``"global_ranking"``.
        normalize: for ``"global_ranking"``, see :func:`global_ranking`.
        tolerance: allowed absolute error of the reduction.
        min_channels, round_to: see the module docstring.

    Raises:
        ValueError: when no plan gets within ``tolerance`` (the target is beyond what the
            prunable groups allow, or ``round_to`` makes the steps too coarse); the message gives
            the closest reduction found.
    """
    _check_flops_target(reduction, tolerance, search, min_channels, round_to)
    group_scores = scored(space, scores)
    order = _global_order(space, group_scores, normalize, min_channels) if search == "global_ranking" else []

    def keep_at(ratio: float) -> dict[int, int]:
        if search == "uniform":
            return _uniform_keep(space, group_scores, ratio)
        return _global_keep(space, group_scores, order, ratio)

    def evaluate(keep: dict[int, int]) -> tuple[Plan, float]:
        plan = plan_from_keep(space, group_scores, keep, min_channels, round_to)
        return plan, space.reduction(plan)

    lo, hi = 0.0, 1.0
    plan, most = evaluate(keep_at(hi))
    if most < reduction - tolerance:
        raise ValueError(
            f"a FLOPs reduction of {reduction:.4f} is out of reach: pruning every group to its floor removes "
            f"{most:.4f} (lower min_channels or remove entries from ignored_layers)"
        )
    if abs(most - reduction) <= tolerance:
        return plan
    while hi - lo > 1e-9:  # bisection: reduction(lo) < target - tolerance < target + tolerance < reduction(hi)
        mid = (lo + hi) / 2
        plan, achieved = evaluate(keep_at(mid))
        if abs(achieved - reduction) <= tolerance:
            return plan
        lo, hi = (mid, hi) if achieved < reduction else (lo, mid)
    # One step of the ratio jumps over the target: finish group by group from the lower side.
    keep = keep_at(lo)
    moves = _finishing_moves(space, search, keep, keep_at(hi), order, evaluate)
    plan, closest = _take_moves(keep, moves, evaluate, reduction, tolerance, evaluate(keep)[1])
    if plan is not None:
        return plan
    raise ValueError(
        f"no {search} plan reaches a FLOPs reduction of {reduction:.4f} within {tolerance}: the closest from "
        f"below is {closest:.4f} (loosen min_channels/round_to/ignored_layers, or the tolerance)"
    )


def _check_flops_target(reduction: float, tolerance: float, search: str, min_channels: int, round_to: int) -> None:
    if not 0.0 < reduction < 1.0:
        raise ValueError(f"reduction must be in (0, 1), got {reduction}")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance}")
    if search not in ("uniform", "global_ranking"):
        raise ValueError(f"search must be 'uniform' or 'global_ranking', got {search!r}")
    check_common(min_channels, round_to)


def _finishing_moves(space: PruningSpace, search: str, keep: dict[int, int], upper: dict[int, int], order: list[int],
                     evaluate: Callable[[dict[int, int]], tuple[Plan, float]]) -> list[tuple[int, int]]:
    """One-group moves (group, kept count) from ``keep`` towards ``upper``: for ``"uniform"`` each
    group's next step, largest FLOPs saving first; for ``"global_ranking"`` the next channels in
    ranking ``order``."""
    if search == "uniform":
        below = evaluate(keep)[1]
        steps = [i for i in keep if upper[i] < keep[i]]
        saving = {i: evaluate({**keep, i: upper[i]})[1] - below for i in steps}
        return [(i, upper[i]) for i in sorted(steps, key=lambda i: -saving[i])]
    removed = sum(space.groups[i].size - keep[i] for i in keep)
    moves, taken = [], dict(keep)
    for i in order[removed:]:
        taken[i] -= 1
        moves.append((i, taken[i]))
    return moves


def _take_moves(keep: dict[int, int], moves: list[tuple[int, int]], evaluate: Callable[[dict[int, int]], tuple[Plan, float]],
                reduction: float, tolerance: float, below: float) -> tuple[Plan | None, float]:
    """Apply ``moves`` (group, kept count) to ``keep`` in order, skipping a group once a move of
    it would overshoot ``reduction + tolerance``; ``(plan, reduction)`` at the first move that
    lands within ``tolerance``, else ``(None, the closest reduction from below)``."""
    closest, blocked = below, set()
    for i, count in moves:
        if i in blocked:
            continue
        plan, achieved = evaluate({**keep, i: count})
        if achieved > reduction + tolerance:
            blocked.add(i)  # a group's later channels would overshoot as well
            continue
        keep[i] = count
        closest = achieved
        if abs(achieved - reduction) <= tolerance:
            return plan, achieved
    return None, closest


def knockoff_threshold(W: Tensor, q: float, *, offset: int = 1) -> float:
    """The knockoff+ threshold of model-X knockoffs (Candès et al. 2018) at FDR level ``q``.

    ``T = min{t in {|W_j|} \\ {0} : (offset + #{j : W_j <= -t}) / max(1, #{j : W_j >= t}) <= q}``,
    ``+inf`` when no ``t`` qualifies (nothing is selected). ``offset=1`` is knockoff+ (controls
    the FDR), ``offset=0`` the original knockoff filter (controls a modified FDR).

    Args:
        W: (p,) statistics, large positive = real feature beats its knockoff.
        q: target FDR in (0, 1].
    """
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q must be in (0, 1], got {q}")
    if offset not in (0, 1):
        raise ValueError(f"offset must be 0 or 1, got {offset}")
    w = torch.as_tensor(W).detach().to("cpu", torch.float64).flatten()
    if not bool(torch.isfinite(w).all()):
        raise ValueError("W contains NaN or Inf")
    ts = torch.unique(w.abs()[w != 0])  # sorted ascending
    if ts.numel() == 0:
        return math.inf
    sorted_w = torch.sort(w).values
    negatives = torch.searchsorted(sorted_w, -ts, right=True)  # #{W <= -t}
    positives = w.numel() - torch.searchsorted(sorted_w, ts, right=False)  # #{W >= t}
    fdp = (offset + negatives).double() / positives.clamp(min=1).double()
    ok = torch.nonzero(fdp <= q)
    return float(ts[ok[0, 0]]) if ok.numel() else math.inf


def fdr(
    space: PruningSpace,
    scores: Mapping[str, Tensor],
    q: float,
    *,
    scope: str = "layer",
    min_channels: int = 1,
    round_to: int = 1,
) -> Plan:
    """Keep the channels the knockoff+ filter selects at FDR level ``q``; remove the rest.

    The statistic is each channel's (group-mean) score ``W_j``, SCOP's ``I_j = 2 beta_j - 1``,
    symmetric about 0 for a channel whose real feature is no better than its knockoff. Channels
    with ``W_j >= T`` (:func:`knockoff_threshold`) are kept; a group left with fewer than
    ``min_channels`` keeps its top-scored ``min_channels`` (so a group where nothing is selected,
    ``T = inf``, keeps exactly that many).

    Args:
        q: target false discovery rate in (0, 1].
        scope: ``"layer"`` computes one threshold per group; ``"global"`` one over all channels.
        min_channels, round_to: see the module docstring.
    """
    check_common(min_channels, round_to)
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    group_scores = scored(space, scores)
    if scope == "global":
        t = knockoff_threshold(torch.cat([s for s in group_scores if s is not None]), q)
    keep = {}
    for i, s in enumerate(group_scores):
        if s is None:
            continue
        threshold = knockoff_threshold(s, q) if scope == "layer" else t
        keep[i] = int((s >= threshold).sum())
    return plan_from_keep(space, group_scores, keep, min_channels, round_to)


def cuts(space: PruningSpace, scores: Mapping[str, Tensor], plan: Mapping[str, Iterable[int]]) -> list[tuple[float, float]]:
    """Where ``plan`` cut each group it prunes: ``(highest removed, lowest kept)`` (group-mean)
    score, one pair per pruned group, in group order.

    When every group's highest removed score lies below every group's lowest kept one, a single
    threshold between them reproduces the plan (global ranking of raw scores, FDR over all
    channels); otherwise each group was cut at its own place (uniform ratio, per-group FDR,
    normalised ranking, channel floors).
    """
    result = []
    for g, s in zip(space.groups, space.group_scores(scores)):
        conv = next((c for c in g.convs if plan.get(c)), None)
        if s is None or conv is None:
            continue
        inverse = {c: k for k, c in g.index[conv].items()}
        removed = {inverse[c] for c in plan[conv]}
        kept = [float(s[k]) for k in range(g.size) if k not in removed]  # never empty: min_channels >= 1
        result.append((max(float(s[k]) for k in removed), min(kept)))
    return result


_POLICIES: dict[str, Callable[..., Plan]] = {
    "uniform": uniform,
    "global_ranking": global_ranking,
    "flops_target": flops_target,
    "latency_target": latency_target,
    "fdr": fdr,
}


def policy_names() -> list[str]:
    """The names :func:`make_policy` and :func:`select` accept, sorted."""
    return sorted(_POLICIES)


def make_policy(name: str, **params) -> Callable[[PruningSpace, Mapping[str, Tensor]], Plan]:
    """The policy called ``name`` with ``params`` bound: ``policy(space, scores) -> plan``.

    Example::

        >>> policy = make_policy("fdr", q=0.1, min_channels=4)
        >>> plan = policy(PruningSpace(model, torch.randn(1, 3, 32, 32)), ScopImportance()(model))
    """
    if name not in _POLICIES:
        raise ValueError(f"unknown policy {name!r}; expected one of {policy_names()}")
    return functools.partial(_POLICIES[name], **params)


def select(space: PruningSpace, scores: Mapping[str, Tensor], policy: str, **params) -> Plan:
    """Run the policy called ``policy`` ("uniform", "global_ranking", "flops_target", "latency_target",
    "fdr") with ``params``.

    Example::

        >>> space = PruningSpace(model, torch.randn(1, 3, 32, 32))
        >>> plan = select(space, ScopImportance()(model), "fdr", q=0.1, min_channels=4)
    """
    return make_policy(policy, **params)(space, scores)
