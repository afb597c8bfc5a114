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

__all__ = ["embedding_figure", "knockoff_grid", "pca_2d", "plot_betas", "plot_importance", "plot_channels", "plot_curves"]


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


def plot_importance(importance: dict[str, list[float]], removed: dict[str, list[int]], path: str) -> None:
    """Every filter's importance, one column per layer (x: layers in network order), kept filters
    blue and removed ones red, and each layer's cut as a short black bar midway between its
    highest removed and lowest kept filter."""
    names = list(importance)
    fig, ax = _figure((max(6, 0.32 * len(names) + 2), 4.5))
    counts = [0, 0]
    for i, name in enumerate(names):
        values, gone = importance[name], set(removed.get(name, []))
        kept = [v for j, v in enumerate(values) if j not in gone]
        cut = [v for j, v in enumerate(values) if j in gone]
        counts[0], counts[1] = counts[0] + len(kept), counts[1] + len(cut)
        spread = torch.linspace(-0.25, 0.25, max(len(values), 2)).tolist()
        ax.scatter([i + spread[j % len(spread)] for j in range(len(kept))], kept, s=6, color="tab:blue", lw=0)
        ax.scatter([i + spread[j % len(spread)] for j in range(len(cut))], cut, s=6, color="tab:red", lw=0)
        if kept and cut:
            ax.hlines((max(cut) + min(kept)) / 2, i - 0.4, i + 0.4, color="black", lw=1.2)
    ax.scatter([], [], s=12, color="tab:blue", label=f"kept ({counts[0]})")
    ax.scatter([], [], s=12, color="tab:red", label=f"removed ({counts[1]})")
    ax.hlines([], 0, 0, color="black", label="the layer's cut")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_ylabel("importance")
    ax.set_title("Filter importance per layer and the cut")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path, dpi=120)


def plot_curves(scales: dict | None, finetune: list[dict] | None, path: str) -> None:
    """Stage 2's loss and each layer's mean beta per epoch, beside fine-tuning's training loss and
    validation top-1 per epoch (whichever the run has)."""
    fig = Figure(figsize=(11, 3.8))
    FigureCanvasAgg(fig)
    left, middle, right = fig.subplots(1, 3)
    if scales and scales.get("loss"):
        left.plot(range(1, len(scales["loss"]) + 1), scales["loss"], marker="o", ms=3)
        for name, means in (scales.get("beta_mean") or {}).items():
            middle.plot(range(1, len(means) + 1), means, lw=0.8, alpha=0.7)
    left.set(title="Stage 2: loss", xlabel="epoch", ylabel="cross-entropy (real half)")
    middle.set(title="Stage 2: mean beta per layer", xlabel="epoch", ylabel="mean beta")
    if finetune:
        epochs = [r["epoch"] + 1 for r in finetune]
        right.plot(epochs, [r["train_loss"] for r in finetune], marker="o", ms=3, label="train loss")
        if "val_top1" in finetune[0]:
            twin = right.twinx()
            twin.plot(epochs, [100 * r["val_top1"] for r in finetune], color="tab:green", marker="s", ms=3)
            twin.set_ylabel("validation top-1 %", color="tab:green")
    right.set(title="Fine-tuning", xlabel="epoch", ylabel="training loss")
    fig.tight_layout()
    _save(fig, path, dpi=110)


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
