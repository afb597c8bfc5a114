"""Every figure the package draws, with matplotlib's Agg canvas, saved as PNG: the seed's knockoff
pictures (§S3) and a pruning report's scales, importance and channel plots.

Figures are built on ``matplotlib.figure.Figure`` directly, not pyplot, so nothing here touches
matplotlib's global backend or figure registry.
"""

from __future__ import annotations

import io
import os

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from .train.checkpoint import atomic_write_bytes

__all__ = ["embedding_figure", "knockoff_grid", "pca_2d", "plot_betas", "plot_importance", "plot_channels"]


def _figure(figsize: tuple[float, float]):
    """A figure on an Agg canvas and its one axes."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _save(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> None:
    """Render the PNG in memory, then write it atomically, like every file of a run: a kill
    mid-write leaves the previous figure or the new one, never a truncated PNG."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())


def pca_2d(fit_on: Tensor, *others: Tensor) -> list[Tensor]:
    """Project rows onto the top two principal axes of ``fit_on``.

    Args:
        fit_on: (N, D); others: (M, D) each.

    Returns:
        [(N, 2), (M, 2), ...] in float64.
    """
    a = fit_on.detach().to(torch.float64).cpu()
    mean = a.mean(0)
    _, _, vh = torch.linalg.svd(a - mean, full_matrices=False)
    axes = vh[:2].T
    return [(t.detach().to(torch.float64).cpu() - mean) @ axes for t in (a, *others)]


