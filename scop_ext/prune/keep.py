"""What every selection policy shares: from kept counts per group to a plan.

The constraints (``min_channels``, ``round_to``, whole units of grouped convs) and the tie rule
(the lower index is kept) are described in :mod:`scop_ext.prune.select`; the policies of
:mod:`.select` and :mod:`.latency_policy` apply them through these helpers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from torch import Tensor

from .._checks import check_counts
from .groups import Plan
from .space import PruningSpace

__all__ = ["check_common", "n_keep", "lowest", "plan_from_keep", "scored"]


def check_common(min_channels: int, round_to: int) -> None:
    """The constraints every policy takes, checked once (ValueError naming the argument)."""
    check_counts(False, min_channels=min_channels, round_to=round_to)


def n_keep(size: int, wanted: int, min_channels: int, round_to: int) -> int:
    """How many of a group's ``size`` channels stay when a policy wants ``wanted``: at least
    ``min_channels``, rounded up to a multiple of ``round_to`` (capped at ``size``)."""
    keep = max(wanted, min(min_channels, size))
    if keep < size and round_to > 1:
        keep = min(size, math.ceil(keep / round_to) * round_to)
    return keep


def lowest(score: Tensor, n_remove: int) -> list[int]:
    """The ``n_remove`` lowest-scored channels of ``score`` (C,)."""
    # Sort on (score, -index) so that among equal scores the lower index is kept.
    values = score.tolist()
    order = sorted(range(len(values)), key=lambda k: (values[k], -k))
    return order[:n_remove]


def plan_from_keep(
    space: PruningSpace, group_scores: list[Tensor | None], keep: Mapping[int, int], min_channels: int, round_to: int
) -> Plan:
    """The plan that keeps ``keep[i]`` (then ``n_keep``) top-scored channels of group ``i``."""
    removed = {}
    for i, wanted in keep.items():
        score = group_scores[i]
        group = space.groups[i]
        n = n_keep(group.size, wanted, min_channels, round_to)
        if not group.units:
            removed[i] = lowest(score, group.size - n)
            continue
        # A grouped conv's slices lose whole units: keep the count rounded up to whole units.
        units = sorted(group.units, key=lambda u: (float(score[u[0]]), -min(u)))
        removed[i] = [k for u in units[: (group.size - n) // len(units[0])] for k in u]
    return space._to_plan(removed)


def scored(space: PruningSpace, scores: Mapping[str, Tensor]) -> list[Tensor | None]:
    """Each group's (C,) score (None: unscored); ValueError when no group has one."""
    group_scores = space.group_scores(scores)
    if all(s is None for s in group_scores):
        if not space.groups:
            why = "; ".join(f"{conv!r}: {reason}" for conv, reason in list(space.refused.items())[:3])
            raise ValueError(f"the model has no prunable channel group ({len(space.refused)} refused; {why or 'no convs'})")
        raise ValueError("scores name no conv of any prunable group")
    return group_scores
