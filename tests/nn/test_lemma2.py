"""Lemma 2 maths (scop_ext.lemma2) and the Philox bias sampler against closed forms."""

import pytest
import torch
import torch.nn.functional as F

import scop_ext
from scop_ext.nn import ScopConv2d, lemma2
from scop_ext.ops import reference

from tests._helpers import _psd_floor
from tests.conftest import NEEDS_CUDA


def _layer(c_in=3, c_out=4, k=3, groups=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(c_out, c_in // groups, k, k, generator=gen, dtype=torch.float64) / 3
    s_in = torch.rand(c_in, generator=gen, dtype=torch.float64) + 0.1
    return weight, s_in


@pytest.mark.parametrize("groups", [1, 2])
def test_gram_matches_per_location_view(groups):
    weight, s_in = _layer(c_in=4, c_out=6, groups=groups)
    # Explicit W of shape (C_in k k, C_out), zero outside each filter's group, as DESIGN.md §2 defines it.
    c_out, c_in_g, k, _ = weight.shape
    full = torch.zeros(c_out, 4, k, k, dtype=torch.float64)
    for o in range(c_out):
        g = o // (c_out // groups)
        full[o, g * c_in_g : (g + 1) * c_in_g] = weight[o]
    W = full.reshape(c_out, -1).T
    diag = s_in.repeat_interleave(k * k)
    torch.testing.assert_close(lemma2.knockoff_gram(weight, s_in, groups), W.T @ torch.diag(diag) @ W)


def test_solution_satisfies_s5_with_margin_gamma():
    weight, s_in = _layer()
    sol = lemma2.solve(weight, s_in, gamma=0.05)
    # With S' = (lambda_max + gamma) I: S' - M has smallest eigenvalue gamma, 2 Sigma_b - (S' - M) = 2 gamma I.
    assert sol.margin == pytest.approx(0.05, rel=1e-9)
    assert sol.lambda_max == pytest.approx(float(torch.linalg.eigvalsh(sol.M)[-1]))
    torch.testing.assert_close(sol.R @ sol.R.T, (torch.diag(sol.s_out) - sol.M) / 2)
    assert float(torch.linalg.eigvalsh(sol.covariance()).min()) >= -1e-10


def test_default_gamma_is_relative():
    weight, s_in = _layer()
    sol = lemma2.solve(weight, s_in)
    torch.testing.assert_close(sol.M, lemma2.knockoff_gram(weight, s_in.double()))
    assert sol.gamma == pytest.approx(1e-3 * sol.lambda_max)


def test_negative_s_is_refused_not_clipped():
    # s is a variance: a negative entry is a caller's mistake (estimate_s clips its own sampling
    # error), and clipping it would hide the mistake behind an "M is zero" warning.
    weight, s_in = _layer()
    s_in[0] = -0.2
    with pytest.raises(ValueError, match="s_in must be >= 0.*-0.2"):
        lemma2.solve(weight, s_in)
    conv = ScopConv2d(3, 4, 3)
    with pytest.raises(ValueError, match="s_in must be >= 0"):
        conv.fit_knockoff_bias(s_in=torch.full((3,), -0.3))
    with pytest.raises(ValueError, match="s_in must be a .* tensor"):
        conv.fit_knockoff_bias(s_in=-0.3)


def test_solve_rejects_bad_input():
    weight, s_in = _layer()
    with pytest.raises(ValueError, match="s_in must have shape"):
        lemma2.solve(weight, s_in[:2])
    with pytest.raises(ValueError, match="s_in contains NaN"):
        lemma2.solve(weight, torch.full((3,), float("nan")))
    with pytest.raises(ValueError, match="gamma must be > 0"):
        lemma2.solve(weight, s_in, gamma=0.0)


def test_sampler_covariance_matches_s1(device):
    weight, s_in = _layer()
    sol = lemma2.solve(weight, s_in, gamma=0.1)
    n = 200_000
    draws = scop_ext.lemma2_sample(sol.R.to(device), sol.gamma, n, seed=2024).cpu()
    flat = draws.reshape(n, -1)  # [b, b~]
    assert abs(float(flat.mean(0).abs().max())) < 5 * float(sol.covariance().diag().max().sqrt()) / n**0.5
    empirical = flat.T @ flat / n  # zero mean by construction
    target = sol.covariance()
    # Sampling s.d. of a Gaussian second-moment entry is sqrt((S_ii S_jj + S_ij^2) / n); allow 5 of them.
    sd = ((target.diag()[:, None] * target.diag()[None, :] + target**2) / n).sqrt()
    assert bool(((empirical - target).abs() <= 5 * sd).all()), (empirical - target).abs().div(sd).max()


def test_sampler_is_reproducible_and_keyed(device):
    R = torch.randn(6, 6, device=device)
    a = scop_ext.lemma2_sample(R, 0.2, 9, seed=5)
    assert torch.equal(a, scop_ext.lemma2_sample(R, 0.2, 9, seed=5))
    assert not torch.equal(a, scop_ext.lemma2_sample(R, 0.2, 9, seed=6))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(scop_ext.lemma2_sample(R, 0.2, 9, generator=g1), scop_ext.lemma2_sample(R, 0.2, 9, generator=g2))
    # successive draws from one generator differ
    assert not torch.equal(scop_ext.lemma2_sample(R, 0.2, 9, generator=g1), scop_ext.lemma2_sample(R, 0.2, 9, generator=g1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sampler_matches_reference(dtype, device):
    R = torch.randn(7, 7, dtype=torch.float64).to(device, dtype)
    got = scop_ext.lemma2_sample(R, 0.3, 5, seed=-123456789)
    want = reference.lemma2_sample(R, 0.3, 5, seed=-123456789)
    if dtype == torch.float64 and device.type == "cpu":
        assert torch.equal(got, want)
    elif dtype == torch.float64:
        # libdevice's log/sin/cos inlined in the kernel and ATen's may differ in the last ulp,
        # which R's matmul spreads over a row: about 1e-14 here, 1e13 times below another stream's
        torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
    else:
        torch.testing.assert_close(got, want)


def test_sampler_pair_structure():
    draws = scop_ext.lemma2_sample(torch.eye(4, dtype=torch.float64), 0.0, 10, seed=1)
    torch.testing.assert_close(draws[:, 1], -draws[:, 0])
    shared = scop_ext.lemma2_sample(torch.zeros(4, 4, dtype=torch.float64), 4.0, 10, seed=1)
    torch.testing.assert_close(shared[:, 0], shared[:, 1])


def test_philox_known_answers():
    """Random123's kat_vectors for philox4x32-10, through the pure-PyTorch reference."""
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0), (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for ctr, key, want in cases:
        got = reference.philox4x32_10(tuple(torch.tensor([c]) for c in ctr), key)
        assert [int(v) for v in got] == list(want)


@pytest.mark.cuda
@NEEDS_CUDA
def test_sampler_same_numbers_on_cpu_and_cuda():
    R = torch.randn(16, 16)
    torch.testing.assert_close(
        scop_ext.lemma2_sample(R.cuda(), 0.5, 33, seed=99).cpu(), scop_ext.lemma2_sample(R, 0.5, 33, seed=99)
    )
    # The normals themselves (R = I, gamma = 0 returns [z2, -z2]) in float64: the same Philox bits
    # through libdevice and the host's libm, a few ulps apart at most.
    eye = torch.eye(16, dtype=torch.float64)
    z_cuda = scop_ext.lemma2_sample(eye.cuda(), 0.0, 33, seed=99).cpu()
    torch.testing.assert_close(z_cuda, scop_ext.lemma2_sample(eye, 0.0, 33, seed=99), rtol=2e-15, atol=1e-15)


@pytest.mark.cuda
@NEEDS_CUDA
def test_sampler_refuses_cuda_graph_capture():
    """The Philox key is read on the host, so a captured draw would repeat on every replay."""
    R, generator, seed = torch.randn(4, 4, device="cuda"), torch.Generator("cuda"), torch.tensor([5])
    other = torch.zeros(1, device="cuda")
    other.add_(1)  # loaded before the capture, which then holds this one kernel
    for call in (lambda: scop_ext.lemma2_sample(R, 0.1, 3, seed=5),  # the wrapper
                 lambda: scop_ext.lemma2_sample(R, 0.1, 3, generator=generator),  # before draw_seed syncs
                 lambda: torch.ops.scop.lemma2_sample.default(R, 0.1, 3, seed)):  # the kernel
        with pytest.raises(RuntimeError, match="lemma2_sample cannot run during CUDA graph capture"):
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                other.add_(1)
                call()
    # outside a capture it runs as ever
    assert scop_ext.lemma2_sample(R, 0.1, 3, seed=5).shape == (3, 2, 4)


def test_sampler_ignores_autocast():
    """The autocast rule runs the sampler in R's dtype: bit for bit the float32 draw, and its
    gradient, inside a bfloat16 region (without it the combine's matmul would run in bfloat16)."""
    R = (torch.randn(64, 64, generator=torch.Generator().manual_seed(0)) * 3).requires_grad_()
    grad = torch.randn(8, 2, 64, generator=torch.Generator().manual_seed(1))
    want = scop_ext.lemma2_sample(R, 0.1, 8, seed=123)
    (want_grad,) = torch.autograd.grad(want, R, grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = scop_ext.lemma2_sample(R, 0.1, 8, seed=123)
        (got_grad,) = torch.autograd.grad(got, R, grad)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert got_grad.dtype == torch.float32 and torch.equal(got_grad, want_grad)


def test_estimate_s_closed_form():
    # x~ = rho x + sqrt(1 - rho^2) e: Var = sigma^2, Cov = rho sigma^2, so s = sigma^2 (1 - rho).
    gen = torch.Generator().manual_seed(0)
    sigma = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    rho = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    x = torch.randn(4000, 3, 4, 4, generator=gen, dtype=torch.float64) * sigma[:, None, None]
    e = torch.randn(x.shape, generator=gen, dtype=torch.float64) * sigma[:, None, None]
    xk = rho[:, None, None] * x + (1 - rho[:, None, None] ** 2).sqrt() * e
    s = lemma2.estimate_s(x, xk)
    torch.testing.assert_close(s, sigma**2 * (1 - rho), rtol=0.03, atol=0.0)


def test_lemma2_keeps_a_linear_layer_output_a_knockoff():
    """The lemma itself: a conv of a Gaussian knockoff pair plus the sampled biases stays a knockoff.

    Input: exchangeable pair with cov [[I, I - diag(s)], [I - diag(s), I]] per pixel (independent
    pixels), through a 1x1 conv. The output pair's cross-covariance must be Sigma_out - S'.
    """
    gen = torch.Generator().manual_seed(1)
    c_in, c_out, n = 3, 4, 100_000
    s_in = torch.tensor([0.5, 0.8, 0.3], dtype=torch.float64)
    weight = torch.randn(c_out, c_in, 1, 1, generator=gen, dtype=torch.float64) / 2
    z0, z1, z2 = (torch.randn(n, c_in, generator=gen, dtype=torch.float64) for _ in range(3))
    shared = (1 - s_in).sqrt() * z0  # var 1, cov(x, x~) = 1 - s
    x = shared + s_in.sqrt() * z1
    xk = shared + s_in.sqrt() * z2
    sol = lemma2.solve(weight, s_in, gamma=0.05)
    b = scop_ext.lemma2_sample(sol.R, sol.gamma, n, seed=7)
    v = F.linear(x, weight[:, :, 0, 0]) + b[:, 0]
    vk = F.linear(xk, weight[:, :, 0, 0]) + b[:, 1]
    cov_vv, cov_kk, cov_vk = v.T @ v / n, vk.T @ vk / n, v.T @ vk / n
    # entries are O(1) second moments of 1e5 draws: sampling s.d. about 0.005
    torch.testing.assert_close(cov_vv, cov_kk, atol=0.025, rtol=0)
    torch.testing.assert_close(cov_vv - cov_vk, torch.diag(sol.s_out), atol=0.025, rtol=0)


# ----------------------------- degenerate layers: regularised with a warning, never a crash


def _sampler_covariance(sol: lemma2.Lemma2Solution) -> torch.Tensor:
    """Joint covariance of [b, b~] as lemma2_sample draws it: gamma I +- R R^T."""
    rr = sol.R @ sol.R.T
    eye = sol.gamma * torch.eye(rr.shape[0], dtype=torch.float64)
    return torch.cat([torch.cat([eye + rr, eye - rr], 1), torch.cat([eye - rr, eye + rr], 1)])


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    "case,pattern",
    [
        ("all-zero weights", "M = W\\^T diag\\(s_in\\) W is zero"),
        ("constant pixels (s_in = 0)", "M = W\\^T diag\\(s_in\\) W is zero"),
        ("duplicated filters, tiny gamma", "below the numerical floor"),
    ],
)
def test_degenerate_lemma2_is_regularised_with_a_warning(case, pattern):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 4, 3, 3, generator=gen) * 1e3
    s_in, gamma = torch.rand(4, generator=gen), None
    if case == "all-zero weights":
        weight.zero_()
    elif case == "constant pixels (s_in = 0)":
        s_in.zero_()
    else:
        weight[3:] = weight[:3]
        gamma = 1e-30
    with pytest.warns(UserWarning, match=pattern):
        sol = lemma2.solve(weight, s_in, gamma)
    assert sol.margin >= -1e-12 * max(sol.lambda_max, 1.0)
    assert _psd_floor(sol.covariance()) > -1e-9
    torch.testing.assert_close(_sampler_covariance(sol), sol.covariance(), atol=1e-9 * max(sol.lambda_max, 1.0), rtol=0)
    draws = scop_ext.lemma2_sample(sol.R, sol.gamma, 5, seed=3)
    assert bool(torch.isfinite(draws).all())
