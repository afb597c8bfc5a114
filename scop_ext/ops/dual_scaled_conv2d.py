"""``scop::dual_scaled_conv2d`` and its private backward ``scop::_dual_mix_backward``: the Python
wrapper (argument checks in :mod:`.checks`), the fake kernels that let ``torch.compile`` and
``torch.export`` trace it, the autocast rule and the autograd formula. The kernels are
``csrc/cpu/dual_scaled_conv2d.cpp`` and ``csrc/cuda/dual_scaled_conv2d.cu``; the plain-PyTorch
twin is :func:`.reference.dual_scaled_conv2d`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import loader  # noqa: F401  (loads the library that defines the ops)
from .checks import (
    AUTOCAST_DEVICES,
    autocast_dtype,
    check_dual_conv_args,
    conv_out_size,
)

__all__ = ["dual_scaled_conv2d", "conv_input_grad"]


# ------------------------------------------------------------------------------ kernel layout


def _memory_format(t: Tensor) -> torch.memory_format:
    """The layout the kernels compute in (mirrors ``scop::dual_memory_format`` in csrc/dual_scaled_conv2d.cpp)."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels accumulate in (``at::opmath_type``)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ------------------------------------------------------------------------------------ autocast


def _dual_autocast(device_type: str):
    # torch.library.register_autocast casts to one dtype fixed at registration; this follows the
    # region's dtype instead (bfloat16 under autocast("cuda", dtype=torch.bfloat16)), like conv2d.
    def kernel(input, weight, bias, beta, knockoff_bias, *conv_args):
        tensors = [None if t is None else t.to(autocast_dtype(t)) for t in (input, weight, bias, beta, knockoff_bias)]
        with torch.autocast(device_type, enabled=False):
            return torch.ops.scop.dual_scaled_conv2d.default(*tensors, *conv_args)

    return kernel


_autocast_lib = torch.library.Library("scop", "IMPL")
for _device, _key in AUTOCAST_DEVICES.items():
    _autocast_lib.impl("dual_scaled_conv2d", _dual_autocast(_device), _key)


# --------------------------------------------------------------- fused dual-branch convolution


def dual_scaled_conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    beta: Tensor,
    knockoff_bias: Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> Tensor:
    """SCOP's dual-branch scaled convolution over a paired batch (DESIGN.md §1, stage 2).

    With ``Y = conv(input, weight)`` split into its real half ``Y_r`` and knockoff half ``Y_k``,
    conv bias ``c`` and knockoff bias pair ``[b, b~]``::

        out[:N] = beta * (Y_r + c + b) + (1 - beta) * (Y_k + c + b~)
        out[N:] = Y_k + c + b~

    One ATen convolution over all 2N images, then one fused pass. The backward never computes
    a weight gradient unless ``weight`` requires grad. Inside ``torch.autocast`` float32 and
    float16 operands are cast to the region's dtype first, as for ``conv2d``.

    Args:
        input: (2N, C_in, H, W); images 0..N-1 are real, N..2N-1 their knockoffs.
        weight: (C_out, C_in / groups, kH, kW).
        bias: (C_out,) or None.
        beta: (C_out,) per-filter scale of the real branch; the knockoff branch gets 1 - beta.
        knockoff_bias: (N, 2, C_out) or None: ``[:, 0]`` is b, ``[:, 1]`` is b~ (see
            :func:`lemma2_sample`), broadcast over H x W.
        stride, padding, dilation, groups: as in :func:`torch.nn.functional.conv2d`
            (numeric padding only).

    Returns:
        (2N, C_out, H_out, W_out), channels_last when ``input`` is.
    """
    stride, padding, dilation = check_dual_conv_args(input, weight, bias, beta, knockoff_bias, stride, padding,
                                                     dilation, groups)
    save_diff = torch.is_grad_enabled() and beta.requires_grad
    out, _ = torch.ops.scop.dual_scaled_conv2d.default(
        input, weight, bias, beta, knockoff_bias, stride, padding, dilation, groups, save_diff
    )
    return out


