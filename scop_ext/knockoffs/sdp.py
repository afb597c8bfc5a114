"""The group SDP that chooses the Gaussian knockoffs' ``S`` (model-X, Candès et al. 2018).

``S = blockdiag(gamma_g Sigma_gg)`` over equal-size groups. In the group-whitened coordinates
``W = D^-1/2 Sigma D^-1/2`` (``D = blockdiag(Sigma_gg)``) the knockoff condition
``2 Sigma - S >= 0`` reads ``2 W - diag(gamma) >= 0``, and the SDP is

    maximise  sum_g |g| gamma_g   subject to   0 <= gamma <= 1,   2 W - diag(gamma) >= 0.

:func:`sdp_gammas` solves it by a primal log-barrier interior-point method: Newton steps on all
``G`` gammas at once, each from a freshly factored ``2W - diag(gamma)`` (no rank-one update
chains, whose rounding drifts near the boundary), a line search that keeps every iterate strictly
feasible, and a barrier weight raised until the duality gap is below ``rel_gap`` of the
objective. A final scaling of ``gamma`` makes ``2 Sigma - S >= 0`` hold in the original
coordinates, the ones the sampler uses. One Newton step costs O(d^3); a solve takes a few dozen.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["SDP_MAX_DIM", "group_order", "group_whiten", "knockoff_s", "sdp_gammas", "check_knockoff_s"]

# Largest working dimension method="sdp" accepts: a solve there takes seconds on two cores (its
# Newton steps factor a d x d matrix); the default 3 x 32 x 32 working size is six times larger.
SDP_MAX_DIM = 512

# 2 Sigma - S may dip below zero by rounding only: lambda_min >= -_VALID * ||Sigma||.
_VALID = 1e-9


def group_order(groups: Tensor) -> tuple[Tensor, int, int]:
    """(permutation putting each group's coordinates together, number of groups, group size)."""
    counts = torch.bincount(groups)
    if bool((counts != counts[0]).any()):
        raise ValueError("groups must all have the same size")
    return torch.argsort(groups, stable=True), counts.numel(), int(counts[0])


def group_whiten(cov: Tensor, groups: Tensor) -> Tensor:
    """``W = D^-1/2 Sigma D^-1/2`` in group order, (d, d): identity blocks on the diagonal."""
    order, n_groups, k = group_order(groups)
    blocks = cov[order][:, order].reshape(n_groups, k, n_groups, k)
    diag = torch.stack([blocks[g, :, g, :] for g in range(n_groups)])
    evals, evecs = torch.linalg.eigh(diag)
    if float(evals.min()) <= 0:
        raise ValueError("cov must be positive definite within each group (use shrinkage)")
    inv_half = (evecs * evals.rsqrt()[:, None, :]) @ evecs.transpose(1, 2)
    w = torch.einsum("gab,gbhc,hdc->gahd", inv_half, blocks, inv_half).reshape(n_groups * k, n_groups * k)
    return (w + w.T) / 2


def knockoff_s(cov: Tensor, groups: Tensor, gamma: Tensor) -> Tensor:
    """(d, d) ``blockdiag(gamma_g Sigma_gg)`` in ``cov``'s own coordinate order."""
    same = groups[:, None] == groups[None, :]
    return cov * same * gamma[groups][:, None]


def _margin(cov: Tensor, groups: Tensor, gamma: Tensor) -> float:
    """``lambda_min(2 Sigma - S) / ||Sigma||``."""
    m = 2 * cov - knockoff_s(cov, groups, gamma)
    return float(torch.linalg.eigvalsh((m + m.T) / 2)[0]) / float(torch.linalg.matrix_norm(cov, 2))


def check_knockoff_s(cov: Tensor, groups: Tensor, gamma: Tensor) -> None:
    """Raise RuntimeError unless ``0 <= gamma <= 1`` and ``2 Sigma - S >= 0`` up to rounding."""
    if bool((gamma < 0).any() or (gamma > 1).any()):
        raise RuntimeError(f"knockoff gamma outside [0, 1]: min {float(gamma.min()):.3g}, max {float(gamma.max()):.3g}")
    margin = _margin(cov, groups, gamma)
    if margin < -_VALID:
        raise RuntimeError(f"invalid knockoff S: lambda_min(2 Sigma - S) = {margin:.3g} ||Sigma|| < 0; the "
                           "knockoffs would not be exchangeable")


def _scaled_to_feasible(cov: Tensor, groups: Tensor, gamma: Tensor) -> Tensor:
    """``c gamma`` with the largest ``c`` in [0, 1] (to 1e-12) keeping ``lambda_min(2 Sigma - S) >= 0``.

    The barrier's iterates are strictly feasible in whitened coordinates; whitening and back only
    round, so ``c = 1`` nearly always passes. ``c = 0`` is feasible for any positive definite Sigma.
    """
    if _margin(cov, groups, gamma) >= 0:
        return gamma
    lo, hi = 0.0, 1.0
    while hi - lo > 1e-12:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _margin(cov, groups, mid * gamma) >= 0 else (lo, mid)
    return lo * gamma


class _Barrier:
    """``phi(gamma) = -t sum_g k gamma_g - log det(2W - diag(gamma)) - sum log gamma - sum log(1 - gamma)``."""

    def __init__(self, w: Tensor, k: int) -> None:
        self.w2, self.k, self.n_groups = 2 * w, k, w.shape[0] // k

    def factor(self, gamma: Tensor) -> Tensor | None:
        """Cholesky factor of ``2W - diag(gamma)``, or None outside the feasible interior."""
        if bool((gamma <= 0).any() or (gamma >= 1).any()):
            return None
        chol, info = torch.linalg.cholesky_ex(self.w2 - torch.diag(gamma.repeat_interleave(self.k)))
        return chol if int(info) == 0 else None

    def value(self, gamma: Tensor, chol: Tensor, t: float) -> float:
        logdet = 2 * float(torch.log(torch.diagonal(chol)).sum())
        return -t * self.k * float(gamma.sum()) - logdet - float(torch.log(gamma).sum() + torch.log1p(-gamma).sum())

    def newton(self, gamma: Tensor, chol: Tensor, t: float) -> tuple[Tensor, Tensor]:
        """(gradient, Newton step) at ``gamma``."""
        g, k = self.n_groups, self.k
        m_inv = torch.cholesky_inverse(chol)
        # d/dgamma_g of -log det M is tr_g(M^-1); the Hessian entry (g, h) is sum over the (g, h)
        # block of (M^-1)_ij^2.
        grad = -t * k + torch.diagonal(m_inv).reshape(g, k).sum(1) - 1 / gamma + 1 / (1 - gamma)
        hess = (m_inv * m_inv).reshape(g, k, g, k).sum((1, 3))
        hess += torch.diag(gamma.pow(-2) + (1 - gamma).pow(-2))
        factor, info = torch.linalg.cholesky_ex(hess)
        if int(info) == 0:
            step = -torch.cholesky_solve(grad[:, None], factor)[:, 0]
        else:  # rounding lost definiteness: the least-squares step is still a descent direction
            step = -torch.linalg.lstsq(hess, grad[:, None]).solution[:, 0]
        return grad, step

    def centre(self, gamma: Tensor, t: float, max_steps: int = 50) -> Tensor:
        """Minimise ``phi`` for this ``t`` by damped Newton steps that stay in the interior."""
        chol = self.factor(gamma)
        for _ in range(max_steps):
            grad, step = self.newton(gamma, chol, t)
            slope = float(grad @ step)
            # Half the squared Newton decrement bounds phi's excess; below 1e-6 it costs the
            # objective 1e-6 / t, and at large t rounding in grad keeps it from going much lower.
            if -slope / 2 < 1e-6:
                break
            here, alpha = self.value(gamma, chol, t), 1.0
            noise = 1e-13 * abs(here)  # phi's rounding: its terms reach t * objective
            while alpha > 1e-6:
                candidate = gamma + alpha * step
                cand_chol = self.factor(candidate)
                if cand_chol is not None and self.value(candidate, cand_chol, t) <= here + 0.25 * alpha * slope + noise:
                    break
                alpha /= 2
            else:  # no decrease left above rounding
                break
            gamma, chol = candidate, cand_chol
        return gamma


def sdp_gammas(cov: Tensor, groups: Tensor, rel_gap: float = 1e-5) -> Tensor:
    """Per-group ``gamma`` of the group SDP (module docstring), (G,) float64.

    Args:
        cov: (d, d) positive definite covariance. groups: (d,) group index of each coordinate,
            groups of equal size.
        rel_gap: stop once the barrier's duality gap bound ``(d + 2G) / t`` is below this
            fraction of the objective.

    Returns ``gamma`` with ``0 <= gamma <= 1`` and ``2 Sigma - S >= 0`` (checked; RuntimeError
    otherwise, which a positive definite ``cov`` cannot reach).
    """
    cov = cov.to(torch.float64)
    w = group_whiten(cov, groups)
    _, n_groups, k = group_order(groups)
    lam_min = float(torch.linalg.eigvalsh(w)[0])
    if lam_min <= 0:
        raise ValueError(f"cov must be positive definite (smallest eigenvalue of its group-whitened form {lam_min:.3g})")
    start = min(1.0, 2 * lam_min)
    if start == 1.0:  # 2W - I >= 0: every gamma at its upper bound is feasible, so optimal
        gamma_w = torch.ones(n_groups, dtype=torch.float64)
    else:
        barrier = _Barrier(w, k)
        gamma_w = torch.full((n_groups,), start / 2, dtype=torch.float64)
        weight = w.shape[0] + 2 * n_groups  # the barrier's degree: duality gap <= weight / t
        t = weight / (k * float(gamma_w.sum()))
        for _ in range(int(math.log10(1 / rel_gap)) + 8):
            gamma_w = barrier.centre(gamma_w, t)
            if weight / t <= rel_gap * k * float(gamma_w.sum()):
                break
            t *= 10
    # group_order numbers the groups 0..G-1 in order, so gamma_w is already per group index
    gamma = _scaled_to_feasible(cov, groups, gamma_w.clamp(0, 1))
    check_knockoff_s(cov, groups, gamma)
    return gamma
