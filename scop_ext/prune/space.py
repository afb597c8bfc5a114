"""What a policy may prune (stage 3): :class:`PruningSpace` holds the coupled channel groups of a
model (:func:`~scop_ext.prune.groups.channel_groups`), minus ignored layers, and the per-layer
FLOPs that predict the pruned network's FLOPs without pruning it; :func:`plan_from_keep` and its
helpers turn a policy's kept count per group into a plan. The constraints they apply
(``min_channels``, ``round_to``, whole units of grouped convs) and the tie rule (the lower index
is kept) are described in :mod:`scop_ext.prune.select`, whose policies choose the counts."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from ..ops.checks import check_counts
from .flops import flops_by_module
from .groups import ChannelGroup, Plan, is_depthwise, plain_forward, traced_groups

__all__ = ["PruningSpace", "check_common", "n_keep", "lowest", "plan_from_keep", "scored"]


class PruningSpace:
    """The channel groups of ``model`` a policy may prune, and the FLOPs to predict the result.

    Args:
        model: the network (ScopConv2d layers are traced in plain mode; the model is not changed).
        example_input: a plain (N, C, H, W) batch; FLOPs are counted on it.
        ignored_layers: conv names or ``fnmatch`` patterns (``"conv1"``, ``"*.shortcut.0"``); a
            group containing a matching conv is not pruned. The classifier (any linear layer's
            outputs, and anything feeding the model output) is never pruned.
        block_width: ``"prune"``, ``"keep"`` or ``"scatter"`` (the authors' scheme), see
            :mod:`scop_ext.prune.groups`; pass the same to
            :func:`~scop_ext.prune.surgery.apply_plan`.

    Attributes:
        groups: the prunable :class:`~scop_ext.prune.groups.ChannelGroup` s.
        refused: ``{root conv: why its group is not in groups}`` for the other groups.
        base_flops: FLOPs (= 2 x MACs) of the unpruned model on ``example_input``.
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: Tensor,
        *,
        ignored_layers: Iterable[str] = (),
        block_width: str = "prune",
    ) -> None:
        if isinstance(ignored_layers, str):
            raise ValueError("ignored_layers must be a list of names/patterns, not a single string")
        patterns = list(ignored_layers)
        groups, self.refused = traced_groups(model, example_input, block_width)
        self.groups: list[ChannelGroup] = []
        for g in groups:
            if any(fnmatch.fnmatchcase(c, p) for c in g.convs for p in patterns):
                self.refused[g.convs[0]] = "it holds a conv of ignored_layers"
            else:
                self.groups.append(g)
        with plain_forward(model), torch.no_grad():
            self._layer_flops = flops_by_module(model, example_input)
        self.base_flops = sum(self._layer_flops.values())
        # Shapes are copied, not referenced: the model may be pruned in place afterwards.
        self._shapes = {}  # name: (C_in, C_out, groups, depthwise) of every conv and linear layer
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d):
                self._shapes[name] = (m.in_channels, m.out_channels, m.groups, is_depthwise(m))
            elif isinstance(m, nn.Linear):
                self._shapes[name] = (m.in_features, m.out_features, 1, False)

    def group_scores(self, scores: Mapping[str, Tensor]) -> list[Tensor | None]:
        """Per group, the (size,) mean of its members' scores (None when no member is scored)."""
        result = []
        for g in self.groups:
            total = torch.zeros(g.size, dtype=torch.float64)
            count = torch.zeros(g.size, dtype=torch.float64)
            for conv in g.convs:
                if conv not in scores:
                    continue
                s = torch.as_tensor(scores[conv]).detach().to("cpu", torch.float64).flatten()
                width = self._shapes[conv][1]
                if s.numel() != width:
                    raise ValueError(
                        f"scores[{conv!r}] has {s.numel()} entries, expected {width} (one per output channel)"
                    )
                k = torch.tensor(list(g.index[conv]))
                total[k] += s[torch.tensor(list(g.index[conv].values()))]
                count[k] += 1
            mean = total / count if bool((count > 0).all()) else None
            if mean is not None and g.units:  # a unit is removed whole, so it has one score
                for u in g.units:
                    mean[list(u)] = mean[list(u)].mean()
            result.append(mean)
        return result

    def _to_plan(self, removed: Mapping[int, Iterable[int]]) -> Plan:
        """The plan removing, per group number, the given group channels."""
        plan = {}
        for i, channels in removed.items():
            g = self.groups[i]
            channels = sorted(set(channels))
            if not channels:
                continue
            for conv in g.convs:
                plan[conv] = sorted(g.index[conv][k] for k in channels if k in g.index[conv])
        return plan

    def flops(self, plan: Mapping[str, Iterable[int]]) -> int:
        """FLOPs (= 2 x MACs) the model will have on ``example_input`` after ``apply_plan(plan)``.

        ``plan`` is one made for this space (entries outside its groups are not counted). Exact
        for networks whose counted FLOPs are all in convs and linear layers (CNNs): each such
        layer costs ``base * (C_in'/groups') * C_out' / ((C_in/groups) * C_out)``.
        """
        lost_out, lost_in = {}, {}
        for g in self.groups:
            channels = None
            for conv in g.convs:
                if conv in plan:
                    inverse = {c: k for k, c in g.index[conv].items()}
                    channels = {inverse[c] for c in plan[conv]}
                    break
            if not channels:
                continue
            for layer, kind, group_channels in g.shrinks:
                n = sum(1 for k in group_channels if k in channels)
                if kind in ("out", "depthwise"):
                    lost_out[layer] = lost_out.get(layer, 0) + n
                if kind == "in":
                    lost_in[layer] = lost_in.get(layer, 0) + n
        total = self.base_flops
        for name in set(lost_out) | set(lost_in):
            if name not in self._layer_flops:
                continue  # a layer that did not run in the traced forward costs nothing
            c_in, c_out, groups, depthwise = self._shapes[name]
            per_in = c_in // groups
            # A depthwise conv keeps one input channel per group; other convs keep `groups` and
            # (C_in') // groups input channels per group, as torch-pruning does.
            new_per_in = per_in if depthwise else (c_in - lost_in.get(name, 0)) // groups
            new_out = c_out - lost_out.get(name, 0)
            base = self._layer_flops[name]
            total += base // (per_in * c_out) * (new_per_in * new_out) - base
        return total

    def reduction(self, plan: Mapping[str, Iterable[int]]) -> float:
        """Fraction of FLOPs ``plan`` removes: ``1 - flops(plan) / base_flops``."""
        return 1.0 - self.flops(plan) / self.base_flops


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
