"""Lemma 2 of the SCOP supplement (§S1): knockoff bias pairs that keep a layer's output a
second-order knockoff of its input, and :class:`KnockoffBias`, the bias a ScopConv2d adds.

For a linear map with weight ``W`` (per-location view of a convolution: ``(C_in k k, C_out)``)
and an input knockoff of diagonal ``s_in``, the bias pair ``[b, b~]`` must have covariance (S.1)::

    [[Sigma_b, Sigma_b + M - S'], [Sigma_b + M - S', Sigma_b]],   M = W^T diag(s_in) W

which is PSD iff (S.5): ``S' >= M`` and ``2 Sigma_b >= S' - M``. We take the seed's choice
``S' = (lambda_max(M) + gamma) I`` and ``Sigma_b = (S' - M) / 2 + gamma I``. With ``D = S' - M``
the pair ``b = sqrt(gamma) z1 + R z2``, ``b~ = sqrt(gamma) z1 - R z2`` with ``R R^T = D / 2`` has
exactly that covariance (docs/design.md, Lemma 2), which is what :func:`scop_ext.lemma2_sample` draws.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..ops import reference
from ..ops.lemma2_sample import draw_seed, lemma2_sample

__all__ = ["KnockoffBias", "Lemma2Solution", "knockoff_gram", "solve", "s5_margins", "estimate_s", "bias_covariance"]


def knockoff_gram(weight: Tensor, s_in: Tensor, groups: int = 1) -> Tensor:
    """``M = W^T diag(s_in) W`` for a conv weight, in float64.

    Args:
        weight: (C_out, C_in / groups, kH, kW); each input channel's ``s`` repeats over its taps.
        s_in: (C_in,) knockoff diagonal of the layer input, >= 0.

    Returns:
        (C_out, C_out); block diagonal over groups, since a filter only sees its group's inputs.
    """
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D (C_out, C_in/groups, kH, kW), got shape {tuple(weight.shape)}")
    c_out, c_in_g = weight.shape[:2]
    if s_in.dim() != 1 or s_in.shape[0] != c_in_g * groups:
        raise ValueError(f"s_in must have shape ({c_in_g * groups},) (one per input channel), got {tuple(s_in.shape)}")
    if c_out % groups:
        raise ValueError(f"weight's {c_out} output channels are not divisible by groups={groups}")
    w = weight.detach().to(torch.float64).cpu()
    s = s_in.detach().to(torch.float64).cpu()
    c_out_g = c_out // groups
    m = torch.zeros(c_out, c_out, dtype=torch.float64)
    for g in range(groups):
        rows = slice(g * c_out_g, (g + 1) * c_out_g)
        wg = w[rows].reshape(c_out_g, c_in_g, -1)  # (out, in, taps)
        sg = s[g * c_in_g : (g + 1) * c_in_g]
        m[rows, rows] = torch.einsum("oit,i,pit->op", wg, sg, wg)
    return m


def bias_covariance(m: Tensor, s_out: Tensor, sigma_b: Tensor) -> Tensor:
    """The joint covariance (S.1) of ``[b, b~]``, (2C, 2C)."""
    cross = sigma_b + m - torch.diag(s_out)
    return torch.cat([torch.cat([sigma_b, cross], 1), torch.cat([cross, sigma_b], 1)], 0)


def s5_margins(m: Tensor, s_out: Tensor, sigma_b: Tensor) -> tuple[float, float]:
    """Smallest eigenvalues of the two (S.5) conditions: ``S' - M`` and ``2 Sigma_b - (S' - M)``.

    Both are >= 0 exactly when the bias covariance (S.1) is PSD.
    """
    d = torch.diag(s_out) - m
    return (
        float(torch.linalg.eigvalsh(d).min()),
        float(torch.linalg.eigvalsh(2 * sigma_b - d).min()),
    )


@dataclass
class Lemma2Solution:
    """Everything Lemma 2 gives for one layer (all float64, on the CPU).

    Attributes:
        M: (C, C) ``W^T diag(s_in) W``.
        lambda_max: largest eigenvalue of M.
        gamma: the constant of the seed's choice.
        s_out: (C,) diagonal of ``S' = (lambda_max + gamma) I``: the output knockoff diagonal.
        sigma_b: (C, C) ``(S' - M) / 2 + gamma I``.
        R: (C, C) symmetric square root of ``(S' - M) / 2``.
        margin: min of :func:`s5_margins`; ``>= 0`` (up to rounding) means (S.5) holds.
    """

    M: Tensor
    lambda_max: float
    gamma: float
    s_out: Tensor
    sigma_b: Tensor
    R: Tensor
    margin: float

    def covariance(self) -> Tensor:
        """The (S.1) covariance this solution's bias pair has, (2C, 2C)."""
        return bias_covariance(self.M, self.s_out, self.sigma_b)


# Smallest gamma relative to lambda_max(M). eigh is accurate to ~1e-16 lambda_max; with a smaller
# gamma rounding could turn (S.1) indefinite and the sampler would draw from another covariance.
_GAMMA_FLOOR = 1e-10


def solve(weight: Tensor, s_in: Tensor, gamma: float | None = None, groups: int = 1) -> Lemma2Solution:
    """Lemma 2 for one conv layer with the seed's choice of ``S'`` and ``Sigma_b``.

    Args:
        weight: (C_out, C_in / groups, kH, kW).
        s_in: (C_in,) knockoff diagonal at the layer input, >= 0 (see :func:`estimate_s`, which
            clips its sampling error at 0).
        gamma: the small positive constant; default ``1e-3 * lambda_max`` (1e-6 if M is 0), and
            never below ``1e-10 * lambda_max`` (raised with a warning).
        groups: as in ``nn.Conv2d``.
    """
    if not isinstance(s_in, Tensor):
        raise ValueError(f"s_in must be a (C_in,) tensor of knockoff variances, got {type(s_in).__name__}")
    s_in = s_in.detach().to(torch.float64).cpu()
    if not bool(torch.isfinite(s_in).all()):
        raise ValueError("s_in contains NaN or Inf")
    if bool((s_in < 0).any()):
        raise ValueError(f"s_in must be >= 0 (each entry is a variance, Var(X_j) - Cov(X_j, X~_j)), got a minimum of "
                         f"{float(s_in.min()):.3g}")
    m = knockoff_gram(weight, s_in, groups)
    if not bool(torch.isfinite(m).all()):
        raise ValueError("weight contains NaN or Inf")
    m = (m + m.T) / 2
    evals, evecs = torch.linalg.eigh(m)
    lam_max = max(float(evals[-1]), 0.0)
    if lam_max == 0:
        warnings.warn("M = W^T diag(s_in) W is zero (all-zero weights, or s_in = 0 as constant pixels give): "
                      "the knockoff biases reduce to shared noise of variance gamma", stacklevel=2)
    if gamma is None:
        gamma = 1e-3 * lam_max if lam_max > 0 else 1e-6
    gamma = float(gamma)
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    if gamma < _GAMMA_FLOOR * lam_max:
        warnings.warn(f"gamma={gamma:.3g} is below the numerical floor {_GAMMA_FLOOR:g} x lambda_max(M) = "
                      f"{_GAMMA_FLOOR * lam_max:.3g}, where rounding can make (S.1) indefinite; using the floor",
                      stacklevel=2)
        gamma = _GAMMA_FLOOR * lam_max
    c = m.shape[0]
    s_out = torch.full((c,), lam_max + gamma, dtype=torch.float64)
    half_d = ((lam_max + gamma - evals) / 2).clamp_min(0)  # eigenvalues of (S' - M) / 2
    r = (evecs * half_d.sqrt()) @ evecs.T
    sigma_b = torch.diag(s_out) / 2 - m / 2 + gamma * torch.eye(c, dtype=torch.float64)
    margin = min(s5_margins(m, s_out, sigma_b))
    if margin < -1e-9 * max(lam_max, 1.0):
        warnings.warn(f"Lemma 2 condition (S.5) violated by {margin:.3g}: the bias sampler is not PSD", stacklevel=2)
    return Lemma2Solution(M=m, lambda_max=lam_max, gamma=gamma, s_out=s_out, sigma_b=sigma_b, R=r, margin=margin)


def estimate_s(real: Tensor, knockoff: Tensor) -> Tensor:
    """Per-channel knockoff diagonal ``s_j = Var(X_j) - Cov(X_j, X~_j)`` from paired samples.

    Args:
        real, knockoff: (N, C, ...) paired features; statistics pool over the batch and every
            position of a channel.

    Returns:
        (C,) float64, clipped at 0 (a negative value is sampling error: s must be >= 0).
    """
    if real.shape != knockoff.shape:
        raise ValueError(f"real and knockoff must have the same shape, got {tuple(real.shape)} and {tuple(knockoff.shape)}")
    if real.dim() < 2 or real.shape[0] < 2:
        raise ValueError(f"need (N, C, ...) with N >= 2, got shape {tuple(real.shape)}")
    c = real.shape[1]
    x = real.detach().to(torch.float64).transpose(0, 1).reshape(c, -1)
    xk = knockoff.detach().to(torch.float64).transpose(0, 1).reshape(c, -1)
    x = x - x.mean(1, keepdim=True)
    xk = xk - xk.mean(1, keepdim=True)
    count = x.shape[1] - 1
    var = (x * x).sum(1) / count
    cov = (x * xk).sum(1) / count
    return (var - cov).clamp_min(0).cpu()


class KnockoffBias(nn.Module):
    """The Lemma 2 knockoff bias one :class:`~scop_ext.nn.ScopConv2d` adds: its factor ``R`` and
    ``gamma`` (buffers, absent until fitted) and where each step's draw of ``[b, b~]`` comes from.

    Args:
        channels: C_out of the layer.

    Attributes:
        R: (C, C) buffer, the Lemma 2 factor (``R R^T = (S' - M) / 2``), or None.
        gamma: 0-d buffer, the shared variance, or None.
        enabled: whether the layer adds the bias (when fitted).
        generator: the ``torch.Generator`` each draw's Philox key comes from (None: torch's default).
        shard: ``(rank, world)``: under data parallelism every process draws the pairs of the
            global batch from an identically seeded generator and keeps its own rows, so the
            numbers do not depend on how many processes share the batch.
        key_ahead: a one-element int64 tensor a compiled stage 2 fills with each step's key
            before the step (a ``torch.Generator`` draw cannot be traced), or None.
    """

    R: Tensor | None
    gamma: Tensor | None

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.register_buffer("R", None)
        self.register_buffer("gamma", None)
        self.enabled = True
        self.generator: torch.Generator | None = None
        self.shard = (0, 1)
        self.key_ahead: Tensor | None = None
        self.key_taken = False  # set by the draw that used key_ahead; reset before each step
        # gamma as a Python float: reading the buffer in forward would be a data-dependent scalar
        # that torch.compile cannot trace without a graph break.
        self._gamma = 0.0

    @property
    def fitted(self) -> bool:
        return self.R is not None

    def fit(self, weight: Tensor, s_in: Tensor, gamma: float | None = None, groups: int = 1) -> Lemma2Solution:
        """Solve Lemma 2 (:func:`solve`) for ``weight`` and keep ``R`` and ``gamma``."""
        solution = solve(weight, s_in, gamma, groups)
        self.set(solution.R, solution.gamma, like=weight)
        return solution

    def set(self, R: Tensor, gamma: float, like: Tensor) -> None:
        """Keep ``R`` (C, C) and ``gamma`` >= 0, in ``like``'s dtype and on its device."""
        if not isinstance(R, Tensor) or R.shape != (self.channels, self.channels):
            raise ValueError(f"R must be a tensor of shape ({self.channels}, {self.channels}), "
                             f"got {tuple(R.shape) if isinstance(R, Tensor) else type(R).__name__}")
        if not bool(torch.isfinite(R).all()):
            raise ValueError("R must be finite")
        gamma = float(gamma)
        if not (gamma >= 0 and math.isfinite(gamma)):
            raise ValueError(f"gamma must be finite and >= 0, got {gamma}")
        opts = dict(dtype=like.dtype, device=like.device)
        self.R = R.detach().to(**opts).clone()
        self.gamma = torch.tensor(gamma, **opts)
        self._gamma = gamma

    def clear(self) -> None:
        """Forget ``R`` and ``gamma``: no bias until the next fit or set."""
        self.R = None
        self.gamma = None
        self._gamma = 0.0

    def draw(self, n: int) -> Tensor | None:
        """This process's (n, 2, C) pairs ``[b, b~]`` for n real images, or None when no bias is
        added. One draw advances :attr:`generator` once."""
        if not (self.enabled and self.fitted):
            return None
        rank, world = self.shard
        if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
            # the same Philox draw in plain ops, which inductor fuses into one vectorised loop
            key = draw_seed(self.generator) if self.key_ahead is None else self._take_key()
            pairs = reference.lemma2_sample(self.R, self._gamma, n * world, key)
        else:
            pairs = lemma2_sample(self.R, self._gamma, n * world, generator=self.generator)
        return pairs[rank * n: (rank + 1) * n] if world > 1 else pairs

    def _take_key(self) -> Tensor:
        if self.key_taken:  # eager would draw a second key; reusing the first would be silently wrong
            raise RuntimeError("a ScopConv2d ran twice in one compiled stage-2 forward (a shared layer): "
                               "learn_scales(compile=True) draws one key per layer and step; use compile=False")
        self.key_taken = True
        return self.key_ahead

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Materialise what the checkpoint carries, so a fitted layer reloads its factor.
        if self.R is None and prefix + "R" in state_dict:
            self.R = torch.empty(self.channels, self.channels)
        if self.gamma is None and prefix + "gamma" in state_dict:
            self.gamma = torch.empty(())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.gamma is not None:
            self._gamma = float(self.gamma)

    def extra_repr(self) -> str:
        state = f"gamma={self._gamma:.3g}" if self.fitted else "not fitted"
        return f"{self.channels}, {'on' if self.enabled else 'off'}, {state}"
