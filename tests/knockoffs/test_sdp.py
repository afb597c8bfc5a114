"""The group SDP behind ``GaussianKnockoffs(method="sdp")`` (scop_ext/knockoffs/sdp.py), against an
exact conic solver (cvxpy with Clarabel, a test-only dependency) and the closed form of compound
symmetry. The solver once crashed (ZeroDivisionError) or returned an invalid S for AR(1) sizes
36 to 100; the sizes below sweep that range densely."""

from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from scop_ext.data import digits
from scop_ext.knockoffs import GaussianKnockoffs
from scop_ext.knockoffs import gaussian
from scop_ext.knockoffs.sdp import SDP_MAX_DIM
from tests._helpers import ar1

RHOS = (0.3, 0.5, 0.9)
# Every size the first sweep failed at, and enough around them.
SIZES = (2, 3, 5, 8, 13, 21, 36, 40, 44, 48, 50, 56, 60, 64, 72, 80, 88, 96, 100, 128)
EXACT_SIZES = (2, 13, 36, 44, 50)
SLOW_SIZES = tuple(range(36, 101, 2)) + (160, 200, 256, 300, 384, 450, SDP_MAX_DIM)


def exact_objective(cov: torch.Tensor, groups: torch.Tensor) -> float:
    """The SDP's optimum ``max sum_g |g| gamma_g`` s.t. ``0 <= gamma <= 1``, ``2 Sigma - S(gamma) >= 0``,
    by Clarabel, written in the original coordinates (no whitening: nothing shared with ours)."""
    d, n_groups = cov.shape[0], int(groups.max()) + 1
    member = np.zeros((d, n_groups))
    member[np.arange(d), groups.numpy()] = 1
    within = cov.numpy() * (groups[:, None] == groups[None, :]).numpy()
    gamma = cp.Variable(n_groups)
    s = cp.multiply(within, member @ cp.diag(gamma) @ member.T)
    problem = cp.Problem(cp.Maximize(d // n_groups * cp.sum(gamma)), [gamma >= 0, gamma <= 1, 2 * cov.numpy() - s >> 0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "solution may be inaccurate": the status says how much
        problem.solve(solver="CLARABEL")
    assert problem.status in ("optimal", "optimal_inaccurate"), problem.status
    return float(problem.value)


def sdp(cov: torch.Tensor, block: int) -> GaussianKnockoffs:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a well-conditioned Sigma needs no jitter, nothing is clipped
        return GaussianKnockoffs.from_covariance(torch.zeros(cov.shape[0]), cov, block=block, method="sdp")


def objective(gen: GaussianKnockoffs) -> float:
    return float(torch.diagonal(gen.S / gen.cov).sum())  # sum_g |g| gamma_g


def assert_valid(gen: GaussianKnockoffs) -> None:
    """0 <= gamma <= 1 and 2 Sigma - S >= 0 up to rounding, recomputed from the generator's buffers."""
    gamma = gen.gamma
    assert bool((gamma >= 0).all() and (gamma <= 1).all()), gamma
    margin = 2 * gen.cov - gen.S
    lam_min = float(torch.linalg.eigvalsh((margin + margin.T) / 2)[0])
    assert lam_min >= -1e-9 * float(torch.linalg.matrix_norm(gen.cov, 2)), lam_min


def assert_optimal(gen: GaussianKnockoffs) -> None:
    ours, exact = objective(gen), exact_objective(gen.cov, gen.groups)
    # within 0.1% below the optimum (the issue asks 1%); above it only by the exact solver's tolerance
    assert exact * (1 - 1e-3) <= ours <= exact * (1 + 1e-5) + 1e-7, (ours, exact)


def cases(sizes):
    return [(rho, p, block) for rho in RHOS for p in sizes for block in (1, 2) if p % block == 0]


@pytest.mark.parametrize("rho,p,block", cases(SIZES))
def test_ar1_is_valid_and_beats_equicorrelated(rho, p, block):
    gen = sdp(ar1(p, rho), block)
    assert_valid(gen)
    equi = GaussianKnockoffs.from_covariance(torch.zeros(p), ar1(p, rho), block=block)
    assert objective(gen) >= objective(equi) * (1 - 1e-6)


@pytest.mark.parametrize("rho,p,block", cases(EXACT_SIZES))
def test_ar1_reaches_the_exact_optimum(rho, p, block):
    gen = sdp(ar1(p, rho), block)
    assert_valid(gen)
    assert_optimal(gen)


@pytest.mark.parametrize("block", [1, 2])
def test_largest_accepted_dimension(block):
    gen = sdp(ar1(SDP_MAX_DIM, 0.9), block)
    assert_valid(gen)
    assert objective(gen) > objective(GaussianKnockoffs.from_covariance(torch.zeros(SDP_MAX_DIM), ar1(SDP_MAX_DIM, 0.9),
                                                                         block=block))


@pytest.mark.parametrize("rho", [0.0, 0.3, 0.5, 0.7, 0.9, 0.99])
@pytest.mark.parametrize("p", [10, 50])
def test_compound_symmetry_matches_the_closed_form(rho, p):
    """Sigma = (1 - rho) I + rho 11^T: the SDP optimum is s_j = min(1, 2 (1 - rho)) for every j."""
    cov = torch.full((p, p), rho, dtype=torch.float64).fill_diagonal_(1.0)
    gen = sdp(cov, 1)
    assert_valid(gen)
    torch.testing.assert_close(gen.gamma, torch.full((p,), min(1.0, 2 * (1 - rho)), dtype=torch.float64),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("block", [1, 2])
def test_digits_covariance_reaches_the_exact_optimum(block):
    gen = GaussianKnockoffs(method="sdp", block=block).fit(DataLoader(digits("train"), batch_size=256))
    assert gen.cov.shape == (64, 64)
    assert_valid(gen)
    assert_optimal(gen)


def test_an_invalid_s_is_an_error_not_a_warning(monkeypatch):
    """Whatever picks gamma, an S with 2 Sigma - S not PSD never reaches the sampler."""
    monkeypatch.setattr(gaussian, "sdp_gammas", lambda cov, groups: torch.ones(int(groups.max()) + 1, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"invalid knockoff S: lambda_min\(2 Sigma - S\) = -[\d.e-]+ \|\|Sigma\|\| < 0"):
        GaussianKnockoffs.from_covariance(torch.zeros(20), ar1(20, 0.9), method="sdp")


@pytest.mark.slow
@pytest.mark.parametrize("rho,p,block", cases(SLOW_SIZES))
def test_ar1_sweep_reaches_the_exact_optimum(rho, p, block):
    gen = sdp(ar1(p, rho), block)
    assert_valid(gen)
    if p <= 64 or p in (80, 100):  # Clarabel takes a minute at 100 on two busy cores, hours at 512
        assert_optimal(gen)
