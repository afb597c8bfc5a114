"""Knockoff generators and their diagnostics (scop_ext.knockoffs), on known Gaussians and digits."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import warnings
from statistics import NormalDist

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from scop_ext.nn import lemma2
from scop_ext.data import digits
from scop_ext.knockoffs import ExternalKnockoffs, GaussianKnockoffs, KnockoffGAN, KnockoffGenerator, PermutationKnockoffs, check, load, make_generator
from scop_ext.knockoffs.base import pixel_groups, working_layout
from scop_ext.knockoffs.exchangeability import exchangeability, feature_exchangeability, measurement_shape, power, random_subsets, swap_gaps
from scop_ext.knockoffs.gaussian import _Moments, ledoit_wolf
from scop_ext.knockoffs.leakage import label_leakage
from scop_ext.knockoffs.quality import sample_batched
from scop_ext.plots import embedding_figure, knockoff_grid
from tests._helpers import ar1

from tests._helpers import _psd_floor
from tests.conftest import ENV


def draw(mean: torch.Tensor, cov: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    chol = torch.linalg.cholesky(cov)
    z = torch.randn(n, mean.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return mean + z @ chol.T


def gaussian_pairs(n: int, d: int = 20):
    """(mean, cov, generator, x, x~): n draws of a heteroscedastic AR(1) Gaussian and their knockoffs."""
    cov = ar1(d, 0.6, torch.linspace(0.5, 2.0, d, dtype=torch.float64))
    mean = torch.linspace(-1, 1, d, dtype=torch.float64)
    gen = GaussianKnockoffs.from_covariance(mean, cov)
    x = draw(mean, cov, n, seed=0)
    return mean, cov, gen, x, gen.sample(x, generator=torch.Generator().manual_seed(1))


def bonferroni_z(count: int, alpha: float = 1e-3) -> float:
    """Two-sided normal quantile that keeps the family-wise error of ``count`` tests at alpha."""
    return NormalDist().inv_cdf(1 - alpha / (2 * count))


def max_standardized_deviation(sample_cov: torch.Tensor, cov: torch.Tensor, n: int) -> float:
    """max_ij |C^_ij - C_ij| / sd(C^_ij), with the Gaussian sd(C^_ij) = sqrt((C_ii C_jj + C_ij^2) / n)."""
    diag = torch.diagonal(cov)
    sd = ((diag[:, None] * diag[None, :] + cov * cov) / n).sqrt()
    return float(((sample_cov - cov).abs() / sd).max())


@pytest.fixture(scope="module")
def digit_data():
    train, test = digits("train"), digits("test")
    return DataLoader(train, batch_size=256), train.tensors, test.tensors


@pytest.fixture(scope="module")
def fitted(one_thread, digit_data):
    """One fitted generator of every kind on the digits training split."""
    loader, _, _ = digit_data
    gaussian = GaussianKnockoffs().fit(loader)
    gan = KnockoffGAN(iterations=300, width=16, batch_size=64, seed=0).fit(loader, progress=False)
    return {
        "gaussian": gaussian,
        "gaussian-sdp": GaussianKnockoffs(method="sdp").fit(loader),
        "gan": gan,
        "permutation": PermutationKnockoffs(),
        "external": ExternalKnockoffs(gaussian.sample),  # takes generator=, so it is passed through
    }


# ---------------------------------------------------------------------------------- Gaussian, known Sigma


def test_ledoit_wolf_matches_sklearn():
    from sklearn.covariance import ledoit_wolf as sk_ledoit_wolf

    x = torch.randn(400, 25, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = x @ torch.randn(25, 25, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 5.0
    moments = _Moments()
    for chunk in x.split(77):  # uneven batches exercise the one-pass sums
        moments.update(chunk)
    mean, cov, fourth = moments.finish()
    shrunk, weight = ledoit_wolf(cov, fourth, x.shape[0])
    expected, expected_weight = sk_ledoit_wolf(x.numpy())
    assert torch.allclose(mean, x.mean(0), atol=1e-10)
    assert weight == pytest.approx(expected_weight, rel=1e-9)
    assert torch.allclose(shrunk, torch.from_numpy(expected), atol=1e-9)


def test_gaussian_joint_covariance_has_knockoff_form():
    mean, cov, gen, x, xk = gaussian_pairs(100_000)
    n, d = x.shape
    assert xk.dtype == torch.float64 and xk.shape == x.shape

    s = gen.S
    expected = torch.cat([torch.cat([cov, cov - s], 1), torch.cat([cov - s, cov], 1)], 0)
    joint = torch.cat([x, xk], 1)
    sample_cov = torch.cov(joint.T)
    z = bonferroni_z((2 * d) ** 2)
    assert max_standardized_deviation(sample_cov, expected, n) < z
    mean_sd = (torch.diagonal(cov) / n).sqrt()
    assert float(((xk.mean(0) - mean).abs() / mean_sd).max()) < bonferroni_z(d)
    # the same check rejects a form with a slightly wrong S, so it has power at this n
    wrong = torch.cat([torch.cat([cov, cov - 0.9 * s], 1), torch.cat([cov - 0.9 * s, cov], 1)], 0)
    assert max_standardized_deviation(sample_cov, wrong, n) > 2 * z


@pytest.mark.parametrize("rho", [0.6, 0.2])
def test_equicorrelated_s_matches_closed_form(rho):
    d = 20
    scales = torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    cov = ar1(d, rho, scales)
    gen = GaussianKnockoffs.from_covariance(torch.zeros(d), cov)
    corr = ar1(d, rho)
    closed = min(1.0, 2 * float(torch.linalg.eigvalsh(corr)[0])) * scales**2
    assert torch.allclose(torch.diagonal(gen.S), closed, rtol=1e-10)
    assert bool((gen.S == torch.diag(torch.diagonal(gen.S))).all())
    assert float(torch.linalg.eigvalsh(2 * cov - gen.S)[0]) > -1e-10
    if rho == 0.2:  # weak correlation: 2 lambda_min > 1, so s = diag(Sigma) and x~ is independent of x
        assert torch.allclose(torch.diagonal(gen.S), scales**2)


def test_group_equicorrelated_s():
    d, block = 12, 3
    cov = ar1(d, 0.7)
    gen = GaussianKnockoffs.from_covariance(torch.zeros(d), cov, block=block)
    groups = torch.arange(d) // block
    same = groups[:, None] == groups[None, :]
    d_blocks = cov * same
    evals, evecs = torch.linalg.eigh(d_blocks)
    inv_half = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    gamma = min(1.0, 2 * float(torch.linalg.eigvalsh(inv_half @ cov @ inv_half)[0]))
    assert torch.allclose(gen.S, gamma * d_blocks, atol=1e-12)
    assert float(torch.linalg.eigvalsh(2 * cov - gen.S)[0]) > -1e-10
    # grouping frees the within-group correlation: more s than the coordinate-wise choice
    single = GaussianKnockoffs.from_covariance(torch.zeros(d), cov)
    assert float(torch.diagonal(gen.S).sum()) > float(torch.diagonal(single.S).sum())


def test_float64_inputs_are_sampled_in_float64():
    """x~ - x + (x - mu) Sigma^-1 S must be L z with L L^T = 2S - S Sigma^-1 S to float64
    precision; float32 factors leave errors near 1e-7."""
    mean, cov, gen, x, xk = gaussian_pairs(500)
    n, d = x.shape
    s = gen.S
    proj = torch.linalg.solve(cov, s)
    factor = gen.noise_factor
    assert factor.dtype == torch.float64
    torch.testing.assert_close(factor @ factor.T, 2 * s - s @ proj, rtol=0, atol=1e-12)
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(1)).double()  # as draw_normal draws them
    torch.testing.assert_close(xk - x + (x - mean) @ proj, z @ factor.T, rtol=0, atol=1e-12)


def test_sdp_refuses_large_dimensions():
    with pytest.raises(ValueError, match=r"method='sdp' takes at most SDP_MAX_DIM=512 .* d=3072 \(3 x 32 x 32\): use method='equi' or a smaller working_size"):
        GaussianKnockoffs(shape=(3, 224, 224), method="sdp")
    assert GaussianKnockoffs(shape=(3, 224, 224), method="sdp", working_size=12).work_shape == (3, 12, 12)


def test_working_resolution_and_swap_grid():
    images = torch.rand(64, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    images = nn.functional.interpolate(images, size=32, mode="bilinear", align_corners=False)
    gen = GaussianKnockoffs(working_size=8).fit(DataLoader(TensorDataset(images), batch_size=32))
    assert gen.work_shape == (3, 8, 8) and gen.cov.shape == (192, 192)
    assert gen.swap_grid((3, 32, 32)) == (4, 4)  # 2-pixel blocks at 8 x 8: 8-pixel blocks at 32 x 32
    xk = gen.sample(images[:5], generator=torch.Generator().manual_seed(0))
    assert xk.shape == (5, 3, 32, 32) and xk.dtype == torch.float32


def smooth(n: int, hw: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """(n, 3, *hw) smooth random images (a 4 x 4 field upsampled plus a little noise)."""
    g = torch.Generator().manual_seed(seed)
    field = nn.functional.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=hw, mode="bilinear", align_corners=False)
    return field + 0.05 * torch.randn(n, 3, *hw, generator=g)


@pytest.mark.parametrize("hw", [(100, 100), (224, 160)])
def test_sizes_the_working_size_does_not_divide(one_thread, tmp_path, hw):
    """100 px at 16 (6.25 input pixels per working block) and a non-square 224 x 160 (16 x 11.4
    scaled): the working edges are rounded to multiples of the block, and check measures on the
    block grid rather than on a block edge in input pixels."""
    images = smooth(96, hw)
    gen = GaussianKnockoffs(working_size=16).fit(DataLoader(TensorDataset(images), batch_size=48))
    expected = {(100, 100): (3, 16, 16), (224, 160): (3, 16, 12)}[hw]
    assert gen.work_shape == expected and gen.block == 2
    assert gen.swap_grid((3, *hw)) == (expected[1] // 2, expected[2] // 2)
    report = check(gen, images, tmp_path / "out", n=96, n_subsets=4, swap_test_steps=5)
    assert report["grid"] == [expected[1] // 2, expected[2] // 2] and report["block"] >= 2
    rows, cols = report["grid"]
    assert report["resolution"] == [3, rows * report["block"], cols * report["block"]]
    assert math.prod(report["resolution"]) <= 3072
    assert report["exchangeability"]["gap"] < report["exchangeability"]["null_gap"]


def test_working_layout_defaults_and_errors():
    assert working_layout((224, 160), 32, None) == ((32, 22), 2)
    assert working_layout((224, 160), 64, None) == ((64, 44), 4)
    assert working_layout((9, 9), 32, None) == ((9, 9), 1)  # fits: the largest block dividing both edges
    assert working_layout((24, 16), None, None) == ((24, 16), 2)
    with pytest.raises(ValueError, match=r"block=2 does not divide the image size 9x9; valid blocks: \[1, 3, 9\]"):
        GaussianKnockoffs(shape=(1, 9, 9), block=2)
    with pytest.raises(ValueError, match="block must be a positive int"):
        GaussianKnockoffs(block=0)
    with pytest.raises(ValueError, match="working_size must be a positive int or None, got 0"):
        GaussianKnockoffs(working_size=0)
    with pytest.raises(ValueError, match="block=8 must be at most working_size=4"):
        GaussianKnockoffs(shape=(1, 16, 16), block=8, working_size=4)


def test_diagnostics_measure_large_images_at_a_bounded_resolution(tmp_path):
    """3 x 128 x 128 has d = 49,152: a dense 2d x 2d covariance would be 39 GB. Swap blocks are
    averaged in cells so that at most max_dim coordinates are measured."""
    import resource

    images = smooth(200, (128, 128))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    gen = PermutationKnockoffs()
    assert gen.swap_grid((3, 128, 128)) == (16, 16)  # the base layout: 8-pixel blocks
    report = check(gen, images, tmp_path / "out", n=200, n_subsets=4, swap_test_steps=5)
    assert report["resolution"] == [3, 32, 32] and report["block"] == 2
    assert report["exchangeability"]["resolution"] == [3, 32, 32]
    direct = exchangeability(images, gen.sample(images, torch.Generator().manual_seed(0)), block=8, n_subsets=4, max_dim=768)
    assert direct["resolution"] == [3, 16, 16] and direct["block"] == 1
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 1_500_000

    with pytest.raises(ValueError, match=r"3x128x128 = 49152 coordinates > max_dim=3072 .*raise max_dim"):
        check(gen, images, tmp_path / "fine", n=200, grid=(128, 128))
    assert not (tmp_path / "fine").exists()  # refused before sampling or writing anything
    flat = images.flatten(1)
    with pytest.raises(ValueError, match=r"d=49152 coordinates > max_dim=3072: the 98304x98304 covariance would take 38.7 GB"):
        swap_gaps(flat, flat, torch.arange(flat.shape[1]), random_subsets(flat.shape[1], 1))


# ---------------------------------------------------------------------------------- every generator on digits


@pytest.mark.parametrize("name", ["gaussian", "gaussian-sdp", "gan", "permutation", "external"])
def test_generator_shapes_dtypes(fitted, digit_data, name):
    _, _, (x, _) = digit_data
    gen = fitted[name]
    for dtype in (torch.float32, torch.float64):
        xk = gen.sample(x[:17].to(dtype), generator=torch.Generator().manual_seed(0))
        assert xk.shape == (17, 1, 8, 8) and xk.dtype == dtype and xk.device == x.device
        assert bool(torch.isfinite(xk).all())
        assert not torch.equal(xk, x[:17].to(dtype))
    again = gen.sample(x[:17], generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, gen.sample(x[:17], generator=torch.Generator().manual_seed(0)))


# Power bound: mean corr(x_j, x~_j) of a copy x~ = x is 1 (and its gap is 0); exact
# equicorrelated Gaussian knockoffs of the digits have 0.84, the test GAN about 0.6.
MAX_MEAN_CORR = 0.9


def quality_failures(gen, x: torch.Tensor) -> list[str]:
    """The quality checks the generators must pass on the digits: exchangeability gap under half
    the permutation's on one set of subsets, and power (mean correlation under MAX_MEAN_CORR)."""
    xk = sample_batched(gen, x, seed=0)
    null = PermutationKnockoffs().sample(x, generator=torch.Generator().manual_seed(1))
    _, block = measurement_shape(tuple(x.shape[1:]), gen.swap_grid(tuple(x.shape[1:])))
    result = exchangeability(x, xk, block=block, n_subsets=20, seed=0, null=null)
    failures = [] if result["gap"] < 0.5 * result["null_gap"] else ["exchangeability"]
    return failures + ([] if power(x, xk) < MAX_MEAN_CORR else ["power"])


