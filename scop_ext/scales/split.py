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

Under ``torch.compile(split_forward, fullgraph=True)`` both streams trace into one graph, so
inductor sees no knockoff-half backward at all; the real stream's mixing is then plain ops (and
BatchNorm the model's own), which inductor fuses and differentiates itself.

The real stream keeps what its backward reads and nothing else. With the weights frozen (stage
2 trains beta only) each ScopConv2d saves the (N, C, H, W) branch difference and beta, not its
input (the input gradient is a transposed convolution of the weight), and each frozen BatchNorm
runs as the per-channel affine map it is and saves its scale, not its input. Per layer that
leaves the difference and whatever the model's own ReLU keeps: about an ordinary step's worth.
"""

from __future__ import annotations

import weakref
from collections import deque
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.scop_conv import ScopConv2d, scop_layers
from ..ops.dual_scaled_conv2d import conv_input_grad

__all__ = ["split_forward"]

# Layers whose knockoff output the model changes in place (an in-place ReLU right after the
# conv, say): their records are copies. Found by the version counter on a first call.
_OVERWRITTEN: weakref.WeakSet[ScopConv2d] = weakref.WeakSet()


def _requires_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _channel_view(t: Tensor, dim: int) -> Tensor:
    return t.view(1, -1, *([1] * (dim - 2)))


class _MixedConv(torch.autograd.Function):
    """``record + beta * (conv(input) + c + b - record)`` with the weight, c, b and the record constant.

    Saves the branch difference (N, C, H, W) and beta: grad beta is the per-channel sum of
    ``grad * difference``, and the input gradient the transposed convolution of ``grad * beta``
    (so the input is not kept).
    """

    @staticmethod
    def forward(ctx, input, beta, weight, bias, record, b, stride, padding, dilation, groups):
        y = F.conv2d(input, weight, bias, stride, padding, dilation, groups)
        # under autocast y comes in the region's dtype: mix in beta's and round once, as the kernels do
        diff = y if y.dtype == beta.dtype else y.to(beta.dtype)
        if b is not None:
            diff.add_(b[:, :, None, None])
        diff.sub_(record)
        ctx.save_for_backward(weight, beta, diff)
        ctx.conv_args, ctx.input_shape = (stride, padding, dilation, groups), input.shape
        return torch.addcmul(record, _channel_view(beta, 4), diff).to(y.dtype)

    @staticmethod
    def backward(ctx, grad):
        weight, beta, diff = ctx.saved_tensors
        need_input, need_beta = ctx.needs_input_grad[:2]
        # Eval-mode batch-norm backward with mean 0 and variance 1 is exactly this layer's:
        # grad_input = grad * beta and grad_weight = sum(grad * diff) per channel, one fused pass
        # where separate ops take three (a reduction over N, H and W is slow in NCHW).
        zeros = beta.new_zeros(beta.shape)
        grad_y, grad_beta, _ = torch.ops.aten.native_batch_norm_backward(
            grad.to(diff.dtype), diff, beta, zeros, zeros + 1, None, None, False, 0.0, [need_input, need_beta, False])
        grad_input = None
        if need_input:
            grad_input = conv_input_grad(grad_y.to(weight.dtype), weight, ctx.input_shape, *ctx.conv_args)
        return grad_input, grad_beta, None, None, None, None, None, None, None, None


def _affine(scale: Tensor, shift: Tensor):
    """A frozen BatchNorm's forward as ``input * scale + shift`` per channel: one pass, like the
    eval-mode kernel, but autograd keeps only the (C,) scale, not the input."""

    def forward(input: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (input.dim() - 2)
        return torch.addcmul(shift.view(shape), input, scale.view(shape)).to(input.dtype)

    return forward


@contextmanager
def _affine_batchnorms(model: nn.Module):
    """Every eval-mode BatchNorm of ``model`` with constant weight and bias runs as :func:`_affine`
    for the duration (its instance ``forward``; the class and the model's code are untouched)."""
    swapped = []
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and "forward" not in m.__dict__ and \
                    not _requires_grad(m.weight, m.bias):
                scale = torch.rsqrt(m.running_var + m.eps)
                if m.weight is not None:
                    scale = scale * m.weight
                shift = -m.running_mean * scale
                if m.bias is not None:
                    shift = shift + m.bias
                m.forward = _affine(scale, shift)
                swapped.append(m)
    try:
        yield
    finally:
        for m in swapped:
            del m.forward


class _Streams:
    """Installed as ``ScopConv2d.stream``: records in the knockoff pass, mixes in the real one.

    ``replay``: the Lemma 2 draws of an earlier knockoff pass of the same call, used again so a
    pass rerun with copied records draws nothing new.
    """

    def __init__(self, replay: dict[ScopConv2d, deque] | None = None) -> None:
        self.recording = True
        self.records: dict[ScopConv2d, deque[tuple[Tensor, Tensor | None, int]]] = {}
        self.draws: dict[ScopConv2d, deque[Tensor | None]] = {}
        self.replay = replay

    def __call__(self, layer: ScopConv2d, input: Tensor) -> Tensor:
        if self.recording:
            return self._record(layer, input)
        calls = self.records.get(layer)
        if not calls:
            raise RuntimeError("split_forward: a ScopConv2d ran more often on the real images than on the knockoffs; "
                               "the model's forward must not depend on its input's values")
        record, knockoff_bias, _ = calls.popleft()
        x, padding = layer.padded(input)
        b = None if knockoff_bias is None else knockoff_bias[:, 0]
        padding = (padding, padding) if isinstance(padding, int) else padding
        conv_args = (layer.stride, padding, layer.dilation, layer.groups)
        if not (torch.compiler.is_compiling() or _requires_grad(layer.weight, layer.bias, knockoff_bias)):
            return _MixedConv.apply(x, layer.beta, layer.weight, layer.bias, record, b, *conv_args)
        # something besides beta trains, or torch.compile traces (inductor derives the backward and
        # fuses the mixing): plain autograd ops
        y = F.conv2d(x, layer.weight, layer.bias, *conv_args)
        if b is not None:
            y = y + b[:, :, None, None]
        return (record + _channel_view(layer.beta, 4) * (y - record)).to(y.dtype)

    def _record(self, layer: ScopConv2d, input: Tensor) -> Tensor:
        x, padding = layer.padded(input)
        y = F.conv2d(x, layer.weight, layer.bias, layer.stride, padding, layer.dilation, layer.groups)
        if self.replay is not None:
            knockoff_bias = self.replay[layer].popleft()
        else:
            knockoff_bias = layer.draw_knockoff_bias(input.shape[0])
        self.draws.setdefault(layer, deque()).append(knockoff_bias)
        if knockoff_bias is not None:
            y.add_(knockoff_bias[:, 1, :, None, None])
        if torch.compiler.is_compiling():
            # a traced graph is functional, so the copy costs nothing; version counters are not traced
            record, version = y.clone(), None
        else:
            record = y.clone() if layer in _OVERWRITTEN else y
            version = record._version
        self.records.setdefault(layer, deque()).append((record, knockoff_bias, version))
        return y

    def overwritten(self) -> set[ScopConv2d]:
        """Layers whose record the model changed in place after it was taken."""
        return {layer for layer, calls in self.records.items() for record, _, version in calls
                if version is not None and record._version != version}


@contextmanager
def _installed(layers: list[ScopConv2d], streams: _Streams):
    for layer in layers:
        layer.stream = streams
    try:
        yield
    finally:
        for layer in layers:
            layer.stream = None


def _knockoff_pass(model: nn.Module, layers: list[ScopConv2d], x_knockoff: Tensor) -> _Streams:
    """The knockoff stream under no_grad, its records taken; rerun with copies (and the same
    draws) for any layer whose output the model then changed in place."""
    streams = _Streams()
    with _installed(layers, streams), torch.no_grad():
        model(x_knockoff)
    overwritten = streams.overwritten()
    if overwritten:
        _OVERWRITTEN.update(overwritten)
        streams = _Streams(replay=streams.draws)
        with _installed(layers, streams), torch.no_grad():
            model(x_knockoff)
    return streams


def split_forward(model: nn.Module, x: Tensor, x_knockoff: Tensor) -> Tensor:
    """The real half of ``model(torch.cat([x, x_knockoff]))`` for a model in eval mode, computed
    with the knockoff stream apart and without autograd (see the module docstring).

    Every ScopConv2d in SCOP mode draws its Lemma 2 biases once, as in the paired forward, so
    with the same generators the two give the same numbers. Only valid when no layer couples
    samples: BatchNorm in eval mode with running statistics, no batch-dependent layers.

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
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None):
            why = "is training" if m.training else "keeps no running statistics, so it normalises over the batch"
            raise ValueError(f"split_forward needs BatchNorm in eval mode (frozen statistics); {name!r} {why}")
    layers = [layer for layer in scop_layers(model).values() if layer.scop_enabled]
    streams = _knockoff_pass(model, layers, x_knockoff)
    streams.recording = False
    # inductor fuses a frozen BatchNorm and saves what its backward reads without the swap
    affine = nullcontext() if torch.compiler.is_compiling() else _affine_batchnorms(model)
    with _installed(layers, streams), affine:
        out = model(x)
    if any(streams.records.values()):
        raise RuntimeError("split_forward: a ScopConv2d ran more often on the knockoffs than on the real images; "
                           "the model's forward must not depend on its input's values")
    return out
