"""The paired forward of a converted model with the knockoff stream run apart, without autograd.

With BatchNorm frozen (eval mode) every layer other than a ScopConv2d acts on each sample alone,
so the knockoff half of the paired forward is the model applied to the N knockoff images by
themselves: at each ScopConv2d it is ``Y_k + c + b~`` and no beta reaches it. Gradients reach
beta only through the real half. :func:`split_forward` therefore runs

1. the knockoff images under ``torch.no_grad()``, each ScopConv2d recording its knockoff output
   ``Y_k + c + b~`` (and drawing its Lemma 2 pairs ``[b, b~]``, once per call as the paired
   forward does); then
2. the real images with autograd, each ScopConv2d returning
   ``beta * (Y_r + c + b) + (1 - beta) * recorded``, with the ``b`` of the same draw.

The result equals the real half of the paired forward, while the backward runs no convolution
input-gradient, BatchNorm or ReLU backward for the knockoff half and autograd keeps none of its
activations. Records are keyed by layer and call order, so a convolution called several times
per forward (a shared or reused module) mixes each call with its own record.
"""

from __future__ import annotations

from collections import deque
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import ScopConv2d, scop_layers

__all__ = ["split_forward"]


class _Streams:
    """Installed as ``ScopConv2d.stream``: records in the knockoff pass, mixes in the real one."""

    def __init__(self) -> None:
        self.recording = True
        self.records: dict[ScopConv2d, deque[tuple[Tensor, Tensor | None]]] = {}

    def __call__(self, layer: ScopConv2d, input: Tensor) -> Tensor:
        x, padding = layer.padded(input)
        y = F.conv2d(x, layer.weight, layer.bias, layer.stride, padding, layer.dilation, layer.groups)
        if self.recording:
            knockoff_bias = layer.draw_knockoff_bias(input.shape[0])
            if knockoff_bias is not None:
                y.add_(knockoff_bias[:, 1, :, None, None])
            self.records.setdefault(layer, deque()).append((y, knockoff_bias))
            return y
        calls = self.records.get(layer)
        if not calls:
            raise RuntimeError("split_forward: a ScopConv2d ran more often on the real images than on the knockoffs; "
                               "the model's forward must not depend on its input's values")
        y_knock, knockoff_bias = calls.popleft()
        if knockoff_bias is not None:
            y = y + knockoff_bias[:, 0, :, None, None]
        # autograd keeps only the (N, C, H, W) difference (for grad beta) and beta (for grad Y_r);
        # under autocast the mix runs in beta's wider dtype and is rounded once, as the kernels do.
        return (y_knock + layer.beta.view(1, -1, 1, 1) * (y - y_knock)).to(y.dtype)


@contextmanager
def _installed(layers: list[ScopConv2d], streams: _Streams):
    for layer in layers:
        layer.stream = streams
    try:
        yield
    finally:
        for layer in layers:
            layer.stream = None


def split_forward(model: nn.Module, x: Tensor, x_knockoff: Tensor) -> Tensor:
    """The real half of ``model(torch.cat([x, x_knockoff]))`` for a model in eval mode, computed
    with the knockoff stream apart and without autograd (see the module docstring).

    Every ScopConv2d in SCOP mode draws its Lemma 2 biases once, as in the paired forward, so
    with the same generators the two give the same numbers. Only valid when no layer couples
    samples: BatchNorm in eval mode (frozen statistics), no batch-dependent layers.

    Args:
        model: a converted model (``scop_ext.convert``), or a wrapper around one such as
            ``DistributedDataParallel``.
        x: (N, C, H, W) real images.
        x_knockoff: (N, C, H, W) their knockoffs.

    Returns:
        The model's output for the N real images, e.g. (N, classes) logits.
    """
    if x.shape != x_knockoff.shape:
        raise ValueError(f"x and x_knockoff must have one shape, got {tuple(x.shape)} and {tuple(x_knockoff.shape)}")
    coupled = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if coupled:
        raise ValueError(f"split_forward needs BatchNorm in eval mode (frozen statistics); {coupled[0]!r} is training")
    layers = [layer for layer in scop_layers(model).values() if layer.scop_enabled]
    streams = _Streams()
    with _installed(layers, streams):
        with torch.no_grad():
            model(x_knockoff)
        streams.recording = False
        out = model(x)
    if any(streams.records.values()):
        raise RuntimeError("split_forward: a ScopConv2d ran more often on the knockoffs than on the real images; "
                           "the model's forward must not depend on its input's values")
    return out
