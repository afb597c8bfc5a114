"""``scop::lemma2_sample``: Lemma 2's knockoff bias pairs ``[b, b~]`` drawn from Philox normals.

The Python wrapper (argument checks in :mod:`.checks`), the key it draws from a
``torch.Generator`` (:func:`draw_seed`), the fake kernel, the autocast rule and the autograd
formula. The kernels are ``csrc/cpu/lemma2_sample.cpp`` and ``csrc/cuda/lemma2_sample.cu``; the
plain-PyTorch twin, Philox stream included, is :func:`.reference.lemma2_sample`.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from . import loader  # noqa: F401  (loads the library that defines the ops)
from .checks import AUTOCAST_DEVICES, is_int, require_kernel_dtype, require_tensor

__all__ = ["lemma2_sample", "draw_seed"]


def _lemma2_autocast(device_type: str):
    # Without an Autocast kernel the op would run inside the region, and the matmul of its
    # combine step in 16 bits: the same seed would give other numbers. It runs in R's dtype.
    def kernel(R, gamma, n, seed):
        with torch.autocast(device_type, enabled=False):
            return torch.ops.scop.lemma2_sample.default(R, gamma, n, seed)

    return kernel


_autocast_lib = torch.library.Library("scop", "IMPL")
for _device, _key in AUTOCAST_DEVICES.items():
    _autocast_lib.impl("lemma2_sample", _lemma2_autocast(_device), _key)


def draw_seed(generator: torch.Generator | None = None) -> Tensor:
    """A fresh 62-bit Philox key drawn from ``generator`` (torch's default CPU generator if None).

    Returned as a one-element int64 CPU tensor, which is what the sampler takes, so compiled
    graphs do not specialise on its value.
    """
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, generator=generator, device=device).cpu()


def lemma2_sample(
    R: Tensor,
    gamma: float,
    n: int,
    *,
    generator: torch.Generator | None = None,
    seed: int | Tensor | None = None,
) -> Tensor:
    """Draws knockoff bias pairs ``[b, b~]`` with the joint covariance of Lemma 2 (seed eq. S.1).

    ``b = sqrt(gamma) z1 + R z2`` and ``b~ = sqrt(gamma) z1 - R z2`` with z1, z2 ~ N(0, I_C), so
    ``cov(b) = cov(b~) = gamma I + R R^T`` and ``cov(b, b~) = gamma I - R R^T``. With ``R`` and
    ``gamma`` from :func:`scop_ext.lemma2.solve` that is exactly (S.1).

    Normals come from Philox4x32-10 keyed on ``seed``; the same seed gives the same draws run to
    run and on every device (the same Philox bits; CUDA's float64 log/sin/cos may differ from the
    CPU's in the last ulp). Without ``seed`` a key is drawn from ``generator``. The key is read on
    the host, so CUDA graph capture is refused: every replay would repeat the captured draw.

    Args:
        R: (C, C) floating point, on the device the result should be on.
        gamma: shared variance, >= 0.
        n: number of sample pairs (the real batch size N).

    Returns:
        (n, 2, C) with ``[:, 0] = b`` and ``[:, 1] = b~``, R's dtype and device.
    """
    require_tensor("R", R, 2)
    if R.shape[0] != R.shape[1]:
        raise ValueError(f"R must be square (C, C), got shape {tuple(R.shape)}")
    require_kernel_dtype("R", R)
    if isinstance(gamma, bool) or not isinstance(gamma, (numbers.Real, torch.SymFloat)):
        raise ValueError(f"gamma must be a number, got {gamma!r}")
    gamma = float(gamma)
    if not (gamma >= 0.0 and gamma != float("inf")):
        raise ValueError(f"gamma must be finite and >= 0, got {gamma}")
    if not (is_int(n) or isinstance(n, torch.SymInt)) or (is_int(n) and n < 0):
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if R.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # The key is read on the host (and draw_seed syncs the GPU): a graph would replay one draw.
        raise RuntimeError(
            "lemma2_sample cannot run during CUDA graph capture: its Philox key is read on the host, "
            "so every replay would repeat the captured [b, b~]; draw the knockoff bias outside the graph"
        )
    if seed is None:
        seed = draw_seed(generator)
    elif is_int(seed):
        if not -(2**63) <= seed < 2**63:
            raise ValueError(f"seed must fit in int64 (the Philox key is 64 bits), got {seed}")
        seed = torch.tensor([seed], dtype=torch.int64)
    if not (isinstance(seed, Tensor) and seed.numel() == 1 and seed.dtype == torch.int64 and seed.device.type == "cpu"):
        raise ValueError("seed must be an int or a one-element int64 CPU tensor")
    return torch.ops.scop.lemma2_sample.default(R, gamma, n, seed)


@torch.library.register_fake("scop::lemma2_sample")
def _lemma2_sample_fake(R, gamma, n, seed):
    torch._check(R.dim() == 2 and R.shape[0] == R.shape[1], lambda: "R must be square")
    torch._check(seed.device.type == "cpu", lambda: "seed must be a CPU tensor")
    return R.new_empty((n, 2, R.shape[0]))


def _lemma2_setup_context(ctx, inputs, output):
    _, _, n, seed = inputs
    ctx.n = n
    ctx.save_for_backward(seed)


def _lemma2_backward(ctx, grad):
    (seed,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    c = grad.shape[2]
    # With R = I and gamma = 0 the sampler returns [z2, -z2]: the same z2 as the forward drew.
    eye = torch.eye(c, dtype=grad.dtype, device=grad.device)
    z2 = torch.ops.scop.lemma2_sample.default(eye, 0.0, ctx.n, seed)[:, 0]
    # In R's dtype, as the forward: a backward run inside an autocast region would do this
    # matmul in 16 bits.
    with torch.autocast(grad.device.type, enabled=False):
        return (grad[:, 0] - grad[:, 1]).T @ z2, None, None, None


torch.library.register_autograd("scop::lemma2_sample", _lemma2_backward, setup_context=_lemma2_setup_context)