@torch.library.register_fake("scop::dual_scaled_conv2d")
def _dual_scaled_conv2d_fake(input, weight, bias, beta, knockoff_bias, stride, padding, dilation, groups, save_diff):
    torch._check(input.dim() == 4 and weight.dim() == 4, lambda: "input and weight must be 4-D")
    torch._check(input.shape[0] % 2 == 0, lambda: "input batch must be 2N")
    torch._check(input.shape[1] == weight.shape[1] * groups, lambda: "input channels do not match weight")
    torch._check(beta.shape == (weight.shape[0],), lambda: "beta must have one entry per output channel")
    # A meta tensor among CPU ones dispatches here, so this kernel must refuse what the real ones refuse.
    torch._check(
        all(t.device == input.device for t in (weight, bias, beta, knockoff_bias) if t is not None),
        lambda: "input, weight, bias, beta and knockoff bias must be on one device",
    )
    n2, _, h, w = input.shape
    c_out, _, kh, kw = weight.shape
    h_out = conv_out_size(h, kh, stride[0], padding[0], dilation[0])
    w_out = conv_out_size(w, kw, stride[1], padding[1], dilation[1])
    fmt = _memory_format(input)
    out = torch.empty((n2, c_out, h_out, w_out), dtype=input.dtype, device=input.device, memory_format=fmt)
    if save_diff:
        diff = torch.empty((n2 // 2, c_out, h_out, w_out), dtype=input.dtype, device=input.device, memory_format=fmt)
    else:
        diff = input.new_empty((0,))
    return out, diff


@torch.library.register_fake("scop::_dual_mix_backward")
def _dual_mix_backward_fake(grad_out, beta, diff, need_beta, need_sums):
    torch._check(grad_out.dim() == 4 and grad_out.shape[0] % 2 == 0, lambda: "grad_out must be (2N, C, H, W)")
    torch._check(
        beta.device == grad_out.device and (not need_beta or diff.device == grad_out.device),
        lambda: "grad_out, beta and diff must be on one device",
    )
    n2, c = grad_out.shape[:2]
    grad_y = torch.empty_like(grad_out, memory_format=_memory_format(grad_out))
    grad_beta = beta.new_empty((c,) if need_beta else (0,))
    sums = grad_out.new_empty((n2, c) if need_sums else (0,), dtype=_opmath_dtype(grad_out.dtype))
    return grad_y, grad_beta, sums


def conv_input_grad(grad_y: Tensor, weight: Tensor, input_shape: Sequence[int], stride, padding, dilation,
                    groups: int) -> Tensor:
    """The gradient of ``conv2d(input, weight)`` with respect to an input of shape ``input_shape``,
    (N, C_in, H, W), from the output gradient ``grad_y`` (N, C_out, H_out, W_out) and the weight.

    Used when the input was not saved (the weight is frozen): convolution_backward would want it,
    and a broadcast stand-in gets materialised at full size inside ATen; the transposed
    convolution computes the same gradient from the weight and the shape alone.
    """
    output_padding = [
        input_shape[2 + i]
        - ((grad_y.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (weight.shape[2 + i] - 1) + 1)
        for i in range(2)
    ]
    return torch.ops.aten.conv_transpose2d.input(grad_y, weight, None, stride, padding, output_padding, groups, dilation)


def _dual_setup_context(ctx, inputs, output):
    input, weight, _bias, _beta, _knockoff_bias, stride, padding, dilation, groups, save_diff = inputs
    _, diff = output
    ctx.conv_args = (stride, padding, dilation, groups)
    # The flag, not diff.numel(): an empty batch (N = 0) saves an empty diff too.
    ctx.saved_diff = save_diff
    ctx.input_shape = input.shape
    ctx.batch, ctx.channels = input.shape[0] // 2, weight.shape[0]
    need_input, need_weight, _, need_beta = ctx.needs_input_grad[:4]
    # Keep only what the requested gradients read: the input only for a weight gradient, the
    # branch difference only for grad_beta.
    ctx.save_for_backward(
        input if need_weight else None,
        weight if (need_input or need_weight) else None,
        inputs[3],
        diff if need_beta else None,
    )
    ctx.mark_non_differentiable(diff)
    # diff never has a gradient: without this autograd hands the backward a zero-filled tensor of
    # its size, an (N, C, H, W) fill per conv and step for nothing.
    ctx.set_materialize_grads(False)


def _dual_backward(ctx, grad_out, _grad_diff):
    if grad_out is None:  # the output was not used (grads are not materialised)
        return (None,) * 10
    input, weight, beta, diff = ctx.saved_tensors
    need_input, need_weight, need_bias, need_beta, need_knockoff_bias = ctx.needs_input_grad[:5]
    if need_beta and not ctx.saved_diff:
        raise RuntimeError(
            "beta requires grad but scop::dual_scaled_conv2d was called with save_diff=False; "
            "call scop_ext.dual_scaled_conv2d, which sets it"
        )
    stride, padding, dilation, groups = ctx.conv_args
    grad_y, grad_beta, sums = torch.ops.scop._dual_mix_backward.default(
        grad_out, beta, diff if need_beta else grad_out.new_empty((0,)), need_beta, need_bias or need_knockoff_bias
    )
    grad_input = grad_weight = None
    if need_weight:
        grad_input, grad_weight, _ = torch.ops.aten.convolution_backward.default(
            grad_y, input, weight, None, stride, padding, dilation, False, [0, 0], groups,
            [need_input, True, False],
        )
    elif need_input:
        grad_input = conv_input_grad(grad_y, weight, ctx.input_shape, stride, padding, dilation, groups)
    # The sums come in opmath precision: reduce first, round to the parameters' dtype last.
    grad_bias = sums.sum(0).to(grad_out.dtype) if need_bias else None
    grad_knockoff_bias = sums.view(2, ctx.batch, ctx.channels).transpose(0, 1).to(grad_out.dtype) if need_knockoff_bias else None
    return grad_input, grad_weight, grad_bias, (grad_beta if need_beta else None), grad_knockoff_bias, None, None, None, None, None


torch.library.register_autograd("scop::dual_scaled_conv2d", _dual_backward, setup_context=_dual_setup_context)


def _refuse_double_backward(ctx, *grads):
    raise RuntimeError(
        "scop.dual_scaled_conv2d does not support double backward: a gradient taken with "
        "create_graph=True through it is being differentiated again. For higher-order gradients "
        "use scop_ext.reference.dual_scaled_conv2d, which is plain PyTorch."
    )


# A second-order graph through the fused op passes through its backward op. Without an autograd
# formula autograd would treat that op as a constant (a warning, then silently zero second-order
# terms); this one turns such a graph into an error, and only when it is actually differentiated.
torch.library.register_autograd("scop::_dual_mix_backward", _refuse_double_backward)
