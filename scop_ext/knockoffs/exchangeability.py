"""Are the knockoffs exchangeable with the real inputs? The second-order swap gap of inputs and of
feature layers, and power beside it.

The gap comes with two references so that it can be read on its own: the gap of a permutation
(an independent copy, the "bad" end) and the sampling-noise floor of the pairs under test (their
own coordinates swapped at random per sample, which is exactly exchangeable: the gap an exact
knockoff of the same size would show).

Measured resolution. The gap needs the 2d x 2d covariance of ``[x, x~]``, which at 3 x 224 x 224
would be ~360 GB. Images are therefore measured at a bounded resolution: each swap block is
cut into ``q x q`` cells and every cell is averaged per channel (area resampling), with the
largest ``q`` that keeps ``d = C * rows * cols * q^2`` at most ``max_dim`` (default
:data:`MAX_DIM`) and no finer than the input. Swapping whole blocks commutes with averaging
inside them, so exchangeable pairs stay exchangeable at the measured resolution; what is lost
is the detail inside a cell. (Where a block is not a whole number of input pixels, e.g. 100 px
knockoffed at 32, cells at block edges share up to one input pixel, so this holds only
approximately.) Reports give the ``resolution`` and ``block`` measured at.

Exchangeability gap: with ``C = cov([x, x~])`` (2d x 2d) and ``P_S`` the permutation that swaps
``x_j`` and ``x~_j`` for the coordinates of the block groups in ``S``,

    gap(S) = |C - P_S C P_S|_F / |C|_F,

averaged over random ``S`` (each group in ``S`` with probability 1/2). Second-order knockoffs
have gap 0 in the population; note that ``x~ = x`` has gap 0 too (it is a valid knockoff with
no power), which is why power is reported beside it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..ops.checks import check_counts
from .base import pixel_groups, resize
from .baselines import PermutationKnockoffs

__all__ = [
    "MAX_DIM",
    "permutation_null",
    "measurement_shape",
    "random_subsets",
    "swap_gaps",
    "exchangeability",
    "layer_features",
    "pool_features",
    "feature_exchangeability",
    "power",
]


def permutation_null(x: Tensor, seed: int) -> Tensor:
    """The reference knockoffs every measure compares against: a permutation seeded with ``seed + 1``."""
    return PermutationKnockoffs().sample(x, torch.Generator().manual_seed(seed + 1))


# Coordinates per side of the pair measured by default: CIFAR-10 (3 x 32 x 32) at full
# resolution; the 2d x 2d covariance is then 151 MB (float32, see _covariance).
MAX_DIM = 3072


def measurement_shape(shape: tuple[int, ...], grid: tuple[int, ...], max_dim: int = MAX_DIM) -> tuple[tuple[int, ...], int]:
    """The shape inputs are measured at and the swap-block edge there (module docstring).

    Args:
        shape: input shape without the batch, ``(C, H, W)`` or ``(d,)``.
        grid: swap blocks (rows, columns) for images, the number of groups for vectors (see
            :meth:`~scop_ext.knockoffs.KnockoffGenerator.swap_grid`).

    Returns:
        ``((C, rows * q, cols * q), q)`` for images, ``((d,), d / groups)`` for vectors.

    Raises:
        ValueError: when one value per block and channel is already more than ``max_dim``
            coordinates, naming the size and the options.
    """
    check_counts(False, max_dim=max_dim)
    if len(shape) == 1:
        if len(grid) != 1 or grid[0] < 1 or shape[0] % grid[0]:
            raise ValueError(f"grid must be a number of groups dividing the {shape[0]} coordinates, got {tuple(grid)}")
        return tuple(shape), shape[0] // grid[0]
    if len(shape) != 3:
        raise ValueError(f"shape must be (C, H, W) or (d,), got {tuple(shape)}")
    c, h, w = shape
    if len(grid) != 2 or not 1 <= grid[0] <= h or not 1 <= grid[1] <= w:
        raise ValueError(f"grid must be (rows, columns) of blocks, each from 1 to the image size {h}x{w}, got {tuple(grid)}")
    rows, cols = grid
    coarsest = c * rows * cols
    if coarsest > max_dim:
        raise ValueError(
            f"one value per swap block and channel is already {c}x{rows}x{cols} = {coarsest} coordinates "
            f"> max_dim={max_dim} (its covariance would take {_covariance_gb(coarsest):.1f} GB): "
            "use larger swap blocks (a coarser grid) or raise max_dim"
        )
    q = min(h // rows, w // cols, math.isqrt(max_dim // coarsest))
    return (c, rows * q, cols * q), q


def random_subsets(n_groups: int, n_subsets: int, seed: int = 0) -> Tensor:
    """(n_subsets, n_groups) bool: each group in each subset with probability 1/2."""
    check_counts(False, n_subsets=n_subsets)
    return torch.rand((n_subsets, n_groups), generator=torch.Generator().manual_seed(seed)) < 0.5


# widest covariance (2d columns) computed in float64; wider ones in float32, to halve the memory
_FLOAT64_WIDTH = 4096


def _covariance_gb(d: int) -> float:
    """Size of the (2d, 2d) covariance of a pair, as :func:`_covariance` stores it."""
    return (2 * d) ** 2 * (8 if 2 * d <= _FLOAT64_WIDTH else 4) / 1e9


def _covariance(z: Tensor) -> Tensor:
    z = z.detach().cpu()
    dtype = torch.float64 if z.shape[1] <= _FLOAT64_WIDTH else torch.float32
    z = z.to(dtype)
    z = z - z.mean(0)
    return z.T @ z / max(z.shape[0] - 1, 1)


def swap_gaps(
    x: Tensor, xk: Tensor, groups: Tensor, subsets: Tensor, chunk: int = 1024, max_dim: int = MAX_DIM
) -> Tensor:
    """``gap(S)`` (module docstring) for each subset.

    Args:
        x, xk: (N, d) paired samples, ``d <= max_dim``.
        groups: (d,) int64 group of each coordinate.
        subsets: (K, G) bool, the groups swapped in each subset.

    Returns:
        (K,) float64.
    """
    if x.shape != xk.shape or x.dim() != 2:
        raise ValueError(f"x and xk must be (N, d) of one shape, got {tuple(x.shape)} and {tuple(xk.shape)}")
    d = x.shape[1]
    if d > max_dim:
        raise ValueError(
            f"x has d={d} coordinates > max_dim={max_dim}: the {2 * d}x{2 * d} covariance would take "
            f"{_covariance_gb(d):.1f} GB; measure fewer coordinates (coarser blocks for images, "
            "pool='channel' for features) or raise max_dim"
        )
    if groups.shape != (d,):
        raise ValueError(f"groups must have shape ({d},), got {tuple(groups.shape)}")
    c = _covariance(torch.cat([x, xk], 1))
    norm = float(torch.linalg.matrix_norm(c)) or 1.0
    out = []
    for subset in subsets:
        swapped = subset[groups]
        perm = torch.arange(2 * d)
        perm[:d][swapped] += d
        perm[d:][swapped] -= d
        sq = 0.0
        for start in range(0, 2 * d, chunk):  # row blocks keep the memory at O(chunk * d)
            rows = slice(start, start + chunk)
            sq += float((c[rows] - c[perm[rows]][:, perm]).pow(2).sum())
        out.append(math.sqrt(sq) / norm)
    return torch.tensor(out, dtype=torch.float64)


def _noise_floor(x: Tensor, xk: Tensor, groups: Tensor, subsets: Tensor, seed: int, max_dim: int) -> float:
    """The mean gap of the pairs after swapping an independent random subset of groups in every
    sample: that mixture is exactly swap-invariant, so its gap is pure sampling noise at this N
    and scale. An exact knockoff's gap has the same distribution (ratio about 1)."""
    own = torch.rand((x.shape[0], int(groups.max()) + 1), generator=torch.Generator().manual_seed(seed + 2)) < 0.5
    swapped = own[:, groups].to(x.device)
    return float(swap_gaps(torch.where(swapped, xk, x), torch.where(swapped, x, xk), groups, subsets, max_dim=max_dim).mean())


