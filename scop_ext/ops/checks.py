"""Argument checks: those of the operator wrappers in :mod:`scop_ext.ops`, and the count checks the
rest of the package shares. Each error names the argument and what was expected. The operator
checks compare dtypes as the kernels will see them, after autocast, so the autocast rule lives
here too."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["AUTOCAST_DEVICES", "KERNEL_DTYPES", "autocast_dtype", "check_counts", "check_dual_conv_args", "conv_out_size", "holds_data",
           "is_int", "pair", "require_kernel_dtype", "require_tensor", "same_dtype_device"]


def is_int(value) -> bool:
    # bool is an int subclass, but True as a stride or group count is a caller's mistake.
    return isinstance(value, int) and not isinstance(value, bool)


def pair(value, name: str, minimum: int) -> list[int]:
    if is_int(value):
        value = (value, value)
    if not (isinstance(value, Sequence) and len(value) == 2 and all(is_int(v) for v in value)):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {tuple(value)}")
    return [int(v) for v in value]


def require_tensor(name: str, t, dim: int | None = None) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")


# The dtypes the kernels in csrc/ dispatch on, per device; any other would fail inside them.
# A copy of the C++ dispatch lists, held to them by test_kernel_dtype_list_matches_the_kernels.
KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16),
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
}


def require_kernel_dtype(name: str, t: Tensor, dtype: torch.dtype | None = None) -> None:
    """``dtype``: what ``t`` reaches the kernel as, when that is not its own dtype (autocast)."""
    dtype = t.dtype if dtype is None else dtype
    supported = KERNEL_DTYPES.get(t.device.type)
    if supported is not None and dtype not in supported:
        what = f"dtype {dtype}" if dtype == t.dtype else f"dtype {t.dtype}, cast to {dtype} by autocast"
        raise ValueError(
            f"{name} has {what}, which the {t.device.type} kernel does not support; "
            f"use one of {', '.join(str(d) for d in supported)}"
        )


def same_dtype_device(ref_name: str, ref: Tensor, **others: Tensor | None) -> None:
    """Compares dtypes as the kernel will see them, after autocast (see autocast_dtype)."""
    ref_dtype = autocast_dtype(ref)
    for name, t in others.items():
        if t is None:
            continue
        if autocast_dtype(t) != ref_dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; they must match")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; they must match")


def holds_data(t: Tensor) -> bool:
    # Value checks need real data: skip them while tracing (fake/meta tensors, compile, export).
    return not torch.compiler.is_compiling() and type(t) in (Tensor, torch.nn.Parameter) and t.device.type != "meta"


def conv_out_size(size: int, k: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


AUTOCAST_DEVICES = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def autocast_dtype(t: Tensor) -> torch.dtype:
    """The dtype ``t`` reaches the fused convolution in: inside an autocast region for its device,
    float32 and float16 operands are cast to the region's dtype, as autocast does for ``conv2d``
    (float64 is left alone)."""
    device = t.device.type
    if (
        t.is_floating_point()
        and t.dtype != torch.float64
        and device in AUTOCAST_DEVICES
        and torch.is_autocast_enabled(device)
    ):
        return torch.get_autocast_dtype(device)
    return t.dtype


def check_dual_conv_args(input: Tensor, weight: Tensor, bias: Tensor | None, beta: Tensor,
                         knockoff_bias: Tensor | None, stride, padding, dilation, groups) -> tuple[list[int], ...]:
    """Check the arguments of :func:`scop_ext.dual_scaled_conv2d` (shapes there); returns stride,
    padding and dilation as pairs of ints."""
    require_tensor("input", input)
    if input.dim() != 4:
        raise ValueError(f"input must be 4-D (2N, C_in, H, W), got shape {tuple(input.shape)}")
    if input.shape[0] % 2:
        raise ValueError(
            f"input batch must be 2N (N real images then their N knockoffs), got odd size {input.shape[0]}"
        )
    require_kernel_dtype("input", input, autocast_dtype(input))
    require_tensor("weight", weight, 4)
    require_tensor("beta", beta, 1)
    stride = pair(stride, "stride", 1)
    padding = pair(padding, "padding", 0)
    dilation = pair(dilation, "dilation", 1)
    if not is_int(groups) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    c_out = weight.shape[0]
    if weight.shape[1] * groups != input.shape[1]:
        raise ValueError(
            f"input has {input.shape[1]} channels but weight of shape {tuple(weight.shape)} with "
            f"groups={groups} expects {weight.shape[1] * groups}"
        )
    if c_out % groups:
        raise ValueError(f"weight's {c_out} output channels are not divisible by groups={groups}")
    if beta.shape != (c_out,):
        raise ValueError(f"beta must have shape ({c_out},) (one per output channel), got {tuple(beta.shape)}")
    if bias is not None:
        require_tensor("bias", bias)
        if bias.shape != (c_out,):
            raise ValueError(f"bias must have shape ({c_out},), got {tuple(bias.shape)}")
    n = input.shape[0] // 2
    if knockoff_bias is not None:
        require_tensor("knockoff_bias", knockoff_bias)
        if knockoff_bias.shape != (n, 2, c_out):
            raise ValueError(
                f"knockoff_bias must have shape (N, 2, C_out) = ({n}, 2, {c_out}), got {tuple(knockoff_bias.shape)}"
            )
    same_dtype_device("input", input, weight=weight, bias=bias, beta=beta, knockoff_bias=knockoff_bias)
    for dim, name in ((2, "height"), (3, "width")):
        k = weight.shape[dim]
        size = conv_out_size(input.shape[dim], k, stride[dim - 2], padding[dim - 2], dilation[dim - 2])
        if size < 1:
            raise ValueError(
                f"input {name} {input.shape[dim]} is too small for a kernel of {k} with "
                f"padding {padding[dim - 2]} and dilation {dilation[dim - 2]}"
            )
    if holds_data(beta) and not bool(torch.isfinite(beta).all()):
        raise ValueError("beta contains NaN or Inf")
    return stride, padding, dilation


def check_counts(optional: bool = True, **values: Any) -> None:
    """Raise a ValueError naming the first of ``values`` that is not a positive int (or None,
    when ``optional``)."""
    for name, value in values.items():
        if optional and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int{' or None' if optional else ''}, got {value!r}")