def embedding_figure(
    panels: list[tuple[str, Tensor, Tensor, Tensor]],
    path: str | os.PathLike,
    seed: int = 0,
) -> None:
    """Seed Fig. S1: ``[A, A~]`` and ``[A, A~]_swap`` in 2-D, one point per sample, overlaid.

    Half of the groups (chosen with ``seed``) are swapped. Exchangeable knockoffs give two
    clouds that overlap; the PCA axes are fitted on the unswapped ``[A, A~]``.

    Args:
        panels: ``(title, A, A~, groups)`` with A and A~ (N, d) and groups (d,) int64.
        path: PNG to write.
    """
    if not panels:
        raise ValueError("panels must not be empty")
    rng = torch.Generator().manual_seed(seed)
    fig = Figure(figsize=(4.2 * len(panels), 4.0))
    for i, (title, a, ak, groups) in enumerate(panels):
        n_groups = int(groups.max()) + 1
        chosen = torch.randperm(n_groups, generator=rng)[: n_groups // 2]
        swapped = torch.isin(groups, chosen)
        a_sw = torch.where(swapped, ak, a)
        ak_sw = torch.where(swapped, a, ak)
        pair, pair_sw = torch.cat([a, ak], 1), torch.cat([a_sw, ak_sw], 1)
        p, p_sw = pca_2d(pair, pair_sw)
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.scatter(p[:, 0], p[:, 1], s=4, alpha=0.5, color="tab:blue", label="[A, Ã]")
        ax.scatter(p_sw[:, 0], p_sw[:, 1], s=4, alpha=0.5, color="tab:orange", label="[A, Ã]_swap")
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
        if i == 0:
            ax.legend(loc="best", fontsize=8, markerscale=3)
    fig.tight_layout()
    _save(fig, path)


def _displayable(img: Tensor) -> Tensor:
    """(C, H, W) -> (H, W) or (H, W, 3) scaled to [0, 1] per image (data may be normalised)."""
    img = img.detach().to(torch.float32).cpu()
    img = img[0] if img.shape[0] != 3 else img.permute(1, 2, 0)
    lo, hi = img.min(), img.max()
    return (img - lo) / (hi - lo) if hi > lo else torch.zeros_like(img)


def knockoff_grid(
    x: Tensor,
    xk: Tensor,
    path: str | os.PathLike,
    features: list[tuple[str, Tensor, Tensor]] = (),
    columns: int = 8,
) -> None:
    """Seed Fig. S2: real images, their knockoffs, and feature maps of both, as a grid.

    Args:
        x, xk: (N, C, H, W) real images and their knockoffs; the first ``columns`` are shown.
        features: ``(layer name, F(x), F(x~))`` with maps (N, C', H', W'); each row shows the
            channel mean, so shallow and deep layers read alike.
        path: PNG to write.
    """
    n = min(columns, x.shape[0])
    rows: list[tuple[str, Tensor]] = [("real", x[:n]), ("knockoff", xk[:n])]
    for name, fx, fk in features:
        if fx.dim() != 4:
            raise ValueError(f"features of {name!r} must be (N, C, H, W) maps, got {tuple(fx.shape)}")
        rows += [(f"{name} (real)", fx[:n].mean(1, keepdim=True)), (f"{name} (knockoff)", fk[:n].mean(1, keepdim=True))]
    fig = Figure(figsize=(1.3 * n + 1.6, 1.3 * len(rows)))
    for r, (label, imgs) in enumerate(rows):
        for c in range(n):
            ax = fig.add_subplot(len(rows), n, r * n + c + 1)
            ax.imshow(_displayable(imgs[c]).numpy(), cmap="gray", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    fig.tight_layout()
    _save(fig, path)


# ---------------------------------------------------------------------- a pruning run's report


def plot_betas(betas: dict[str, list[float]], path: str) -> None:
    """One box per layer: the distribution of learned beta."""
    names = list(betas)
    fig, ax = _figure((max(6, 0.35 * len(names) + 2), 4))
    ax.boxplot([betas[n] for n in names], showfliers=True)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=90, fontsize=7)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--", label="initial 0.5 (real = knockoff)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("beta (real-branch scale)")
    ax.set_title("Learned scales per layer")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    _save(fig, path, dpi=120)


def plot_importance(importance: dict[str, list[float]], removed: dict[str, list[int]], path: str,
                    cut_points: list[tuple[float, float]] = ()) -> None:
    """Histogram of all filters' importance, kept and removed stacked, with the cut the policy made.

    ``cut_points``: ``(highest removed, lowest kept)`` per pruned group
    (:func:`~scop_ext.prune.select.cuts`). Where one threshold separates removed from kept in
    every group it is drawn as one line midway; otherwise each group's cut is drawn faintly.
    """
    kept, cut = [], []
    for name, values in importance.items():
        gone = set(removed.get(name, []))
        for j, v in enumerate(values):
            (cut if j in gone else kept).append(v)
    fig, ax = _figure((6, 4))
    ax.hist([kept, cut], bins=40, stacked=True, label=[f"kept ({len(kept)})", f"removed ({len(cut)})"],
            color=["tab:blue", "tab:red"])
    if cut_points:
        below, above = max(r for r, _ in cut_points), min(k for _, k in cut_points)
        if below < above:
            threshold = (below + above) / 2
            ax.axvline(threshold, color="black", lw=1.0, ls="--", label=f"cut at {threshold:.3g}")
        else:
            for i, (r, k) in enumerate(cut_points):
                ax.axvline((r + k) / 2, color="black", lw=0.6, ls="--", alpha=0.35,
                           label=f"cut per group ({len(cut_points)})" if i == 0 else None)
    ax.set_xlabel("importance")
    ax.set_ylabel("filters")
    ax.set_title("Filter importance and the cut")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path, dpi=120)


def plot_channels(widths_before: dict[str, int], widths_after: dict[str, int], path: str) -> None:
    """Output channels per conv layer before and after pruning."""
    names = list(widths_before)
    fig, ax = _figure((max(6, 0.35 * len(names) + 2), 4))
    xs = range(len(names))
    ax.bar(xs, [widths_before[n] for n in names], color="lightgrey", label="before")
    ax.bar(xs, [widths_after.get(n, 0) for n in names], color="tab:blue", label="after")
    ax.set_xticks(list(xs), names, rotation=90, fontsize=7)
    ax.set_ylabel("output channels")
    ax.set_title("Channels kept per layer")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path, dpi=120)
