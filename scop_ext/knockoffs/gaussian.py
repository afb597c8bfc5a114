"""Gaussian second-order group knockoffs (model-X, Candès et al. 2018), the fast default.

Fit: mean and Ledoit-Wolf shrinkage covariance of the inputs at a working resolution. Choose a
block-diagonal ``S`` over pixel-block groups such that ``[[Sigma, Sigma - S], [Sigma - S, Sigma]]``
is PSD, then sample exactly from ``x~ | x ~ N(x - (x - mu) Sigma^-1 S, 2S - S Sigma^-1 S)``.

``S = blockdiag(gamma_g Sigma_gg)``. In the group-whitened coordinates
``W = D^-1/2 Sigma D^-1/2`` (``D = blockdiag(Sigma_gg)``) the constraint ``2 Sigma - S >= 0``
reads ``2 W - diag(gamma) >= 0``, so:

- ``"equi"`` (equicorrelated): one ``gamma = min(1, 2 lambda_min(W))`` for every group; with
  singleton groups this is the classic ``s = min(1, 2 lambda_min(corr)) diag(Sigma)``.
- ``"sdp"``: per-group ``gamma_g`` maximising ``sum_g |g| gamma_g`` (the group form of
  ``sum_j s_j`` on the correlation scale) subject to ``0 <= gamma <= 1``, ``2W >= diag(gamma)``;
  solved in :mod:`.sdp` (an interior-point method, O(d^3) per Newton step), so it is refused above
  :data:`~.sdp.SDP_MAX_DIM` working coordinates: use ``"equi"`` or a smaller ``working_size`` beyond.

Either way the chosen ``S`` is checked (``0 <= gamma <= 1``, ``2 Sigma - S >= 0`` up to rounding)
before the sampler is built, and an invalid one is an error.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor

from ..ops.checks import check_counts
from .base import (
    KnockoffGenerator,
    draw_normal,
    images_of,
    pixel_groups,
    resize,
    working_layout,
)
from .sdp import SDP_MAX_DIM, check_knockoff_s, group_whiten, knockoff_s, sdp_gammas

__all__ = ["GaussianKnockoffs", "ledoit_wolf", "equicorrelated_gamma"]


class _Moments:
    """One-pass sums for the mean, covariance and the Ledoit-Wolf fourth-moment term.

    Sums are taken around a shift ``c`` (the first batch's mean) for accuracy; the fourth-moment
    term ``sum_i ||x_i - mu||^4`` is expanded around ``c`` so a single pass suffices.
    """

    def __init__(self) -> None:
        self.n = 0

    def update(self, x: Tensor) -> None:
        """x: (B, d), any float dtype."""
        x = x.detach().to(torch.float64).cpu()
        if self.n == 0:
            d = x.shape[1]
            self.shift = x.mean(0)
            self.s1 = torch.zeros(d, dtype=torch.float64)
            self.s2 = torch.zeros(d, d, dtype=torch.float64)
            self.q = torch.zeros(d, dtype=torch.float64)
            self.r2 = 0.0
            self.r4 = 0.0
        z = x - self.shift
        sq = (z * z).sum(1)
        self.n += x.shape[0]
        self.s1 += z.sum(0)
        self.s2 += z.T @ z
        self.q += sq @ z
        self.r2 += float(sq.sum())
        self.r4 += float((sq * sq).sum())

    def finish(self) -> tuple[Tensor, Tensor, float]:
        """(mean, biased sample covariance, sum_i ||x_i - mean||^4)."""
        n = self.n
        delta = self.s1 / n
        cov = self.s2 / n - torch.outer(delta, delta)
        dd = float(delta @ delta)
        fourth = (
            self.r4
            + 4 * float(delta @ self.s2 @ delta)
            + n * dd * dd
            - 4 * float(self.q @ delta)
            + 2 * dd * self.r2
            - 4 * dd * float(self.s1 @ delta)
        )
        return self.shift + delta, (cov + cov.T) / 2, fourth


def ledoit_wolf(cov: Tensor, fourth: float, n: int) -> tuple[Tensor, float]:
    """Ledoit-Wolf shrinkage of a biased sample covariance towards ``(tr(cov) / d) I``.

    Args:
        cov: (d, d) biased sample covariance of ``n`` samples.
        fourth: ``sum_i ||x_i - mean||^4``.

    Returns:
        (shrunk covariance, shrinkage in [0, 1]); the same estimator as
        ``sklearn.covariance.ledoit_wolf``.
    """
    d = cov.shape[0]
    m = float(torch.diagonal(cov).sum()) / d
    frob2 = float((cov * cov).sum())
    spread = frob2 - m * m * d  # ||cov - m I||_F^2
    if spread <= 0:
        return cov.clone(), 0.0
    noise = max((fourth - n * frob2) / (n * n), 0.0)  # (1/n^2) sum_i ||x_i x_i^T - cov||_F^2
    shrinkage = min(noise / spread, 1.0)
    eye = torch.eye(d, dtype=cov.dtype)
    return (1 - shrinkage) * cov + shrinkage * m * eye, shrinkage


# Smallest eigenvalue kept in the covariance, relative to its mean variance: below it the group
# whitening and the Cholesky solve lose all precision (constant pixels or duplicated channels
# make the sample covariance singular; shrinkage 0 keeps it so).
_JITTER = 1e-6
# Absolute floor for data without any variance at all (every input identical).
_TINY_VARIANCE = 1e-12


def _regularise(cov: Tensor) -> Tensor:
    """``cov`` with its smallest eigenvalue raised to ``_JITTER`` times its mean variance.

    Warns when it has to add to the diagonal; returns ``cov`` unchanged otherwise.
    """
    scale = float(torch.diagonal(cov).mean())
    floor = _JITTER * scale if scale > 0 else _TINY_VARIANCE
    lam_min = float(torch.linalg.eigvalsh(cov)[0])
    if lam_min >= floor:
        return cov
    jitter = floor - lam_min
    warnings.warn(
        f"input covariance is singular or ill-conditioned (smallest eigenvalue {lam_min:.3g}, mean variance "
        f"{scale:.3g}; constant pixels or duplicated channels?): added {jitter:.3g} to its diagonal",
        stacklevel=4,  # the caller of fit() / from_covariance()
    )
    return cov + jitter * torch.eye(cov.shape[0], dtype=cov.dtype)


def equicorrelated_gamma(cov: Tensor, groups: Tensor) -> float:
    """``min(1, 2 lambda_min(D^-1/2 Sigma D^-1/2))``, the group equicorrelated choice."""
    lam = float(torch.linalg.eigvalsh(group_whiten(cov, groups))[0])
    return min(1.0, 2.0 * lam)


class GaussianKnockoffs(KnockoffGenerator):
    r"""Exact Gaussian group knockoffs at a working resolution.

    Args:
        shape: input shape without the batch, ``(C, H, W)`` or ``(d,)``; set by :meth:`fit`.
        block: swap-block edge in pixels at the working resolution (``(d,)`` inputs: group
            length); default 2 up to 32 pixels (see :func:`~scop_ext.knockoffs.base.working_layout`).
        working_size: images whose longer edge exceeds this are knockoffed at about that size,
            each edge a multiple of the block, and upsampled bilinearly; None keeps the input
            size. The covariance is d x d with ``d = C h w`` at the working size.
        method: ``"equi"`` or ``"sdp"`` (module docstring; ``"sdp"`` up to ``d =``
            :data:`SDP_MAX_DIM`).
        shrinkage: ``"ledoit-wolf"`` or a fixed weight in [0, 1] towards ``(tr / d) I``.

    Shape:
        - Input: :math:`(N, *shape)`.
        - Output: :math:`(N, *shape)`, same dtype and device as the input.

    Buffers (float64; ``d`` at the working size, ``G`` groups):
        mean (d,), cov (d, d), gamma (G,), proj (d, d) ``Sigma^-1 S``,
        noise_factor (d, d) ``L`` with ``L L^T = 2S - S Sigma^-1 S``,
        shrinkage () the weight used.
    """

    kind = "gaussian"

    def __init__(
        self,
        shape: tuple[int, ...] | list[int] | None = None,
        block: int | None = None,
        working_size: int | None = 32,
        method: str = "equi",
        shrinkage: str | float = "ledoit-wolf",
    ) -> None:
        super().__init__()
        if method not in ("equi", "sdp"):
            raise ValueError(f"method must be 'equi' or 'sdp', got {method!r}")
        if not (shrinkage == "ledoit-wolf" or (isinstance(shrinkage, (int, float)) and 0 <= shrinkage <= 1)):
            raise ValueError(f"shrinkage must be 'ledoit-wolf' or a number in [0, 1], got {shrinkage!r}")
        check_counts(block=block, working_size=working_size)
        self.method = method
        self.shrinkage_rule = shrinkage
        self.working_size = working_size
        self.block = block
        self.shape: tuple[int, ...] | None = None
        if shape is not None:
            self._set_shape(tuple(shape))

    # ------------------------------------------------------------------ structure

    def _set_shape(self, shape: tuple[int, ...]) -> None:
        if len(shape) == 3:
            work_hw, self.block = working_layout(shape[1:], self.working_size, self.block)
            self.work_shape = (shape[0], *work_hw)
        elif len(shape) == 1:
            self.work_shape = shape
            self.block = 1 if self.block is None else self.block
        else:
            raise ValueError(f"shape must be (C, H, W) or (d,), got {shape}")
        self.groups = pixel_groups(self.work_shape, self.block)
        d, n_groups = self.groups.numel(), int(self.groups.max()) + 1
        if self.method == "sdp" and d > SDP_MAX_DIM:
            raise ValueError(
                f"method='sdp' takes at most SDP_MAX_DIM={SDP_MAX_DIM} working coordinates, got "
                f"d={d} ({' x '.join(map(str, self.work_shape))}): use method='equi' or a smaller working_size"
            )
        self.shape = shape
        f64 = torch.float64
        self.register_buffer("mean", torch.zeros(d, dtype=f64))
        self.register_buffer("cov", torch.zeros(d, d, dtype=f64))
        self.register_buffer("gamma", torch.zeros(n_groups, dtype=f64))
        self.register_buffer("proj", torch.zeros(d, d, dtype=f64))
        self.register_buffer("noise_factor", torch.zeros(d, d, dtype=f64))
        self.register_buffer("shrinkage", torch.zeros((), dtype=f64))

    def swap_grid(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The block grid at the working resolution (``(d,)`` inputs: the number of groups); the
        generator is fitted for one input shape, so ``shape`` must be it."""
        self._check_shape(shape, self.shape)
        if len(self.shape) == 1:
            return (self.shape[0] // self.block,)
        return self.work_shape[1] // self.block, self.work_shape[2] // self.block

    def config(self) -> dict:
        return {
            "shape": list(self.shape) if self.shape is not None else None,
            "block": self.block,
            "working_size": self.working_size,
            "method": self.method,
            "shrinkage": self.shrinkage_rule,
        }

    @property
    def S(self) -> Tensor:
        """(d, d) float64 ``blockdiag(gamma_g Sigma_gg)`` in the flattened input order."""
        return knockoff_s(self.cov.cpu(), self.groups, self.gamma.cpu())

    # ------------------------------------------------------------------ fitting

    @classmethod
    def from_covariance(
        cls,
        mean: Tensor,
        cov: Tensor,
        shape: tuple[int, ...] | None = None,
        block: int = 1,
        method: str = "equi",
    ) -> GaussianKnockoffs:
        """Knockoffs for a known ``N(mean, cov)``, no estimation.

        Args:
            mean: (d,). cov: (d, d), positive definite.
            shape: input shape with ``prod(shape) = d`` (default ``(d,)``); no resampling.
            block: group size (see ``pixel_groups``).
        """
        mean = torch.as_tensor(mean, dtype=torch.float64).cpu()
        cov = torch.as_tensor(cov, dtype=torch.float64).cpu()
        d = mean.numel()
        if mean.dim() != 1 or cov.shape != (d, d):
            raise ValueError(f"mean must be (d,) and cov (d, d), got {tuple(mean.shape)} and {tuple(cov.shape)}")
        shape = (d,) if shape is None else tuple(shape)
        if math.prod(shape) != d:
            raise ValueError(f"shape {shape} does not hold d={d} coordinates")
        gen = cls(shape=shape, block=block, working_size=None, method=method, shrinkage=0.0)
        gen._solve(mean, (cov + cov.T) / 2, 0.0)
        return gen

    def fit(self, loader: Iterable) -> GaussianKnockoffs:
        """Estimate mean and shrunk covariance from ``x`` or ``(x, y)`` batches, then solve S."""
        moments = _Moments()
        for batch in loader:
            x = images_of(batch)
            if self.shape is None:
                self._set_shape(tuple(x.shape[1:]))
            self._check_input(x, self.shape)
            moments.update(self._to_working(x).flatten(1))
        if moments.n < 2:
            raise ValueError(f"loader must yield at least 2 samples, got {moments.n}")
        mean, cov, fourth = moments.finish()
        if self.shrinkage_rule == "ledoit-wolf":
            cov, weight = ledoit_wolf(cov, fourth, moments.n)
        else:
            weight = float(self.shrinkage_rule)
            trace = float(torch.diagonal(cov).sum()) / cov.shape[0]
            cov = (1 - weight) * cov + weight * trace * torch.eye(cov.shape[0], dtype=cov.dtype)
        self._solve(mean, cov, weight)
        return self

    def _solve(self, mean: Tensor, cov: Tensor, shrinkage: float) -> None:
        cov = _regularise(cov)
        if self.method == "equi":
            gamma = torch.full((int(self.groups.max()) + 1,), equicorrelated_gamma(cov, self.groups), dtype=torch.float64)
        else:
            gamma = sdp_gammas(cov, self.groups)
        check_knockoff_s(cov, self.groups, gamma)
        device = self.mean.device
        self.mean.copy_(mean)
        self.cov.copy_(cov)
        self.gamma.copy_(gamma)
        self.shrinkage.fill_(shrinkage)
        s = self.S
        chol = torch.linalg.cholesky(cov)
        proj = torch.cholesky_solve(s, chol)  # Sigma^-1 S
        cond = 2 * s - s @ proj
        # With S >= 0, 2S - S Sigma^-1 S >= 0 exactly when 2 Sigma - S >= 0, which was checked:
        # what is below 0 here is rounding.
        evals, evecs = torch.linalg.eigh((cond + cond.T) / 2)
        self.proj.copy_(proj.to(device))
        self.noise_factor.copy_((evecs * evals.clamp_min(0).sqrt()).to(device))

    # ------------------------------------------------------------------ sampling

    def _to_working(self, x: Tensor) -> Tensor:
        return resize(x, self.work_shape[1:]) if len(self.shape) == 3 else x

    def sample(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``x~ = x - (x - mu) Sigma^-1 S + L z`` at the working size, resized back to x's.

        Computed in float64 for float64 inputs, else float32 (from the float64 buffers), on this
        module's device. The normals are drawn in float32 either way (see ``draw_normal``).
        """
        self._check_input(x, self.shape)
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        device = self.proj.device
        flat = self._to_working(x.to(device, dtype)).flatten(1)
        z = draw_normal(tuple(flat.shape), generator, device).to(dtype)
        mean = self.mean.to(dtype)
        xk = flat - (flat - mean) @ self.proj.to(dtype) + z @ self.noise_factor.to(dtype).T
        xk = xk.reshape(x.shape[0], *self.work_shape)
        if len(self.shape) == 3:
            xk = resize(xk, self.shape[1:])
        return xk.to(x.device, x.dtype)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config().items())
