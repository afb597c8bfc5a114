"""Counting FLOPs, MACs and parameters with PyTorch's own ``FlopCounterMode``.

Conventions, stated once and used in every name here:

- **FLOPs** are floating-point operations as ``torch.utils.flop_counter.FlopCounterMode`` counts
  them: a multiply-accumulate is 2 FLOPs, so a convolution costs
  ``2 * N * C_out * H_out * W_out * (C_in / groups) * kH * kW`` FLOPs. Only matrix products and
  convolutions are counted; bias adds, BatchNorm, activations, pooling and other elementwise work
  are 0 FLOPs, as in ``FlopCounterMode``. So is the scatter of ``block_width="scatter"``
  (:class:`~scop_ext.layers.ChannelScatter`: a zero fill and an index copy, memory traffic with
  no multiply-accumulate); what it saves is the narrower conv before it.
- **MACs** (multiply-accumulates) are FLOPs / 2. Papers that say "FLOPs" for ResNets on
  CIFAR/ImageNet (including SCOP's) usually mean MACs; compare with care.

SCOP mode is counted too: importing this module registers a formula for
``torch.ops.scop.dual_scaled_conv2d`` that charges the convolution over the whole paired batch
(2N images), i.e. exactly what ``nn.Conv2d`` would cost on that batch; the per-channel mixing
and the knockoff bias adds are elementwise and, like elementwise aten ops, count 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import (
    FlopCounterMode,
    conv_flop_count,
    register_flop_formula,
)

from .. import ops as _ops  # noqa: F401  (defines torch.ops.scop.*)

__all__ = ["count_flops", "count_macs", "count_params", "flops_by_module", "modes_kept"]


@register_flop_formula(torch.ops.scop.dual_scaled_conv2d)
def _dual_scaled_conv2d_flops(
    x_shape, w_shape, _bias, _beta, _knockoff_bias, _stride, _padding, _dilation, _groups, _save_diff, out_shape=None
) -> int:
    # out_shape holds the shapes of (out, diff); the convolution produced `out` over all 2N images.
    return conv_flop_count(x_shape, w_shape, out_shape[0])


@contextmanager
def modes_kept(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's own train/eval flag on exit (a model may mix them, e.g. frozen BN)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextmanager
def _eval_no_grad(model: nn.Module) -> Iterator[None]:
    # Counting runs a forward: eval mode keeps BatchNorm running statistics untouched.
    with modes_kept(model), torch.no_grad():
        model.eval()
        yield


def _run(model: nn.Module, example_input: Tensor) -> FlopCounterMode:
    if not isinstance(example_input, Tensor):
        raise ValueError(f"example_input must be a Tensor, got {type(example_input).__name__}")
    counter = FlopCounterMode(display=False)
    with _eval_no_grad(model), counter:
        model(example_input)
    return counter


def count_flops(model: nn.Module, example_input: Tensor) -> int:
    """FLOPs of one forward pass of ``model`` on ``example_input`` (FLOPs = 2 x MACs).

    The count is for the whole batch: divide by the batch size for per-image FLOPs. The forward
    runs in eval mode under ``torch.no_grad()``; every module's mode is restored afterwards.

    Args:
        model: any module; SCOP-mode :class:`~scop_ext.layers.ScopConv2d` layers are counted
            as their convolution over the paired batch.
        example_input: (N, C, H, W) input (2N paired images for a model in SCOP mode).

    Returns:
        Total FLOPs (int).
    """
    return _run(model, example_input).get_total_flops()


def count_macs(model: nn.Module, example_input: Tensor) -> int:
    """Multiply-accumulates (MACs) of one forward pass: :func:`count_flops` / 2."""
    return count_flops(model, example_input) // 2


def count_params(model: nn.Module) -> int:
    """Number of parameter elements of ``model`` (shared parameters counted once, buffers not
    counted; a SCOP-mode layer's ``beta`` is a parameter and is counted)."""
    return sum(p.numel() for p in model.parameters())


def flops_by_module(model: nn.Module, example_input: Tensor) -> dict[str, int]:
    """FLOPs (= 2 x MACs) of one forward pass, per module, exclusive of its submodules.

    Each entry is what ran in that module's own ``forward`` (not in a child's), so for a CNN the
    entries are its convolutions and linear layers and the values sum to :func:`count_flops`
    (the root module is ``""``).

    Returns:
        ``{qualified module name: FLOPs}`` for modules with non-zero FLOPs, in module order.
    """
    counts = _run(model, example_input).get_flop_counts()
    root = type(model).__name__
    inclusive = {}
    for name, _ in model.named_modules():
        key = f"{root}.{name}" if name else root
        inclusive[name] = sum(counts.get(key, {}).values())
    exclusive = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        own = inclusive[name] - sum(inclusive[prefix + child] for child, _ in module.named_children())
        if own:
            exclusive[name] = own
    return exclusive
