"""``scop knockoffs check``: every measure of a fitted generator in one report, with the seed's
figures (§S3).

The measures live beside what they measure: :mod:`~scop_ext.knockoffs.exchangeability` (the
swap gap of inputs and feature layers, and power), :mod:`~scop_ext.knockoffs.leakage` (label
leakage) and :mod:`~scop_ext.knockoffs.swap` (the classifier swap test). Plotting is imported
only when :func:`check` draws, so that importing :mod:`scop_ext.knockoffs` does not load
matplotlib.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..nn import lemma2
from ..ops.checks import check_counts
from ..train.checkpoint import write_json
from .base import KnockoffGenerator, images_of, pixel_groups, resize
from .exchangeability import (
    MAX_DIM,
    exchangeability,
    feature_exchangeability,
    measurement_shape,
    permutation_null,
    pool_features,
    power,
)
from .leakage import label_leakage
from .swap import swap_advantage

__all__ = ["collect", "sample_batched", "check", "verdict"]

logger = logging.getLogger(__name__)


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
    step = _Steps(x.shape[0])
    with step("sampling knockoffs"):
        xk = sample_batched(gen, x, seed, batch_size)
    null = permutation_null(x, seed)
    xm, xkm, nullm = (resize(t, measured[1:]) if len(shape) == 3 else t for t in (x, xk, null))
    report: dict[str, Any] = {"generator": {"kind": gen.kind, "config": gen.config()}, "n": x.shape[0],
                              "shape": list(shape), "seed": seed, "grid": list(grid), "resolution": list(measured),
                              "block": block, "layers": {}}
    with step(f"exchangeability over {n_subsets} block subsets"):
        report["exchangeability"] = exchangeability(xm, xkm, block, n_subsets, seed, null=nullm, max_dim=max_dim)
        report["power"] = {"mean_corr": power(xm, xkm), "null_mean_corr": power(xm, nullm)}
    with step("label leakage (three logistic regressions)"):
        report["leakage"] = label_leakage(x, xk, y, seed) if y is not None and not y.is_floating_point() else None
    with step(f"swap test ({swap_test_steps} discriminator steps)"):
        report["swap_test"] = (swap_advantage(xm, xkm, block, steps=swap_test_steps, seed=seed)
                               if swap_test_steps and x.dim() == 4 else None)
    report["s0"] = lemma2.estimate_s(x, xk).tolist()
    report["figures"] = {"embedding": "embedding.png", "grid": "grid.png"}
    features: dict[str, tuple[Tensor, Tensor]] = {}
    if model is not None:
        report["layers"] = feature_exchangeability(model, layers, x, xk, pool, n_subsets, seed, null, max_dim,
                                                   batch_size, features=features)
    input_panel = ("input", xm.flatten(1), xkm.flatten(1), pixel_groups(measured, block))
    with step("figures"):
        _draw(out_dir, x, xk, input_panel, features, list(layers or []), pool, seed)
    report["verdict"] = verdict(report)
    write_json(os.path.join(out_dir, "report.json"), report)
    return report


class _Steps:
    """One log line as each part of the check starts and how long it took: the whole check can
    run for minutes."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, what: str):
        self.what = what
        return self

    def __enter__(self):
        self.t = time.time()
        logger.info("[check] %s (%d images) ...", self.what, self.n)

    def __exit__(self, *exc):
        if exc[0] is None:
            logger.info("[check] %s: %.1f s", self.what, time.time() - self.t)


def _draw(out_dir: str, x: Tensor, xk: Tensor, input_panel: tuple, features: dict[str, tuple[Tensor, Tensor]],
          layers: list[str], pool: str, seed: int) -> None:
    """``embedding.png`` (the measured inputs, then every layer pooled) and ``grid.png`` (the
    images, then the maps of the first and the last layer)."""
    from ..plots import (  # here, not at the top: matplotlib only when drawing
        embedding_figure,
        knockoff_grid,
    )

    panels = [input_panel]
    for name in layers:
        a, b = (pool_features(f, pool) for f in features[name])
        panels.append((name, a, b, torch.arange(a.shape[1])))
    shown = [layers[0], layers[-1]] if len(layers) > 1 else layers
    maps = [(name, *features[name]) for name in shown if features[name][0].dim() == 4]
    embedding_figure(panels, os.path.join(out_dir, "embedding.png"), seed)
    knockoff_grid(x, xk, os.path.join(out_dir, "grid.png"), maps)


def verdict(report: dict) -> list[str]:
    """What each measure of a :func:`check` report means for pruning, one line each, led by
    ``ok``, ``weak`` or ``bad``.

    - exchangeability: the swap gap against its sampling-noise floor (the gap of an exactly
      exchangeable pair at this N) and against a permutation (no knockoff at all). Near the floor
      is as exchangeable as N can tell; half-way to the permutation the control is biased.
    - power: the mean correlation of a pixel with its knockoff. Near 1 the knockoffs are copies,
      real and knockoff branches look alike and every filter scores near 0.
    - leakage: does ``[x, x~]`` predict the label better than ``x`` alone (``excess``)? A
      knockoff must add nothing; 2 points is about the sampling error of the held-out half.
    - swap test: a trained discriminator's edge at telling swapped blocks (0 = cannot).
    """
    lines = []
    ex = report.get("exchangeability") or {}
    floor, null, gap = ex.get("noise_floor"), ex.get("null_gap"), ex.get("gap")
    if gap is not None and floor and null:
        if gap <= 1.5 * floor:
            lines.append(f"ok    exchangeability: swap gap {gap:.3f}, at its sampling-noise floor {floor:.3f} "
                         f"(a permutation gives {null:.3f})")
        elif gap <= floor + 0.5 * (null - floor):
            lines.append(f"weak  exchangeability: swap gap {gap:.3f} is above its noise floor {floor:.3f} (a "
                         f"permutation gives {null:.3f}): the control group differs from the data; fit longer or "
                         "choose a larger block")
        else:
            lines.append(f"bad   exchangeability: swap gap {gap:.3f} is closer to a permutation's {null:.3f} than to "
                         f"the noise floor {floor:.3f}: these are not knockoffs of the data")
    corr = (report.get("power") or {}).get("mean_corr")
    if corr is not None:
        level = "ok   " if corr < 0.8 else "weak " if corr < 0.95 else "bad  "
        what = ("knockoffs differ enough from their images to serve as a control" if corr < 0.8 else
                "knockoffs are close to their images: filters will score near 0 and separate slowly")
        lines.append(f"{level} power: mean corr(x, x~) {corr:.2f}: {what}")
    leak = report.get("leakage")
    if leak:
        bad = leak["excess"] > 0.02
        lines.append(f"{'bad  ' if bad else 'ok   '} leakage: [x, x~] predicts the label {100 * leak['joint_acc']:.1f}% "
                     f"vs {100 * leak['real_acc']:.1f}% from x alone (excess {100 * leak['excess']:+.1f} points; "
                     f"x~ alone {100 * leak['knockoff_acc']:.1f}%, chance {100 * leak['chance']:.1f}%): "
                     + ("the knockoffs carry label information of their own" if bad else
                        "x~ adds nothing to x, as a knockoff must; x~ alone predicts y only through x"))
    swap = report.get("swap_test")
    if swap:
        adv = swap["advantage"]
        lines.append(f"{'ok   ' if adv < 0.05 else 'weak ' if adv < 0.15 else 'bad  '} swap test: a trained "
                     f"discriminator tells swapped blocks with a {100 * adv:+.1f}-point edge over chance")
    return lines
