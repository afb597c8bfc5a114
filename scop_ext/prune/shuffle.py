"""Channel shuffle in the dependency graph (torch-pruning cannot map channels through
view/transpose/view; see :class:`scop_ext.nn.ChannelShuffle`, the one-op form we build).

The shuffle is registered as a layer whose input and output channels are pruned together; the
group carries its **input** channel indices, and the edges to the layers reading its output
map them through the permutation. A group meeting a shuffle of ``groups`` slices removes the
same positions from every slice (:attr:`~scop_ext.prune.surgery.ChannelGroup.units`), so the
smaller shuffle is still a shuffle of the kept channels.
"""

from __future__ import annotations

import torch_pruning as tp
from torch import nn

from ..nn.channels import ChannelShuffle

__all__ = ["ShufflePruner", "map_through_shuffles"]


class ShufflePruner(tp.pruner.function.BasePruningFunc):
    """The pruner of :class:`~scop_ext.nn.ChannelShuffle` for one trace: nothing to cut (the
    shuffle reads its width from its input); it reports the widths its forward hooks saw.

    Attributes:
        channels: ``{shuffle: input channels}``, filled during a forward while :meth:`hooks` are on.
    """

    def __init__(self) -> None:
        super().__init__()
        self.channels: dict[nn.Module, int] = {}

    def hooks(self, model: nn.Module) -> list:
        return [m.register_forward_hook(lambda mod, args, out: self.channels.__setitem__(mod, out.size(1)))
                for m in model.modules() if isinstance(m, ChannelShuffle)]

    def prune_out_channels(self, layer: nn.Module, idxs) -> nn.Module:
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int | None:
        return self.channels.get(layer)

    get_in_channels = get_out_channels


class _Permute:
    """An index mapping of torch-pruning's: each index through ``fn``, its root index kept."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def __call__(self, idxs):
        return [tp._helpers._HybridIndex(idx=self.fn(i.idx), root_idx=i.root_idx) for i in idxs]


def map_through_shuffles(graph: tp.DependencyGraph, channels: dict[nn.Module, int]) -> None:
    """Give every edge between a shuffle and a layer reading its output the permutation."""
    for module, node in graph.module2node.items():
        if not isinstance(module, ChannelShuffle):
            continue
        g = module.groups
        per = channels[module] // g
        forward = _Permute(lambda i, g=g, per=per: (i % per) * g + i // per)  # input -> output channel
        backward = _Permute(lambda j, g=g, per=per: (j % g) * per + j // g)  # output -> input channel
        for dep in node.dependencies:
            if dep.target in node.outputs:
                if dep.index_mapping[0] is not None:
                    raise ValueError(f"a channel shuffle feeding {type(dep.target.module).__name__} directly is not supported")
                dep.index_mapping[0] = forward
        for out in node.outputs:
            for dep in out.dependencies:
                if dep.target is node:
                    if dep.index_mapping[1] is not None:
                        raise ValueError(f"a channel shuffle feeding {type(out.module).__name__} directly is not supported")
                    dep.index_mapping[1] = backward