def _summary(gaps: Tensor, null: Tensor, floor: float) -> dict:
    gap, null_gap = float(gaps.mean()), float(null.mean())
    # None, not NaN, where a reference is 0 (e.g. a constant feature): reports are strict JSON
    return {
        "gap": gap,
        "gap_std": float(gaps.std()) if gaps.numel() > 1 else 0.0,
        "null_gap": null_gap,
        "ratio_to_null": gap / null_gap if null_gap > 0 else None,
        "noise_floor": floor,
        "ratio_to_floor": gap / floor if floor > 0 else None,
        "n_subsets": gaps.numel(),
    }


def exchangeability(
    x: Tensor,
    xk: Tensor,
    block: int = 1,
    n_subsets: int = 20,
    seed: int = 0,
    null: Tensor | None = None,
    max_dim: int = MAX_DIM,
) -> dict:
    """Exchangeability gap of paired inputs over random pixel-block subsets, with references.

    Args:
        x, xk: (N, C, H, W) (blocks of ``block`` pixels with all channels) or (N, d)
            (``block`` consecutive coordinates).
        null: the reference knockoffs, default a permutation of ``x`` (seeded); scored on the
            same subsets.
        max_dim: images with more coordinates are measured block-cell-averaged (module
            docstring); vectors must have at most this many.

    Returns:
        dict: ``gap``, ``gap_std``, ``null_gap``, ``ratio_to_null`` (gap / null_gap: near 0 is
        good, near 1 no better than an independent copy), ``noise_floor`` (the gap of exactly
        exchangeable pairs at this N), ``ratio_to_floor`` (about 1 for exact knockoffs; the
        ratios are None where the reference is 0), ``n_subsets``, ``resolution`` (the shape
        measured at) and ``block`` (the block edge there).
    """
    if x.shape != xk.shape:
        raise ValueError(f"x and xk must have the same shape, got {tuple(x.shape)} and {tuple(xk.shape)}")
    shape = tuple(x.shape[1:])
    groups = pixel_groups(shape, block)  # checks that block tiles the input
    grid = (shape[1] // block, shape[2] // block) if len(shape) == 3 else (shape[0] // block,)
    measured, q = measurement_shape(shape, grid, max_dim)
    if null is None:
        null = permutation_null(x, seed)
    if measured != shape:
        x, xk, null = (resize(t, measured[1:]) for t in (x, xk, null))
        groups = pixel_groups(measured, q)
    subsets = random_subsets(int(groups.max()) + 1, n_subsets, seed)
    flat, flat_k = x.flatten(1), xk.flatten(1)
    gaps = swap_gaps(flat, flat_k, groups, subsets, max_dim=max_dim)
    null_gaps = swap_gaps(flat, null.flatten(1), groups, subsets, max_dim=max_dim)
    floor = _noise_floor(flat, flat_k, groups, subsets, seed, max_dim)
    return {**_summary(gaps, null_gaps, floor), "resolution": list(measured), "block": q}


def layer_features(model: nn.Module, layers: Sequence[str], x: Tensor, batch_size: int = 256) -> dict[str, Tensor]:
    """Outputs of the named submodules of ``model`` on ``x``, via forward hooks.

    Runs in eval mode without gradients on the model's device (restoring its mode), in batches.

    Returns:
        {name: (N, ...) tensor on the CPU}.
    """
    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        raise ValueError(f"layers {missing} are not modules of the model; some that are: {list(modules)[1:8]}")
    store: dict[str, list[Tensor]] = {name: [] for name in layers}

    def hook_for(name: str):
        def hook(_module, _inputs, output):
            store[name].append((output[0] if isinstance(output, (tuple, list)) else output).detach().cpu())

        return hook

    handles = [modules[name].register_forward_hook(hook_for(name)) for name in layers]
    was_training = model.training
    device = next(iter(model.parameters()), torch.empty(0)).device
    try:
        model.eval()
        with torch.no_grad():
            for chunk in x.split(batch_size):
                model(chunk.to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: torch.cat(parts) for name, parts in store.items()}


def pool_features(features: Tensor, pool: str) -> Tensor:
    """(N, C', H', W') features -> (N, C') spatial means (``"channel"``) or (N, C' H' W')
    (``"flatten"``); (N, d) features stay as they are under ``"channel"``."""
    if pool == "channel":
        return features.flatten(2).mean(2) if features.dim() > 2 else features
    if pool == "flatten":
        return features.flatten(1)
    raise ValueError(f"pool must be 'channel' or 'flatten', got {pool!r}")


def feature_exchangeability(
    model: nn.Module,
    layers: Sequence[str],
    x: Tensor,
    xk: Tensor,
    pool: str = "channel",
    n_subsets: int = 20,
    seed: int = 0,
    null: Tensor | None = None,
    max_dim: int = MAX_DIM,
    batch_size: int = 256,
    features: dict[str, tuple[Tensor, Tensor]] | None = None,
) -> dict[str, dict]:
    """The exchangeability gap at feature layers (seed §S3): of ``[F(x), F(x~)]``.

    Args:
        pool: ``"channel"`` (spatial mean per channel: (N, C') features) or ``"flatten"``
            (all (N, C' H' W') coordinates, at most ``max_dim``); each coordinate is its own
            swap group.
        null: reference knockoffs of ``x`` (default a seeded permutation), passed through the
            same layers.
        batch_size: of the forward passes (see :func:`layer_features`).
        features: a dict to receive ``{layer: (F(x), F(x~))}`` as :func:`layer_features` gives
            them, for a caller that also draws them, so that the model runs once.

    Returns:
        {layer: the dict of :func:`exchangeability` plus ``dim`` and ``pool``}.
    """
    if null is None:
        null = permutation_null(x, seed)
    fx, fk, fn = (layer_features(model, layers, t, batch_size) for t in (x, xk, null))
    out = {}
    for name in layers:
        a, b, c = (pool_features(f[name], pool) for f in (fx, fk, fn))
        groups = torch.arange(a.shape[1])
        subsets = random_subsets(a.shape[1], n_subsets, seed)
        gaps, null_gaps = (swap_gaps(a, t, groups, subsets, max_dim=max_dim) for t in (b, c))
        summary = _summary(gaps, null_gaps, _noise_floor(a, b, groups, subsets, seed, max_dim))
        out[name] = {**summary, "dim": a.shape[1], "pool": pool}
        if features is not None:
            features[name] = (fx[name], fk[name])
    return out


# ---------------------------------------------------------------------------------- power


def power(x: Tensor, xk: Tensor) -> float:
    """Mean over coordinates of ``corr(x_j, x~_j)`` (lower is more power at equal
    exchangeability); coordinates constant in ``x`` or ``x~`` are left out.

    Args:
        x, xk: (N, ...) paired samples.
    """
    a = x.detach().flatten(1).to(torch.float64).cpu()
    b = xk.detach().flatten(1).to(torch.float64).cpu()
    a, b = a - a.mean(0), b - b.mean(0)
    sa, sb = a.pow(2).sum(0).sqrt(), b.pow(2).sum(0).sqrt()
    keep = (sa > 1e-12 * sa.max()) & (sb > 1e-12 * sb.max())
    if not bool(keep.any()):
        raise ValueError("every coordinate is constant: correlation is undefined")
    return float(((a * b).sum(0)[keep] / (sa[keep] * sb[keep])).mean())
