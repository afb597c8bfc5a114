"""Physical pruning: carry out a plan, removing output channels of convolutions and everything
coupled to them (:mod:`scop_ext.prune.groups` says what is coupled, and what ``block_width``
``"prune"``, ``"keep"`` and ``"scatter"`` mean); re-create a pruned architecture from its widths.

Under ``block_width="scatter"`` (the authors' scheme) a block-final conv loses filters on its own
and its BatchNorm's output is written back to full width by a
:class:`~scop_ext.layers.ChannelScatter`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch_pruning as tp
from torch import Tensor, nn

from .. import models
from ..nn.channels import ChannelScatter
from ..nn.scop_conv import restore
from .flops import modes_kept
from .groups import (
    ChannelGroup,
    arrange_groups,
    channel_groups,
    dependency_graph,
    graph_groups,
)
from .importance import following_batchnorm

__all__ = ["apply_plan", "channel_widths", "scattered_convs", "rebuild"]


def _group_channels(group: ChannelGroup, plan: Mapping[str, Sequence[int]]) -> list[int] | None:
    """The group channels ``plan`` removes, or None when it does not touch the group."""
    chosen = None
    for conv in group.convs:
        if conv not in plan:
            continue
        inverse = {c: k for k, c in group.index[conv].items()}
        idxs = list(plan[conv])
        bad = [i for i in idxs if i not in inverse]
        if bad or len(set(idxs)) != len(idxs):
            raise ValueError(
                f"plan[{conv!r}] must hold distinct channel indices of {conv!r} in the group "
                f"(0..{len(inverse) - 1} for a full group); got {sorted(idxs)}"
            )
        channels = sorted(inverse[i] for i in idxs)
        if chosen is not None and channels != chosen:
            raise ValueError(
                f"plan removes different channels from coupled convs {group.convs}: they must be removed together"
            )
        chosen = channels
    if chosen is not None:
        missing = [c for c in group.convs if c not in plan]
        if missing:
            raise ValueError(f"plan must list every conv of the coupled group {group.convs}; missing {missing}")
        if len(chosen) >= group.size:
            raise ValueError(f"plan removes all {group.size} channels of {group.convs}; at least one must stay")
        removed = set(chosen)
        split = next((u for u in group.units if 0 < len(removed & set(u)) < len(u)), None)
        if split is not None:
            conv = group.convs[0]
            raise ValueError(
                f"plan[{conv!r}] splits a unit of a grouped conv: channels {[group.index[conv][k] for k in split]} "
                "(one per slice, same position) must be removed together or kept together"
            )
    return chosen


def apply_plan(
    model: nn.Module, example_input: Tensor, plan: Mapping[str, Sequence[int]], block_width: str = "prune"
) -> nn.Module:
    """Remove the planned output channels from ``model``, in place, with everything coupled to them.

    :class:`~scop_ext.layers.ScopConv2d` layers end up as ``nn.Conv2d``
    (:func:`scop_ext.layers.restore`; their ``beta`` and knockoff state are dropped), so the
    result holds only ordinary torch layers and runs without scop_ext. The surgery runs on a deep
    copy whose modules replace the model's only when all of it succeeded: on an error the model
    is untouched.

    Args:
        model: the network to prune.
        example_input: a plain (N, C, H, W) batch the model accepts (used for tracing only).
        plan: ``{conv name: [output channel indices to remove]}``; every conv of a coupled group
            must be listed with the same channels (what :mod:`scop_ext.prune.select` produces).
        block_width: ``"prune"``, ``"keep"`` or ``"scatter"`` (module docstring). Under
            ``"keep"``, plan entries for convs of a residual group are skipped; under
            ``"scatter"``, each such conv with its own BatchNorm loses the channels its entry
            names and its BatchNorm's output is scattered back to full width (other residual
            convs' entries are skipped). Build the plan from a ``PruningSpace`` with the same
            ``block_width`` so that FLOPs targets account for this.

    Returns:
        ``model``, pruned (every module in the train/eval mode it was in).

    Raises:
        ValueError: a plan entry names no prunable conv, has out-of-range or duplicate indices,
            treats coupled convs differently, splits a grouped conv's unit, or would remove
            every channel of a group.
    """
    # Surgery runs on a copy that replaces the model's contents only once all of it succeeded.
    work = copy.deepcopy(model)
    graph = dependency_graph(work, example_input)
    groups, _ = graph_groups(graph, work)
    known = {conv for g, _ in groups for conv in g.convs}
    unknown = sorted(set(plan) - known)
    if unknown:
        raise ValueError(f"plan names {unknown}, which are not prunable convs of this model (or not convs)")
    # Decide every group against the unpruned graph first; groups never share output channels,
    # so pruning one leaves the others' indices valid.
    todo, scatter = [], []
    for group, root_dep in arrange_groups(work, groups, block_width)[0]:
        channels = _group_channels(group, plan)
        if channels and root_dep is None:
            scatter.append((group.convs[0], channels))
        elif channels:
            todo.append((root_dep, channels))
    bns = following_batchnorm(work) if scatter else {}
    with modes_kept(work):
        for root_dep, channels in todo:
            graph.get_pruning_group(root_dep.target.module, root_dep.handler, channels).prune()
        # After the graph's groups: those shrink the inputs of these convs, never their outputs.
        for conv, channels in scatter:
            _scatter_outputs(work, conv, bns[conv], channels)
    # torch-pruning shrinks a ScopConv2d's weight like any conv's (its beta is left stale);
    # restoring keeps the pruned weight and drops the SCOP state.
    model.__dict__.update(restore(work).__dict__)
    return model


def _last_channels(group: ChannelGroup, n: int) -> list[int]:
    """``n`` group channels that ``apply_plan`` can remove: the last ones, or the last whole units."""
    if not group.units:
        return list(range(group.size - n, group.size))
    unit = len(group.units[0])
    if n % unit:
        raise ValueError(f"width of {group.convs[0]!r} must keep whole units of {unit} channels "
                         f"(one per slice of a grouped conv), got {group.size - n}")
    return sorted(k for u in group.units[len(group.units) - n // unit:] for k in u)


def _scatter_outputs(model: nn.Module, conv_name: str, bn_name: str, removed: Sequence[int]) -> None:
    conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
    width, gone = conv.out_channels, set(removed)
    tp.prune_conv_out_channels(conv, list(removed))
    tp.prune_batchnorm_out_channels(bn, list(removed))
    model.set_submodule(bn_name, ChannelScatter(bn, [c for c in range(width) if c not in gone], width))


def scattered_convs(model: nn.Module) -> list[str]:
    """Names of the convs whose BatchNorm output a :class:`~scop_ext.layers.ChannelScatter`
    writes back to full width (``block_width="scatter"``), sorted."""
    modules = dict(model.named_modules())
    return sorted(conv for conv, bn in following_batchnorm(model).items()
                  if isinstance(modules.get(bn.rpartition(".")[0]), ChannelScatter))


def channel_widths(model: nn.Module) -> dict[str, int]:
    """Output channels of every ``nn.Conv2d`` of ``model``, by qualified name (JSON-ready)."""
    return {name: m.out_channels for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def rebuild(
    model_name: str, widths: Mapping[str, int], num_classes: int, in_channels: int, scattered: Sequence[str] = ()
) -> nn.Module:
    """Re-create a pruned model's architecture from its name and :func:`channel_widths`.

    Builds the dense model with :func:`scop_ext.models.build_model`, then shrinks each coupled
    group to the recorded width; load the pruned model's state_dict (e.g. from safetensors)
    into the result to get the pruned network back without pickle.

    Args:
        model_name: the name the dense model was built with (``"resnet20"``, ``"torchvision:resnet18"``).
        widths: ``{conv name: output channels}`` for every conv.
        num_classes, in_channels: as given to :func:`~scop_ext.models.build_model`.
        scattered: :func:`scattered_convs` of the pruned model (``block_width="scatter"``);
            their kept indices are ``ChannelScatter.index`` buffers, placeholders until the
            state_dict is loaded.

    Returns:
        The pruned architecture, randomly initialised.

    Raises:
        ValueError: widths that do not name every conv, exceed the dense widths, differ between
            coupled convs, or change a conv that cannot be pruned; scattered convs that cannot
            be scattered or are not narrower than their residual width.
    """
    model = models.build_model(model_name, num_classes, in_channels)
    dense = channel_widths(model)
    if set(widths) != set(dense):
        raise ValueError(
            f"widths must name exactly the convs of {model_name!r}: missing {sorted(set(dense) - set(widths))}, "
            f"unknown {sorted(set(widths) - set(dense))}"
        )
    x = models.example_input(model_name, in_channels)
    mode = "scatter" if scattered else "prune"
    plan = {}
    for group in channel_groups(model, x, block_width=mode):
        kept = {widths[c] for c in group.convs if c in widths}  # Linear members follow their conv
        if len(kept) > 1:
            raise ValueError(f"coupled convs {group.convs} must have one width, got {sorted(kept)}")
        (width,) = kept
        if not 1 <= width <= group.size:
            raise ValueError(f"width of {group.convs[0]!r} must be in 1..{group.size}, got {width}")
        removed = _last_channels(group, group.size - width)  # which ones does not matter: weights are loaded after
        for conv in group.convs:
            plan[conv] = [group.index[conv][k] for k in removed if k in group.index[conv]]
    apply_plan(model, x, {k: v for k, v in plan.items() if v}, block_width=mode)
    wrong = {n: (w, widths[n]) for n, w in channel_widths(model).items() if w != widths[n]}
    if wrong:
        raise ValueError(f"these convs cannot take the requested widths (have, requested): {wrong}")
    if scattered_convs(model) != sorted(scattered):
        raise ValueError(f"scattered convs must be narrower convs with their own BatchNorm in a residual group; "
                         f"got {sorted(scattered)}, could build {scattered_convs(model)}")
    return model
