"""Small pieces several test files share (kept out of conftest.py, which holds fixtures)."""

import torch


def layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """``x`` with the same values in the memory layout ``kind`` names."""
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "strided":  # a non-contiguous view: every other column of a wider tensor
        wide = torch.zeros(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]
    if kind == "transposed":  # H and W swapped in memory: neither NCHW nor NHWC
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    if kind != "contiguous":
        raise ValueError(f"kind must be contiguous, channels_last, strided or transposed, got {kind!r}")
    return x


def ar1(d: int, rho: float, scales: torch.Tensor | None = None) -> torch.Tensor:
    """(d, d) float64 AR(1) covariance ``rho^|i - j|``, rows and columns times ``scales`` when given."""
    idx = torch.arange(d)
    corr = rho ** (idx[:, None] - idx[None, :]).abs().to(torch.float64)
    if scales is None:
        return corr
    return corr * scales[:, None] * scales[None, :]