@pytest.mark.parametrize("name", ["gaussian", "gaussian-sdp", "gan", "external"])
def test_exchangeability_below_permutation_with_power(fitted, digit_data, name):
    _, _, (x, _) = digit_data
    assert quality_failures(fitted[name], x) == []


def test_quality_checks_reject_a_copy_and_a_permutation(digit_data):
    """x~ = x is exactly exchangeable but has no power; a permutation has power but is not
    exchangeable: each fails one of the checks above."""
    _, _, (x, _) = digit_data
    assert quality_failures(ExternalKnockoffs(lambda t: t.clone()), x) == ["power"]
    assert quality_failures(PermutationKnockoffs(), x) == ["exchangeability"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["gaussian", "gan", "permutation"])
def test_sampling_on_cuda_matches_cpu(fitted, digit_data, name):
    """Noise is drawn from the CPU generator and moved, so the device changes only rounding
    (cuDNN may use TF32 for the GAN's convolutions)."""
    _, _, (x, _) = digit_data
    gen = copy.deepcopy(fitted[name]).to("cuda")
    xk = gen.sample(x[:32].cuda(), generator=torch.Generator().manual_seed(0))
    assert xk.device.type == "cuda" and xk.shape == (32, 1, 8, 8) and xk.dtype == torch.float32
    reference = fitted[name].sample(x[:32], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(xk.cpu(), reference, rtol=1e-3, atol=5e-3)


def test_permutation_is_a_derangement():
    x = torch.arange(10.0)[:, None]
    for seed in range(20):
        xk = PermutationKnockoffs().sample(x, generator=torch.Generator().manual_seed(seed))
        assert sorted(xk[:, 0].tolist()) == x[:, 0].tolist()
        assert bool((xk != x).all())
    with pytest.raises(ValueError, match="at least 2"):
        PermutationKnockoffs().sample(x[:1])


def test_label_leakage(fitted, digit_data):
    """Knockoffs never see y, so x~ can predict y only through x: ``x~ ⊥ y | x``.

    Bound: the classifier on [x, x~] may not beat the one on x by more than 3 standard errors
    of a difference of two accuracies on n_test samples, 3 sqrt(2 p (1 - p) / n_test). Near-chance
    accuracy from x~ alone is *not* a property of valid knockoffs of correlated pixels: the
    equicorrelated s is small for digits, x~ stays close to x and keeps most of its label
    information (measured: about 0.9 against 0.96 on x). It is a property of an independent copy,
    which the permutation checks, and of nothing that leaks y, which the planted leaks check.
    """

    def bound(result: dict) -> float:
        p = result["real_acc"]
        return 3 * math.sqrt(2 * p * (1 - p) / result["n_test"])

    _, (x, y), _ = digit_data
    xk = sample_batched(fitted["gaussian"], x, seed=0)
    result = label_leakage(x, xk, y, seed=0)
    n_test = result["n_test"]
    assert result["excess"] <= bound(result)
    # negative control: the same knockoffs with y written into their top two rows must exceed it
    leaky = xk.clone()
    leaky[:, 0, :2, :] = 0
    leaky[torch.arange(len(y)), 0, y // 8, y % 8] = 1.0
    leaked = label_leakage(x, leaky, y, seed=0)
    assert leaked["excess"] > bound(leaked)
    assert result["knockoff_acc"] < result["real_acc"]
    assert result["chance"] == pytest.approx(0.1, abs=0.01)

    shuffled = PermutationKnockoffs().sample(x, generator=torch.Generator().manual_seed(0))
    independent = label_leakage(x, shuffled, y, seed=0)
    chance = independent["chance"]
    # about 1/10 for an independent copy; 4 binomial standard errors of slack
    assert independent["knockoff_acc"] <= chance + 4 * math.sqrt(chance * (1 - chance) / n_test)

    planted = shuffled.clone()
    planted[:, 0, :2, :] = 0
    planted[torch.arange(len(y)), 0, y // 8, y % 8] = 1.0  # the label written into the top rows
    assert label_leakage(x, planted, y, seed=0)["knockoff_acc"] > 0.9


# ---------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("name", ["gaussian", "gaussian-sdp", "gan", "permutation"])
def test_save_load_round_trip(fitted, digit_data, tmp_path, name):
    _, _, (x, _) = digit_data
    gen = fitted[name]
    path = tmp_path / f"{name}.pt"
    gen.save(path)
    for loaded in (load(path), type(gen).load(path)):
        assert type(loaded) is type(gen) and loaded.config() == gen.config()
        a = gen.sample(x[:32], generator=torch.Generator().manual_seed(3))
        b = loaded.sample(x[:32], generator=torch.Generator().manual_seed(3))
        assert torch.equal(a, b)


def test_external_module_round_trip(digit_data, tmp_path):
    _, _, (x, _) = digit_data

    class Noisy(nn.Module):  # a stochastic user model that uses torch's global RNG
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(0.0))

        def forward(self, x):
            return x + self.scale * torch.randn_like(x)

    module = Noisy()
    with torch.no_grad():
        module.scale.fill_(0.3)
    gen = ExternalKnockoffs(module)
    before = torch.get_rng_state()
    a = gen.sample(x[:8], generator=torch.Generator().manual_seed(5))
    assert torch.equal(before, torch.get_rng_state())  # the global RNG is left as it was
    gen.save(tmp_path / "ext.pt")
    loaded = ExternalKnockoffs.load(tmp_path / "ext.pt", fn=Noisy())
    assert float(loaded.fn.scale.detach()) == pytest.approx(0.3)
    assert torch.equal(a, loaded.sample(x[:8], generator=torch.Generator().manual_seed(5)))
    with pytest.raises(ValueError, match="fn"):
        ExternalKnockoffs.load(tmp_path / "ext.pt")
    with pytest.raises(ValueError, match="shape"):
        ExternalKnockoffs(lambda t: t[:, :, :4]).sample(x[:8])


def test_load_errors(fitted, tmp_path):
    good = tmp_path / "good.pt"
    fitted["gaussian"].save(good)
    blob = good.read_bytes()

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="truncated.pt"):
        load(truncated)

    obj = torch.load(good, weights_only=True)
    obj["version"] = 99
    torch.save(obj, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="version 99"):
        load(tmp_path / "future.pt")

    with pytest.raises(ValueError, match="holds a 'gaussian' generator, not 'permutation'"):
        PermutationKnockoffs.load(good)

    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a scop checkpoint"):
        load(tmp_path / "other.pt")

    obj = torch.load(good, weights_only=True)
    obj["payload"]["state"]["cov"] = torch.zeros(3, 3, dtype=torch.float64)
    torch.save(obj, tmp_path / "mismatch.pt")
    with pytest.raises(ValueError, match="does not fit its config"):
        load(tmp_path / "mismatch.pt")

    with pytest.raises(ValueError, match="missing.pt: no such checkpoint file"):
        load(tmp_path / "missing.pt")


def test_interface_errors(digit_data):
    _, _, (x, _) = digit_data
    with pytest.raises(ValueError, match="name must be one of"):
        make_generator("vae")
    assert isinstance(make_generator("gaussian", method="sdp"), GaussianKnockoffs)
    with pytest.raises(ValueError, match="not fitted"):
        GaussianKnockoffs().sample(x[:4])
    with pytest.raises(ValueError, match="method"):
        GaussianKnockoffs(method="lasso")
    gen = GaussianKnockoffs(shape=(1, 8, 8))
    with pytest.raises(ValueError, match=r"x must have shape \(N, 1, 8, 8\)"):
        gen.sample(torch.zeros(4, 1, 9, 9))
    with pytest.raises(ValueError, match="block=3"):
        GaussianKnockoffs(shape=(1, 8, 8), block=3)
    assert issubclass(KnockoffGAN, KnockoffGenerator)


# ---------------------------------------------------------------------------------- diagnostics


def test_importing_knockoffs_does_not_load_matplotlib():
    """Plotting is imported only when check() draws, so a user of the generators never pays for
    matplotlib; importing the plotting module itself, in the same process, shows the probe sees it."""
    probe = "import sys; print(any(m.split('.')[0] == 'matplotlib' for m in sys.modules))"
    code = f"import scop_ext.knockoffs; {probe}; import scop_ext.plots; {probe}"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True"]


def test_swap_gap_matches_explicit_permutation():
    gen = torch.Generator().manual_seed(0)
    x, xk = torch.randn(50, 6, generator=gen), torch.randn(50, 6, generator=gen)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    subsets = torch.tensor([[True, False, True], [False, False, False]])
    gaps = swap_gaps(x, xk, groups, subsets, chunk=5)
    c = torch.cov(torch.cat([x, xk], 1).T.double())
    p = torch.eye(12, dtype=torch.float64)
    for j in (0, 1, 4, 5):
        p[[j, j + 6]] = p[[j + 6, j]]
    assert gaps[0] == pytest.approx(float(torch.linalg.matrix_norm(c - p @ c @ p.T) / torch.linalg.matrix_norm(c)))
    assert gaps[1] == 0.0


def test_exchangeability_against_closed_form():
    """Exact knockoffs: the gap is sampling noise (about the floor of exactly exchangeable pairs);
    x~ = x: exactly 0 (a valid knockoff without power, which power shows); a permutation breaks
    every cross-covariance, a reflection 2 mu - x flips them, so it is further still."""
    d, n = 20, 20_000
    cov = ar1(d, 0.6)
    mean = torch.zeros(d, dtype=torch.float64)
    x = draw(mean, cov, n, seed=0)
    exact = GaussianKnockoffs.from_covariance(mean, cov).sample(x, generator=torch.Generator().manual_seed(1))
    good = exchangeability(x, exact, block=1, seed=0)
    assert good["ratio_to_floor"] < 1.5
    assert good["gap"] < 0.1 * good["null_gap"]

    same = exchangeability(x, x.clone(), block=1, seed=0)
    assert same["gap"] < 1e-12
    assert power(x, x) == pytest.approx(1.0)
    assert power(x, exact) == pytest.approx(1 - min(1.0, 2 * float(torch.linalg.eigvalsh(cov)[0])), abs=0.02)

    shuffled = PermutationKnockoffs().sample(x, generator=torch.Generator().manual_seed(2))
    reflected = exchangeability(x, 2 * mean - x, block=1, seed=0, null=shuffled)
    assert good["null_gap"] > 10 * good["noise_floor"]
    assert reflected["gap"] > 1.2 * reflected["null_gap"]
    assert abs(power(x, shuffled)) < 4 / math.sqrt(n)


def test_feature_exchangeability():
    """A per-channel affine map keeps exact knockoffs exchangeable coordinate-wise, so the gap
    at its output stays at the noise floor while a permutation's does not."""
    c, n = 4, 5_000
    shape = (c, 2, 2)
    d = c * 4
    cov = ar1(d, 0.5)
    x = draw(torch.zeros(d, dtype=torch.float64), cov, n, seed=0)
    gen = GaussianKnockoffs.from_covariance(torch.zeros(d), cov, shape=shape, block=1)
    images = x.float().reshape(n, *shape)
    xk = gen.sample(images, generator=torch.Generator().manual_seed(0))
    model = nn.Sequential(nn.Conv2d(c, c, 1, groups=c), nn.Flatten())
    result = feature_exchangeability(model, ["0", "1"], images, xk, pool="flatten", seed=0)
    assert set(result) == {"0", "1"} and result["1"]["dim"] == d
    for layer in result.values():
        assert layer["ratio_to_floor"] < 1.5 and layer["gap"] < 0.2 * layer["null_gap"]
    pooled = feature_exchangeability(model, ["0"], images, xk, seed=0)
    assert pooled["0"]["dim"] == c
    with pytest.raises(ValueError, match="not modules"):
        feature_exchangeability(model, ["conv9"], images, xk)


def test_s0_on_correlated_data_matches_closed_form(tmp_path):
    """s^0_c = mean over the positions j of channel c of Var(X_j) - Cov(X_j, X~_j), which for
    exact equicorrelated knockoffs is gamma Var(X_j) with gamma = min(1, 2 lambda_min(corr)) < 1
    here: the covariance term is far from 0, so an estimate that dropped it (Var alone) fails."""
    shape, n = (2, 3, 3), 20_000
    d = math.prod(shape)
    scales = torch.tensor([0.5, 2.0], dtype=torch.float64).repeat_interleave(9).sqrt()
    cov = ar1(d, 0.6, scales)
    gen = GaussianKnockoffs.from_covariance(torch.zeros(d), cov, shape=shape)
    gamma = min(1.0, 2 * float(torch.linalg.eigvalsh(ar1(d, 0.6))[0]))
    assert gamma < 0.6
    s_coord = gamma * torch.diagonal(cov)
    closed = s_coord.reshape(2, 9).mean(1)
    x = draw(torch.zeros(d, dtype=torch.float64), cov, n, seed=0).reshape(n, *shape)
    report = check(gen, x, tmp_path / "out", n=n, n_subsets=2, swap_test_steps=0)
    s0 = torch.tensor(report["s0"], dtype=torch.float64)
    # per coordinate the estimate is a mean of X_j (X_j - X~_j): variance (2 Var s + s^2) / n;
    # averaging correlated positions cannot make it larger than the largest of them
    sd = ((2 * torch.diagonal(cov) * s_coord + s_coord**2) / n).sqrt().reshape(2, 9).max(1).values
    assert bool(((s0 - closed).abs() < 5 * sd).all()), (s0, closed, sd)
    variance = torch.diagonal(cov).reshape(2, 9).mean(1)
    assert bool(((s0 - variance).abs() > 20 * sd).all())
    xk = sample_batched(gen, x, seed=0)
    assert torch.equal(s0, lemma2.estimate_s(x, xk))  # the one estimator, the one the pipeline uses


def test_check_writes_report(fitted, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
    report = check(fitted["gaussian"], digits("test"), tmp_path / "out", model=model, layers=["1", "3"], n=300, swap_test_steps=30)
    out = tmp_path / "out"
    assert strict_json((out / "report.json").read_text()) == json.loads(json.dumps(report))
    for name in ("embedding.png", "grid.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(report) == sorted(
        ["generator", "n", "shape", "seed", "grid", "resolution", "block", "exchangeability", "layers", "power", "leakage",
         "swap_test", "s0", "figures", "verdict"]
    )
    assert report["generator"]["kind"] == "gaussian" and report["n"] == 300 and report["block"] == 2
    assert report["grid"] == [4, 4] and report["resolution"] == [1, 8, 8]  # digits: measured as they are
    assert set(report["layers"]) == {"1", "3"}
    assert report["exchangeability"]["gap"] < report["exchangeability"]["null_gap"]
    assert len(report["s0"]) == 1 and report["s0"][0] > 0
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    with pytest.raises(ValueError, match="model and layers"):
        check(fitted["gaussian"], digits("test"), tmp_path / "bad", model=model)


def strict_json(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_report_is_strict_json_when_a_reference_is_zero(fitted, tmp_path):
    """A dead layer (constant output) has gap, permutation gap and noise floor all 0: its ratios
    are undefined and must be written as null, not NaN."""
    dead = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
    with torch.no_grad():
        dead[0].weight.zero_()
        dead[0].bias.fill_(-1.0)
    report = check(fitted["gaussian"], digits("test"), tmp_path, model=dead, layers=["1"], n=100, swap_test_steps=0)
    layer = strict_json((tmp_path / "report.json").read_text())["layers"]["1"]
    assert layer["null_gap"] == 0 and layer["ratio_to_null"] is None and layer["ratio_to_floor"] is None
    assert report["layers"]["1"]["ratio_to_null"] is None


def test_plots_write_png(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x, xk = torch.rand(20, 3, 4, 4, generator=gen), torch.rand(20, 3, 4, 4, generator=gen)
    groups = pixel_groups((3, 4, 4), 2)
    embedding_figure([("input", x.flatten(1), xk.flatten(1), groups)], tmp_path / "e.png")
    knockoff_grid(x, xk, tmp_path / "g.png", [("conv", x[:, :2], xk[:, :2])], columns=4)
    for name in ("e.png", "g.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_random_subsets_are_seeded():
    assert torch.equal(random_subsets(16, 5, seed=3), random_subsets(16, 5, seed=3))
    with pytest.raises(ValueError, match="n_subsets must be a positive int, got 0"):
        exchangeability(torch.rand(8, 4), torch.rand(8, 4), n_subsets=0)
    assert random_subsets(1000, 1, seed=0).float().mean() == pytest.approx(0.5, abs=0.06)


# ---------------------------------------------- singular covariances: jitter, never a crash


def _degenerate_images(kind: str) -> torch.Tensor:
    x = torch.rand(200, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    if kind == "constant pixels":
        x[:, :, 0, :] = 0.0  # a border that never changes, as on digits
    elif kind == "duplicated channels":
        x[:, 1] = x[:, 0]
    elif kind == "all constant":
        x[:] = 0.25
    return x


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("kind", ["constant pixels", "duplicated channels", "all constant"])
@pytest.mark.parametrize("method", ["equi", "sdp"])
def test_singular_image_covariance_is_jittered_with_a_warning(kind, method):
    shrinkage = "ledoit-wolf" if kind == "all constant" else 0.0  # Ledoit-Wolf has nothing to shrink there
    loader = DataLoader(TensorDataset(_degenerate_images(kind)), batch_size=50)
    with pytest.warns(UserWarning, match="covariance is singular or ill-conditioned.*added .* to its diagonal"):
        gen = GaussianKnockoffs(method=method, block=2, shrinkage=shrinkage).fit(loader)
    sigma, s = gen.cov, gen.S
    joint = torch.cat([torch.cat([sigma, sigma - s], 1), torch.cat([sigma - s, sigma], 1)])
    assert _psd_floor(joint) > -1e-9
    # the sampler draws exactly from 2S - S Sigma^-1 S: its factor was not clipped
    cond = 2 * s - s @ torch.linalg.solve(sigma, s)
    noise = gen.noise_factor.double()
    torch.testing.assert_close(noise @ noise.T, cond, atol=1e-5 * float(cond.abs().max()) + 1e-12, rtol=0)
    xk = gen.sample(_degenerate_images(kind)[:8], generator=torch.Generator().manual_seed(1))
    assert bool(torch.isfinite(xk).all())


@pytest.mark.usefixtures("one_thread")
def test_well_conditioned_covariance_gives_no_warning():
    loader = DataLoader(TensorDataset(torch.rand(200, 1, 4, 4, generator=torch.Generator().manual_seed(0))), batch_size=50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GaussianKnockoffs(block=2).fit(loader)
