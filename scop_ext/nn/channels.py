"""Channel-moving modules a pruned or traced network holds: :class:`ChannelScatter` (the authors'
block-width scheme) and :class:`ChannelShuffle` (ShuffleNet's shuffle as one op a dependency
graph can follow). Both are plain PyTorch."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = ["ChannelScatter", "ChannelShuffle"]


class ChannelScatter(nn.Module):
    """Runs ``module`` and writes its K output channels into channels ``index`` of a zero tensor
    ``channels`` wide: the authors' block-width scheme (``Pruned_Conv2d_bn2``).

    A residual block's last conv (and its BatchNorm) computes only its kept filters, yet the
    residual add and the next block still see the full width. The scatter is memory traffic, no
    multiply-accumulates, so :mod:`scop_ext.prune.flops` counts it as 0 FLOPs. ``index`` is a
    buffer, so it is saved in the state_dict (safetensors) and exported with the graph.

    Args:
        module: the layer whose output is scattered (the BatchNorm after the pruned conv).
        index: (K,) the full-width channel each of its outputs goes to, distinct, in ``[0, channels)``.
        channels: the full width C.

    Shape:
        - Input: whatever ``module`` takes; its output (N, K, H, W)
        - Output: (N, C, H, W), zero outside ``index``
    """

    def __init__(self, module: nn.Module, index: Iterable[int] | Tensor, channels: int) -> None:
        super().__init__()
        index = torch.as_tensor(index, dtype=torch.long).flatten()
        if not 1 <= index.numel() <= channels or index.unique().numel() != index.numel() or \
                bool((index < 0).any() or (index >= channels).any()):
            raise ValueError(f"index must hold 1..{channels} distinct channels in [0, {channels}), got {index.tolist()}")
        self.module = module
        self.channels = channels
        self.register_buffer("index", index)

    def forward(self, x: Tensor) -> Tensor:
        y = self.module(x)
        # y.size(i), not *y.shape: torch.fx traces sizes as values but cannot unpack them
        out = y.new_zeros(y.size(0), self.channels, y.size(2), y.size(3))
        return out.index_copy(1, self.index, y)

    def extra_repr(self) -> str:
        return f"{self.index.numel()} -> {self.channels} channels"


class ChannelShuffle(nn.Module):
    """ShuffleNet's channel shuffle (Zhang et al. 2018) as one ``index_select``: output channel
    ``p * groups + g`` is input channel ``g * (C / groups) + p``.

    Bitwise what torchvision's ``channel_shuffle`` (view, transpose, view) computes, but a module
    of one op, so a dependency graph can map channels through it (:mod:`scop_ext.prune.shuffle`).

    Shape:
        - Input: (N, C, H, W) with C divisible by ``groups``
        - Output: (N, C, H, W)
    """

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        c = x.size(1)
        order = torch.arange(c, device=x.device).view(self.groups, c // self.groups).t().reshape(-1)
        return x.index_select(1, order)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"
