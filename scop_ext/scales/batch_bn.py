"""``bn: batch_detached``: BatchNorm over the paired 2N batch, as ``bn: batch``, with its batch
statistics held constant in the backward; an opt-in approximation of stage 2's exact gradient.

With ``bn: batch`` every BatchNorm normalises the real and the knockoff half with statistics
taken over both, so the exact gradient of the real loss runs through the statistics into the
knockoff half and back through all of its layers. Held constant (the same numbers in the
forward, no gradient through them), the statistics couple no samples in the backward, and then
the knockoff half of every activation is independent of beta: at each ScopConv2d it is
``Y_k + c + b~`` computed from the knockoff half of the input alone. Whatever gradient reaches
the knockoff half cannot reach a beta, so :func:`batch_detached` drops it:

- a BatchNorm in training mode runs the same kernel as ``bn: batch`` (bit for bit on the CPU:
  output, batch statistics and running-statistics update), and its backward is
  ``grad * weight * invstd`` per channel, with nothing of its input saved;
- a ScopConv2d runs the same fused operator over the 2N batch, and its backward reads only the
  real half of the incoming gradient: grad beta from the branch difference, and the input
  gradient of the real half alone (a transposed convolution over N images, not 2N); the knockoff
  half of the input gradient is left zero.

Both are substituted where the model calls them (``F.batch_norm``, ``scop::dual_scaled_conv2d``),
so the model's own forward code is untouched, whatever the architecture. The forward is the
same as ``bn: batch``'s; what the approximation does to beta is measured in benchmarks/README.md
(Stage-2 BatchNorm).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..ops.dual_scaled_conv2d import conv_input_grad

__all__ = ["batch_detached"]

_DUAL = torch.ops.scop.dual_scaled_conv2d.default
_DUAL_ARGS = [arg.name for arg in _DUAL._schema.arguments]


def _trains_beta_only(ctx, first: int, last: int, what: str) -> None:
    if any(ctx.needs_input_grad[first:last]):
        raise RuntimeError(f"bn='batch_detached' trains beta only, but {what} requires grad; use bn='batch'")


class _ConstantStatistics(torch.autograd.Function):
    """Training-mode batch norm whose backward treats the batch statistics as constants."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps):
        # the kernel F.batch_norm runs, which also returns the batch's 1 / sqrt(var + eps)
        out, _, invstd = torch.native_batch_norm(input, weight, bias, running_mean, running_var, True, momentum, eps)
        scale = invstd if weight is None else invstd * weight
        ctx.save_for_backward(scale.to(input.dtype))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        _trains_beta_only(ctx, 1, 3, "a BatchNorm weight or bias")
        (scale,) = ctx.saved_tensors
        shape = (1, -1) + (1,) * (grad_out.dim() - 2)
        return grad_out * scale.view(shape), None, None, None, None, None, None


class _KnockoffCut(torch.autograd.Function):
    """``scop::dual_scaled_conv2d`` whose backward skips the knockoff half (module docstring)."""

    @staticmethod
    def forward(ctx, input, weight, bias, beta, noise, stride, padding, dilation, groups, save_diff):
        out, diff = _DUAL(input, weight, bias, beta, noise, stride, padding, dilation, groups, save_diff)
        ctx.conv_args = (stride, padding, dilation, groups)
        ctx.input_shape = (input.shape[0] // 2, *input.shape[1:])
        ctx.save_for_backward(weight, beta, diff)
        ctx.mark_non_differentiable(diff)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for diff (see _ops)
        return out, diff

    @staticmethod
    def backward(ctx, grad_out, _grad_diff):
        _trains_beta_only(ctx, 1, 3, "a conv weight or bias")
        _trains_beta_only(ctx, 4, 5, "the knockoff bias")
        if grad_out is None:  # the output was not used
            return (None,) * 10
        weight, beta, diff = ctx.saved_tensors
        need_input, need_beta = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        real = grad_out[: ctx.input_shape[0]]
        grad_beta = grad_input = None
        if need_beta:
            if diff.numel() != real.numel():
                raise RuntimeError("beta requires grad but scop::dual_scaled_conv2d was called with save_diff=False")
            grad_beta = (real * diff).sum((0, 2, 3))
        if need_input:
            grad_real = conv_input_grad(real * beta.view(1, -1, 1, 1), weight, ctx.input_shape, *ctx.conv_args)
            grad_input = torch.cat([grad_real, torch.zeros_like(grad_real)])
        return grad_input, None, None, grad_beta, None, None, None, None, None, None


def _batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    if not training:  # eval-mode statistics are constants already
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return _ConstantStatistics.apply(input, weight, bias, running_mean, running_var, momentum, eps)


class _BatchDetached(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            return _batch_norm(*args, **kwargs)
        if func is _DUAL:  # autograd.Function.apply takes positional arguments only
            return _KnockoffCut.apply(*args, *(kwargs[name] for name in _DUAL_ARGS[len(args):]))
        return func(*args, **kwargs)


def batch_detached() -> TorchFunctionMode:
    """A context under which every forward builds ``bn: batch_detached``'s graph (module docstring).

    Only the forward needs to run inside it; the backward may run anywhere. BatchNorms in eval
    mode and everything other than ``F.batch_norm`` and the fused SCOP convolution run as usual.
    The result is meant for a loss of the real half only (the knockoff half's gradient is
    dropped), with only the betas trainable.

    Example::

        >>> with batch_detached():
        ...     logits = model(torch.cat([x, x_knockoff]))[: x.shape[0]]
        >>> F.cross_entropy(logits, y).backward()     # grad beta; no knockoff-half backward
    """
    return _BatchDetached()

