"""How good are the knockoffs? Exchangeability, power, label leakage, s^0, and the seed's figures.

Every measure comes with a reference so a number can be read on its own: the exchangeability gap
beside the gap of a permutation (an independent copy, the "bad" end) and beside the sampling-noise
floor of the pairs under test (their own coordinates swapped at random per sample, which is
exactly exchangeable: the gap an exact knockoff of the same size would show), leakage beside
chance and beside the real inputs.

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
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .. import lemma2
from ..checkpoint import write_json
from .base import KnockoffGenerator, check_counts, images_of, pixel_groups, resize
from .baselines import PermutationKnockoffs
from .gan import SwapDiscriminator, hidden_bce, swap_blocks
from .plots import embedding_figure, knockoff_grid

__all__ = [
    "MAX_DIM",
    "collect",
    "sample_batched",
    "measurement_shape",
    "random_subsets",
    "swap_gaps",
    "exchangeability",
    "layer_features",
    "feature_exchangeability",
    "power",
    "label_leakage",
    "swap_advantage",
    "check",
]


# ---------------------------------------------------------------------------------- data


def collect(data: Any, n: int | None = None, seed: int = 0) -> tuple[Tensor, Tensor | None]:
    """Up to ``n`` samples as tensors ``(x, y)`` (``y`` None when the data has no labels).

    Args:
        data: a Dataset of ``x`` or ``(x, y)`` items, a loader of such batches, a tensor, or an
            ``(x, y)`` pair of tensors. From a Dataset a random subset (by ``seed``) is taken.
    """
    if isinstance(data, Tensor):
        return (data if n is None else data[:n]), None
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        return (x, y) if n is None else (x[:n], y[:n])
    if isinstance(data, Dataset):
        total = len(data)  # type: ignore[arg-type]
        take = total if n is None else min(n, total)
        order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:take]
        data = DataLoader(torch.utils.data.Subset(data, order.tolist()), batch_size=512)
    if not isinstance(data, Iterable):
        raise ValueError(f"data must be a Dataset, loader, tensor or (x, y) pair, got {type(data).__name__}")
    xs, ys, count = [], [], 0
    for batch in data:
        xs.append(images_of(batch))
        if isinstance(batch, (tuple, list)) and len(batch) > 1 and isinstance(batch[1], Tensor):
            ys.append(batch[1])
        count += xs[-1].shape[0]
        if n is not None and count >= n:
            break
    if not xs:
        raise ValueError("data is empty")
    x = torch.cat(xs)[:n]
    y = torch.cat(ys)[:n] if len(ys) == len(xs) else None
    return x, y


def sample_batched(gen: KnockoffGenerator, x: Tensor, seed: int = 0, batch_size: int = 512) -> Tensor:
    """``gen.sample`` over ``x`` in batches, all from one ``torch.Generator`` seeded with ``seed``."""
    rng = torch.Generator().manual_seed(seed)
    return torch.cat([gen.sample(chunk, generator=rng) for chunk in x.split(batch_size)])


def _permutation_null(x: Tensor, seed: int) -> Tensor:
    """The reference knockoffs every measure compares against: a permutation seeded with ``seed + 1``."""
    return PermutationKnockoffs().sample(x, torch.Generator().manual_seed(seed + 1))


# ---------------------------------------------------------------------------------- exchangeability

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
        null = _permutation_null(x, seed)
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


def _pool(features: Tensor, pool: str) -> Tensor:
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
) -> dict[str, dict]:
    """The exchangeability gap at feature layers (seed §S3): of ``[F(x), F(x~)]``.

    Args:
        pool: ``"channel"`` (spatial mean per channel: (N, C') features) or ``"flatten"``
            (all (N, C' H' W') coordinates, at most ``max_dim``); each coordinate is its own
            swap group.
        null: reference knockoffs of ``x`` (default a seeded permutation), passed through the
            same layers.

    Returns:
        {layer: the dict of :func:`exchangeability` plus ``dim``}.
    """
    if null is None:
        null = _permutation_null(x, seed)
    fx, fk, fn = (layer_features(model, layers, t) for t in (x, xk, null))
    return _feature_gaps(fx, fk, fn, layers, pool, n_subsets, seed, max_dim)


def _feature_gaps(fx, fk, fn, layers, pool, n_subsets, seed, max_dim) -> dict[str, dict]:
    out = {}
    for name in layers:
        a, b, c = (_pool(f[name], pool) for f in (fx, fk, fn))
        groups = torch.arange(a.shape[1])
        subsets = random_subsets(a.shape[1], n_subsets, seed)
        gaps, null_gaps = (swap_gaps(a, t, groups, subsets, max_dim=max_dim) for t in (b, c))
        summary = _summary(gaps, null_gaps, _noise_floor(a, b, groups, subsets, seed, max_dim))
        out[name] = {**summary, "dim": a.shape[1], "pool": pool}
    return out


# ---------------------------------------------------------------------------------- power, leakage


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


def _classifier_features(x: Tensor, max_features: int) -> Tensor:
    """(N, ...) -> (N, <= max_features): images are average-pooled spatially to fit."""
    if x.dim() == 4 and x[0].numel() > max_features:
        side = max(1, int(math.sqrt(max_features / x.shape[1])))
        x = F.adaptive_avg_pool2d(x, side)
    return x.flatten(1)


def label_leakage(x: Tensor, xk: Tensor, y: Tensor, seed: int = 0, max_features: int = 1024) -> dict:
    """Does ``x~`` carry label information beyond what ``x`` has? Held-out accuracies of three
    classifiers, on ``x``, on ``x~`` and on ``[x, x~]``.

    The knockoff condition is ``x~ ⊥ y | x``, not ``x~ ⊥ y``, so chance is not the target for
    ``x~`` alone: a valid knockoff of correlated inputs depends on ``x`` and predicts ``y`` as
    far as it keeps ``x``'s information (the closer to ``x``, the less power, the nearer
    ``real_acc``). Only an ``x~`` independent of ``x``, such as a permutation, sits at chance.
    What is tested is the conditional statement: ``excess = joint_acc - real_acc`` should be 0
    up to sampling error; a knockoff that encodes ``y`` makes the classifier on ``[x, x~]``
    beat the one on ``x``. ``excess`` is bounded by ``1 - real_acc``, so the test is blind where
    ``x`` alone already predicts every label.

    Each classifier (scikit-learn ``LogisticRegression`` on standardised features; images
    average-pooled to at most ``max_features`` coordinates) is fitted on a stratified half (by
    ``seed``) and scored on the other half.

    Returns:
        dict: ``knockoff_acc``, ``real_acc``, ``joint_acc``, ``excess``, ``chance``
        (majority-class share of the test half), ``n_test``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = y.detach().cpu().numpy()
    if len(labels) != x.shape[0]:
        raise ValueError(f"y must have one label per sample ({x.shape[0]}), got {len(labels)}")
    real = _classifier_features(x.detach().cpu().float(), max_features).numpy()
    knock = _classifier_features(xk.detach().cpu().float(), max_features).numpy()
    counts = torch.bincount(torch.as_tensor(labels))
    stratify = labels if int(counts[counts > 0].min()) >= 2 else None
    train, test = train_test_split(torch.arange(len(labels)).numpy(), test_size=0.5, random_state=seed, stratify=stratify)

    def accuracy(features) -> float:
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        clf.fit(features[train], labels[train])
        return float(clf.score(features[test], labels[test]))

    real_acc, knock_acc = accuracy(real), accuracy(knock)
    joint_acc = accuracy(np.concatenate([real, knock], 1))
    test_counts = np.bincount(labels[test])
    return {
        "knockoff_acc": knock_acc,
        "real_acc": real_acc,
        "joint_acc": joint_acc,
        "excess": joint_acc - real_acc,
        "chance": float(test_counts.max() / test_counts.sum()),
        "n_test": len(test),
    }


def swap_advantage(
    x: Tensor,
    xk: Tensor,
    block: int,
    steps: int = 500,
    width: int = 32,
    hint_rate: float = 0.5,
    batch_size: int = 128,
    repeats: int = 8,
    seed: int = 0,
) -> dict:
    """A classifier two-sample test of exchangeability beyond second order.

    A fresh :class:`~scop_ext.knockoffs.gan.SwapDiscriminator` is trained for ``steps`` Adam
    steps (lr 1e-3) on the first half of the pairs to tell which blocks of ``[x, x~]`` were
    swapped (with ``hint_rate`` of them revealed), then scored on the unrevealed blocks of the
    second half under ``repeats`` fresh swap patterns.

    Its power grows with ``steps``: on the digits a permutation goes undetected after 200 steps
    and is plain after 500, so read a small advantage as "not detected at this budget".

    Returns:
        dict: ``advantage`` = held-out accuracy - 1/2 (0: swaps undetectable), ``stderr``
        (binomial, counting every scored block as independent, so a lower bound), ``scored``.
    """
    if x.dim() != 4 or x.shape != xk.shape:
        raise ValueError(f"x and xk must be (N, C, H, W) of one shape, got {tuple(x.shape)} and {tuple(xk.shape)}")
    check_counts(False, block=block, steps=steps, width=width, batch_size=batch_size, repeats=repeats)
    if not 0 <= hint_rate < 1:
        raise ValueError(f"hint_rate must be in [0, 1), got {hint_rate}")
    if x.shape[-1] % block or x.shape[-2] % block:
        raise ValueError(f"block={block} does not divide the image size {tuple(x.shape[-2:])}")
    if x.shape[0] < 4:
        raise ValueError(f"need at least 4 pairs, got {x.shape[0]}")
    rng = torch.Generator().manual_seed(seed)
    x, xk = x.detach().float().cpu(), xk.detach().float().cpu()
    order = torch.randperm(x.shape[0], generator=rng)
    train, test = order[: x.shape[0] // 2], order[x.shape[0] // 2 :]
    grid = (x.shape[-2] // block, x.shape[-1] // block)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        disc = SwapDiscriminator(x.shape[1], block, width)
    opt = torch.optim.Adam(disc.parameters(), lr=1e-3)

    def scored(idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mask = (torch.rand((len(idx), 1, *grid), generator=rng) < 0.5).float()
        revealed = (torch.rand((len(idx), 1, *grid), generator=rng) < hint_rate).float()
        logits = disc(torch.cat(swap_blocks(x[idx], xk[idx], mask), 1), revealed * (2 * mask - 1))
        return logits, mask, revealed

    for _ in range(steps):
        idx = train[torch.randint(len(train), (min(batch_size, len(train)),), generator=rng)]
        logits, mask, revealed = scored(idx)
        loss = hidden_bce(logits, mask, revealed)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    hits = total = 0.0
    with torch.no_grad():
        for _ in range(repeats):
            logits, mask, revealed = scored(test)
            hits += float((((logits > 0).float() == mask).float() * (1 - revealed)).sum())
            total += float((1 - revealed).sum())
    acc = hits / max(total, 1.0)
    return {"advantage": acc - 0.5, "stderr": math.sqrt(max(acc * (1 - acc), 1e-12) / max(total, 1.0)), "scored": int(total)}


# ---------------------------------------------------------------------------------- report


def check(
    gen: KnockoffGenerator,
    dataset: Any,
    out_dir: str | os.PathLike,
    model: nn.Module | None = None,
    layers: Sequence[str] | None = None,
    seed: int = 0,
    n: int = 1000,
    n_subsets: int = 20,
    grid: Sequence[int] | None = None,
    pool: str = "channel",
    swap_test_steps: int = 500,
    batch_size: int = 512,
    max_dim: int = MAX_DIM,
) -> dict:
    """Measure a fitted generator and write ``report.json``, ``embedding.png`` and ``grid.png``.

    Exchangeability, power, the swap test and the embedding figure are measured at the bounded
    resolution of :func:`measurement_shape` (module docstring): at most ``max_dim``
    coordinates, each swap block cut into ``block x block`` cells. Leakage (its own pooling),
    s^0 (what :func:`scop_ext.lemma2.solve` needs at the first conv), the feature layers and
    the image grid use the inputs as they are.

    Args:
        gen: a fitted generator.
        dataset: see :func:`collect`; ``n`` samples are used (labels enable the leakage test).
        out_dir: created if needed; files are written atomically.
        model, layers: a network and names of its modules to measure at (e.g. a shallow and a
            deep one); figures and feature gaps use them.
        grid: swap blocks (rows, columns); default ``gen.swap_grid``.
        pool: feature pooling for the layer gaps (see :func:`feature_exchangeability`).
        swap_test_steps: training steps of :func:`swap_advantage`; 0 skips it.

    Returns:
        The report (also in ``report.json``, strict JSON: None where a ratio is undefined):
        ``generator`` (kind, config), ``n``, ``shape``, ``seed``, ``grid``, ``resolution`` and
        ``block`` (the shape and block edge measured at), ``exchangeability`` and per-layer
        ``layers`` (see :func:`exchangeability`), ``power`` (``mean_corr``,
        ``null_mean_corr``), ``leakage`` (see :func:`label_leakage`; None without integer
        labels), ``swap_test`` (or None), ``s0`` (per input channel), ``figures`` (file names).
    """
    if (model is None) != (not layers):
        raise ValueError("model and layers go together: pass both or neither")
    check_counts(False, n=n)
    if not isinstance(swap_test_steps, int) or swap_test_steps < 0:
        raise ValueError(f"swap_test_steps must be an int >= 0, got {swap_test_steps!r}")
    out_dir = os.fspath(out_dir)
    x, y = collect(dataset, n, seed)
    shape = tuple(x.shape[1:])
    grid = tuple(gen.swap_grid(shape) if grid is None else grid)
    measured, block = measurement_shape(shape, grid, max_dim)  # before any sampling: fail fast
    os.makedirs(out_dir, exist_ok=True)
    xk = sample_batched(gen, x, seed, batch_size)
    null = _permutation_null(x, seed)
    xm, xkm, nullm = (resize(t, measured[1:]) if len(shape) == 3 else t for t in (x, xk, null))
    report: dict[str, Any] = {
        "generator": {"kind": gen.kind, "config": gen.config()},
        "n": x.shape[0],
        "shape": list(shape),
        "seed": seed,
        "grid": list(grid),
        "resolution": list(measured),
        "block": block,
        "exchangeability": exchangeability(xm, xkm, block, n_subsets, seed, null=nullm, max_dim=max_dim),
        "layers": {},
        "power": {"mean_corr": power(xm, xkm), "null_mean_corr": power(xm, nullm)},
        "leakage": label_leakage(x, xk, y, seed) if y is not None and not y.is_floating_point() else None,
        "swap_test": swap_advantage(xm, xkm, block, steps=swap_test_steps, seed=seed)
        if swap_test_steps > 0 and x.dim() == 4
        else None,
        "s0": lemma2.estimate_s(x, xk).tolist(),
        "figures": {"embedding": "embedding.png", "grid": "grid.png"},
    }
    panels = [("input", xm.flatten(1), xkm.flatten(1), pixel_groups(measured, block))]
    maps: list[tuple[str, Tensor, Tensor]] = []
    if model is not None:
        fx, fk, fn = (layer_features(model, layers, t, batch_size) for t in (x, xk, null))
        report["layers"] = _feature_gaps(fx, fk, fn, layers, pool, n_subsets, seed, max_dim)
        for name in layers:
            a, b = _pool(fx[name], pool), _pool(fk[name], pool)
            panels.append((name, a, b, torch.arange(a.shape[1])))
        shown = [layers[0], layers[-1]] if len(layers) > 1 else list(layers)
        maps = [(name, fx[name], fk[name]) for name in shown if fx[name].dim() == 4]
    embedding_figure(panels, os.path.join(out_dir, "embedding.png"), seed)
    knockoff_grid(x, xk, os.path.join(out_dir, "grid.png"), maps)
    write_json(os.path.join(out_dir, "report.json"), report)
    return report
