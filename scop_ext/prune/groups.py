"""Which output channels of a network can only be removed together: the channel groups.

Couplings come from torch-pruning's ``DependencyGraph``: removing output channel ``k`` of a conv
also removes input channel ``k`` of every layer that reads it, entry ``k`` of the BatchNorm after
it, and, where the conv's output meets other convs' outputs in a residual add (or feeds a
concatenation, a depthwise conv, ...), the matching channels of those convs. One such set is a
:class:`ChannelGroup`; a pruning **plan** says which channels to remove per conv::

    plan = {"layers.0.0.conv1": [3, 7], "layers.1.0.conv1": [0, 5, 9]}   # dict[str, list[int]]

Every conv of a coupled group appears in the plan with the channels it loses (for residual
couplings, the same indices), so the plan is plain JSON and reads without the graph;
:mod:`scop_ext.prune.surgery` carries plans out.

**Grouped convolutions** (``groups > 1``, not depthwise) split their input and output channels
into ``groups`` equal slices (so does a channel shuffle, :mod:`scop_ext.prune.shuffle`). torch-pruning keeps the conv's ``groups``, so a valid pruned conv
loses the same positions from every slice: a group coupled to a grouped conv's inputs or outputs
removes channels a whole **unit** at a time (one channel per slice, same position in each,
:attr:`ChannelGroup.units`), and a plan that splits a unit is refused.

A group may also hold Linear outputs and LayerNorms (ConvNeXt's residual stream is written by
each block's second Linear layer); only the classifier (the model's output) is never pruned.

**Block widths** (``block_width``): what happens to the channels that meet in a residual add or
a concatenation (the block output widths).

- ``"prune"``: they are one group and are removed together from every conv of it (stem,
  block-final convs, projection shortcuts): the residual path itself gets narrower.
- ``"keep"``: they are left whole; only block-internal convs shrink.
- ``"scatter"``: the authors' scheme (``Pruned_Conv2d_bn2`` in their release): each ungrouped
  conv of the group whose output goes straight into a BatchNorm is its own group and loses output
  filters on its own; its BatchNorm's output is written back into a full-width zero tensor
  (:class:`~scop_ext.layers.ChannelScatter`), so that conv's FLOPs are saved while the residual
  add and the next block's input keep full width.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import Tensor, nn

from ..nn.channels import ChannelShuffle
from ..nn.scop_conv import ScopConv2d
from . import shuffle
from .flops import modes_kept
from .importance import following_batchnorm

__all__ = ["BLOCK_WIDTHS", "ChannelGroup", "Plan", "arrange_groups", "channel_groups", "dependency_graph",
           "graph_groups", "is_depthwise", "plain_forward", "traced_groups"]

Plan = dict[str, list[int]]

BLOCK_WIDTHS = ("prune", "keep", "scatter")


@dataclass(eq=False, frozen=True)
class ChannelGroup:
    """Output channels of one or more convolutions that can only be removed together.

    Channel ``k`` of the group (``0 <= k < size``) is output channel ``index[conv][k]`` of each
    member conv (for a residual add that is channel ``k`` of every member).

    Attributes:
        convs: the convs whose output channels the group removes; ``convs[0]`` is the root the
            dependency graph grew the group from.
        size: number of channels in the group.
        index: per member conv, ``{group channel: conv channel}``.
        residual: the channels meet in a residual add/subtract or a concatenation (the
            block-output widths that ``block_width="keep"`` keeps).
        shrinks: ``(layer, kind, group channels)`` for every conv/linear layer the group shrinks:
            kind ``"out"`` (output channels), ``"in"`` (input channels; a flatten before a linear
            layer repeats a channel once per spatial position) or ``"depthwise"`` (both at once).
        units: empty when channels may be removed one by one; otherwise a partition of
            ``range(size)`` into equal-size tuples that are only removed whole (the group meets
            a grouped conv: one channel per slice of it).
        scatter: one conv of a residual group under ``block_width="scatter"``: its removed
            filters are written back as zeros, so only its own outputs shrink.
    """

    convs: tuple[str, ...]
    size: int
    index: dict[str, dict[int, int]]
    residual: bool
    shrinks: tuple[tuple[str, str, tuple[int, ...]], ...]
    units: tuple[tuple[int, ...], ...] = ()
    scatter: bool = False


def is_depthwise(module: nn.Module) -> bool:
    """Whether torch-pruning treats ``module`` as a depthwise conv (one filter per input channel)."""
    return tp.ops.module2type(module) == tp.ops.OPTYPE.DEPTHWISE_CONV


def _couples_blocks(node) -> bool:
    if node.type == tp.ops.OPTYPE.CONCAT:
        return True
    if node.type == tp.ops.OPTYPE.ELEMENTWISE and node.grad_fn is not None:
        return node.grad_fn.name().startswith(("AddBackward", "SubBackward"))
    return False


@contextmanager
def plain_forward(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as an ordinary network inside: SCOP mode off, train/eval flags restored on exit.

    Tracing needs an ordinary forward: SCOP mode would need a paired batch and hides the
    convolution inside a custom operator (and torch-pruning's tracing switches to eval mode).
    """
    scop_on = [m for m in model.modules() if isinstance(m, ScopConv2d) and m.scop_enabled]
    for m in scop_on:
        m.disable_scop()
    try:
        with modes_kept(model), torch.enable_grad():
            yield
    finally:
        for m in scop_on:
            m.enable_scop()


