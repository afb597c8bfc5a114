"""Plain-PyTorch versions of every scop operator.

They define what the compiled kernels must compute: tests compare the kernels against these,
and the benchmarks time them (eagerly and under ``torch.compile``) as the baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["dual_scaled_conv2d", "philox4x32_10", "philox_normal", "lemma2_sample"]


def dual_scaled_conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    beta: Tensor,
    knockoff_bias: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
) -> Tensor:
    """Two-branch SCOP convolution written the obvious way (see ``scop_ext.dual_scaled_conv2d``)."""
    y = F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    y_real, y_knock = y.chunk(2)
    if knockoff_bias is not None:
        y_real = y_real + knockoff_bias[:, 0, :, None, None]
        y_knock = y_knock + knockoff_bias[:, 1, :, None, None]
    b = beta.view(1, -1, 1, 1)
    # Under autocast y is in the region's dtype and beta is not: mix in the wider one and round
    # once, as the kernels do.
    return torch.cat([b * y_real + (1 - b) * y_knock, y_knock]).to(y.dtype)


_MASK32 = 0xFFFFFFFF


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    # 32x32 -> 64-bit product from 16-bit halves, so int64 never overflows.
    a_lo, a_hi = a & 0xFFFF, a >> 16
    b_lo, b_hi = b & 0xFFFF, b >> 16
    mid = a_hi * b_lo + a_lo * b_hi
    low = a_lo * b_lo + ((mid & 0xFFFF) << 16)
    hi = (a_hi * b_hi + (mid >> 16) + (low >> 32)) & _MASK32
    return hi, low & _MASK32


def philox4x32_10(counter: tuple[Tensor, Tensor, Tensor, Tensor], key: tuple[int, int]):
    """Philox4x32-10 on int64 tensors holding 32-bit words; returns the four output words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_ in range(10):
        if round_:
            k0 = (k0 + 0x9E3779B9) & _MASK32
            k1 = (k1 + 0xBB67AE85) & _MASK32
        hi0, lo0 = _mulhilo(0xD2511F53, c0)
        hi1, lo1 = _mulhilo(0xCD9E8D57, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox_normal(numel: int, seed: int | Tensor, device=None) -> Tensor:
    """``numel`` standard normals (float64) of the stream keyed on ``seed`` (an int, or a one-element
    int64 tensor, which torch.compile traces without specialising on it), as the kernels draw them."""
    blocks = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device)
    if isinstance(seed, Tensor):
        seed = seed.to(blocks.device)
    zero = torch.zeros_like(blocks)
    x, y, z, w = philox4x32_10((blocks & _MASK32, blocks >> 32, zero, zero), (seed & _MASK32, (seed >> 32) & _MASK32))
    u = [(v.double() + 0.5) / 4294967296.0 for v in (x, y, z, w)]
    r0 = torch.sqrt(-2.0 * torch.log(u[0]))
    r1 = torch.sqrt(-2.0 * torch.log(u[2]))
    a0, a1 = 2 * torch.pi * u[1], 2 * torch.pi * u[3]
    out = torch.stack([r0 * torch.cos(a0), r0 * torch.sin(a0), r1 * torch.cos(a1), r1 * torch.sin(a1)], 1)
    return out.reshape(-1)[:numel]


def lemma2_sample(R: Tensor, gamma: float, n: int, seed: int | Tensor) -> Tensor:
    """[b, b~] of shape (n, 2, C): ``b = sqrt(gamma) z1 + R z2``, ``b~ = sqrt(gamma) z1 - R z2``."""
    c = R.shape[0]
    z = philox_normal(n * 2 * c, seed, device=R.device).to(R.dtype).view(n, 2, c)
    shared = z[:, 0] * gamma**0.5
    rotated = z[:, 1] @ R.T
    return torch.stack([shared + rotated, shared - rotated], 1)
