"""Physical pruning: remove output channels of convolutions, and everything coupled to them.

Couplings come from torch-pruning's ``DependencyGraph``: removing output channel ``k`` of a conv
also removes input channel ``k`` of every layer that reads it, entry ``k`` of the BatchNorm after
it, and, where the conv's output meets other convs' outputs in a residual add (or feeds a
concatenation, a depthwise conv, ...), the matching channels of those convs. One such set is a
:class:`ChannelGroup`; a pruning **plan** says which channels to remove per conv::

    plan = {"layers.0.0.conv1": [3, 7], "layers.1.0.conv1": [0, 5, 9]}   # dict[str, list[int]]

Every conv of a coupled group appears in the plan with the channels it loses (for residual
couplings, the same indices), so the plan is plain JSON and reads without the graph.

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

import copy
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import Tensor, nn

from .. import models
from ..layers import ChannelScatter, ScopConv2d, restore
from .flops import modes_kept
from . import shuffle
from .importance import following_batchnorm

__all__ = ["BLOCK_WIDTHS", "ChannelGroup", "channel_groups", "traced_groups", "apply_plan", "channel_widths",
           "scattered_convs", "rebuild", "Plan", "plain_forward", "is_depthwise"]

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


def _dependency_graph(model: nn.Module, example_input: Tensor) -> tp.DependencyGraph:
    if not isinstance(example_input, Tensor):
        raise ValueError(f"example_input must be a Tensor, got {type(example_input).__name__}")
    graph = tp.DependencyGraph()
    shuffles = shuffle.ShufflePruner()
    hooks = shuffles.hooks(model)
    with plain_forward(model):
        try:
            graph.build_dependency(model, example_input, verbose=False,
                                   customized_pruners={models.ChannelShuffle: shuffles})
            shuffle.map_through_shuffles(graph, shuffles.channels)
            graph.shuffle_channels = shuffles.channels
            return graph
        except ZeroDivisionError:
            # torch-pruning maps channel indices through reshapes by dividing sizes; a channel
            # shuffle (view into groups, transpose, view back) breaks that mapping.
            raise ValueError(f"cannot trace the channels of {type(model).__name__} through {_reshapes(graph)}: "
                             "channel shuffle (a view into groups, transpose, view back) is not supported; "
                             "build it with scop_ext.models.ChannelShuffle") from None
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


def _graph_groups(
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
            if isinstance(module, models.ChannelShuffle):  # a smaller shuffle: same positions from every slice
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
    groups, refused = _graph_groups(_dependency_graph(model, example_input), model)
    arranged, left = _arrange(model, groups, block_width)
    return [g for g, _ in arranged], {**refused, **left}


def _arrange(
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
    graph = _dependency_graph(work, example_input)
    groups, _ = _graph_groups(graph, work)
    known = {conv for g, _ in groups for conv in g.convs}
    unknown = sorted(set(plan) - known)
    if unknown:
        raise ValueError(f"plan names {unknown}, which are not prunable convs of this model (or not convs)")
    # Decide every group against the unpruned graph first; groups never share output channels,
    # so pruning one leaves the others' indices valid.
    todo, scatter = [], []
    for group, root_dep in _arrange(work, groups, block_width)[0]:
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