def dependency_graph(model: nn.Module, example_input: Tensor) -> tp.DependencyGraph:
    if not isinstance(example_input, Tensor):
        raise ValueError(f"example_input must be a Tensor, got {type(example_input).__name__}")
    graph = tp.DependencyGraph()
    shuffles = shuffle.ShufflePruner()
    hooks = shuffles.hooks(model)
    with plain_forward(model):
        try:
            graph.build_dependency(model, example_input, verbose=False,
                                   customized_pruners={ChannelShuffle: shuffles})
            shuffle.map_through_shuffles(graph, shuffles.channels)
            graph.shuffle_channels = shuffles.channels
            return graph
        except ZeroDivisionError:
            # torch-pruning maps channel indices through reshapes by dividing sizes; a channel
            # shuffle (view into groups, transpose, view back) breaks that mapping.
            raise ValueError(f"cannot trace the channels of {type(model).__name__} through {_reshapes(graph)}: "
                             "channel shuffle (a view into groups, transpose, view back) is not supported; "
                             "build it with scop_ext.nn.ChannelShuffle") from None
        finally:
            for hook in hooks:
                hook.remove()


def _is_grouped(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and not is_depthwise(module)


def _units(size: int, slices: Sequence[tuple[dict[int, int], int, int]]) -> tuple[tuple[int, ...], ...] | None:
    """The removal units of a group meeting grouped convs, ``()`` when it meets none, None when
    no partition removes the same positions from every slice of each of them.

    Args:
        slices: per grouped conv touched, ``({group channel: conv channel}, channels per slice, groups)``.
    """
    if not slices:
        return ()
    parent = list(range(size))

    def find(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for mapping, per, _ in slices:  # channels at one position of a grouped conv's slices go together
        first: dict[int, int] = {}
        for k, c in mapping.items():
            parent[find(k)] = find(first.setdefault(c % per, k))
    members: dict[int, list[int]] = {}
    for k in range(size):
        members.setdefault(find(k), []).append(k)
    units = tuple(tuple(u) for u in members.values())
    if len({len(u) for u in units}) != 1:
        return None
    for mapping, per, groups in slices:
        for u in units:
            counts = Counter(mapping[k] // per for k in u if k in mapping)
            if len(counts) != groups or len(set(counts.values())) != 1:
                return None
    return units


def graph_groups(
    graph: tp.DependencyGraph, model: nn.Module
) -> tuple[list[tuple[ChannelGroup, tp.dependency.Dependency]], dict[str, str]]:
    """The prunable channel groups, each with its root dependency (root module and handler),
    and ``{root conv: why its group is not prunable}`` for the others."""
    names = {m: n for n, m in model.named_modules()}
    result, refused = [], {}
    for group in graph.get_all_groups(root_module_types=(nn.Conv2d,)):
        root = names[group[0].dep.target.module]
        index, shrinks, slices, sliced, residual, why = {}, [], [], set(), False, None
        for item in group:
            dep, node = item.dep, item.dep.target
            module = node.module
            residual |= _couples_blocks(node)
            if node.type == tp.ops.OPTYPE.OUTPUT:
                why = "its channels are the model's output"
            if isinstance(module, ChannelShuffle):  # a smaller shuffle: same positions from every slice
                per = graph.shuffle_channels[module] // module.groups
                slices.append((dict(zip(item.root_idxs, item.idxs)), per, module.groups))
                sliced.add(names[module])
                continue
            if not isinstance(module, (nn.Conv2d, nn.Linear)):
                continue
            out = graph.is_out_channel_pruning_fn(dep.handler)
            kind = "depthwise" if is_depthwise(module) else ("out" if out else "in")
            shrinks.append((names[module], kind, tuple(item.root_idxs)))
            if kind != "in":
                index[names[module]] = dict(zip(item.root_idxs, item.idxs))
            if _is_grouped(module):
                per = (module.out_channels if out else module.in_channels) // module.groups
                slices.append((dict(zip(item.root_idxs, item.idxs)), per, module.groups))
                sliced.add(names[module])
        units = _units(len(group[0].idxs), slices)
        if units is None and why is None:
            why = f"it covers the slices of grouped convs or channel shuffles {sorted(sliced)} unevenly"
        if why is not None:
            refused[root] = why
            continue
        convs = (root,) + tuple(n for n in index if n != root)
        info = ChannelGroup(convs, len(group[0].idxs), index, residual, tuple(shrinks), units)
        result.append((info, group[0].dep))
    return result, refused


def _reshapes(graph: tp.DependencyGraph) -> str:
    ops = sorted({n.grad_fn.name() for n in getattr(graph, "module2node", {}).values()
                  if n.type == tp.ops.OPTYPE.RESHAPE and n.grad_fn is not None})
    return "the reshape ops " + ", ".join(ops) if ops else "a reshape"


def traced_groups(
    model: nn.Module, example_input: Tensor, block_width: str = "prune"
) -> tuple[list[ChannelGroup], dict[str, str]]:
    """:func:`channel_groups`, and ``{root conv: why its group is not prunable}`` for the rest."""
    groups, refused = graph_groups(dependency_graph(model, example_input), model)
    arranged, left = arrange_groups(model, groups, block_width)
    return [g for g, _ in arranged], {**refused, **left}


def arrange_groups(
    model: nn.Module, groups: list[tuple[ChannelGroup, tp.dependency.Dependency]], block_width: str
) -> tuple[list[tuple[ChannelGroup, tp.dependency.Dependency | None]], dict[str, str]]:
    """The groups a plan may prune under ``block_width``, in model order, each with its root
    dependency (None for a scatter group, which torch-pruning does not handle), and
    ``{conv: why it is left whole}`` for the residual convs this leaves out."""
    if block_width not in BLOCK_WIDTHS:
        raise ValueError(f"block_width must be one of {', '.join(BLOCK_WIDTHS)}, got {block_width!r}")
    if block_width == "prune":
        return list(groups), {}
    bns = following_batchnorm(model) if block_width == "scatter" else {}
    modules = dict(model.named_modules())
    arranged, left = [], {}
    for group, dep in groups:
        if not group.residual:
            arranged.append((group, dep))
            continue
        if block_width == "keep":
            left[group.convs[0]] = "block_width keep keeps residual and concatenated widths"
            continue
        for conv in group.convs:
            if conv not in bns or modules[conv].groups != 1:
                left[conv] = "block_width scatter scatters only ungrouped convs with their own BatchNorm"
                continue
            size = modules[conv].out_channels
            unit = ChannelGroup((conv,), size, {conv: {k: k for k in range(size)}}, True,
                                ((conv, "out", tuple(range(size))),), scatter=True)
            arranged.append((unit, None))
    return arranged, left


def channel_groups(model: nn.Module, example_input: Tensor, block_width: str = "prune") -> list[ChannelGroup]:
    """The prunable channel groups of ``model``, traced on ``example_input``.

    Every conv appears in at most one group. Groups whose channels reach the model's output
    (the classifier), or that cover a grouped conv's slices unevenly, are left out
    (:func:`traced_groups` says why).

    Args:
        model: any CNN; :class:`~scop_ext.layers.ScopConv2d` layers are traced in plain mode.
        example_input: a plain (N, C, H, W) batch the model accepts.
        block_width: ``"prune"``, ``"keep"`` or ``"scatter"`` (module docstring): ``"keep"``
            leaves the residual groups out, ``"scatter"`` splits them into one group per conv
            that has its own BatchNorm.

    Raises:
        ValueError: the channels cannot be traced through an op (channel shuffle), or an
            unknown ``block_width``.
    """
    return traced_groups(model, example_input, block_width)[0]
