"""Importance criteria: one score per output channel of each convolution (higher = keep).

Each criterion is a small class whose call ``criterion(model)`` returns
``{conv qualified name: (C_out,) float tensor}``. Criteria only score; which channels are
coupled and which are removed is decided by :mod:`scop_ext.prune.select`.
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import Tensor, fx, nn

from ..nn.scop_conv import ScopConv2d

__all__ = [
    "ScopImportance",
    "L1Importance",
    "L2Importance",
    "BNScaleImportance",
    "RandomImportance",
    "make_importance",
    "criterion_names",
    "following_batchnorm",
]


class _LayerTracer(fx.Tracer):
    # Convolutions (ScopConv2d included) and norms are leaves: their forward is never traced,
    # so a model in SCOP mode traces like its plain counterpart.
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.modules.batchnorm._BatchNorm)) or super().is_leaf_module(m, qualname)


def following_batchnorm(model: nn.Module) -> dict[str, str]:
    """For each ``nn.Conv2d`` whose output feeds a BatchNorm directly, that BatchNorm's name.

    Found by symbolic tracing (``torch.fx``) of the module graph, so no input is needed. A
    BatchNorm "directly follows" a conv when the conv's output is the BatchNorm's input, with
    nothing in between.

    Returns:
        ``{conv name: batchnorm name}``.

    Raises:
        ValueError: when ``torch.fx`` cannot trace the model (data-dependent control flow).
    """
    try:
        graph = _LayerTracer().trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, ... for untraceable code
        raise ValueError(
            f"could not trace {type(model).__name__} with torch.fx to find the BatchNorm after each conv: {exc}"
        ) from exc
    modules = dict(model.named_modules())
    pairs = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        source = node.args[0] if node.args else None
        if (
            isinstance(source, fx.Node)
            and source.op == "call_module"
            and isinstance(modules.get(source.target), nn.Conv2d)
        ):
            pairs[source.target] = node.target
    return pairs


def _convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def _bn_scales(model: nn.Module) -> dict[str, Tensor]:
    """|gamma| of the BatchNorm directly after each conv that has an affine one."""
    modules = dict(model.named_modules())
    scales = {}
    for conv, bn in following_batchnorm(model).items():
        if modules[bn].weight is not None:
            scales[conv] = modules[bn].weight.detach().abs().clone()
    return scales


class ScopImportance:
    """SCOP's importance ``I_j = beta_j - beta~_j = 2 beta_j - 1`` in [-1, 1] (DESIGN.md §1, stage 3).

    Scores every :class:`~scop_ext.layers.ScopConv2d` that has learned scales (``beta`` set);
    other convolutions get no score.

    Args:
        multiply_bn_gamma: multiply each score by |gamma| of the BatchNorm directly after the
            conv, as the authors' code does (then scores leave [-1, 1] and lose the symmetry the
            FDR threshold relies on). Every scored conv must then have a following BatchNorm.
    """

    def __init__(self, multiply_bn_gamma: bool = False) -> None:
        self.multiply_bn_gamma = multiply_bn_gamma

    def __call__(self, model: nn.Module) -> dict[str, Tensor]:
        scores = {
            name: m.importance().clone()
            for name, m in model.named_modules()
            if isinstance(m, ScopConv2d) and m.beta is not None
        }
        if not scores:
            raise ValueError("model has no ScopConv2d with learned beta: convert it and learn the scales first")
        if self.multiply_bn_gamma:
            gammas = _bn_scales(model)
            missing = sorted(set(scores) - set(gammas))
            if missing:
                raise ValueError(f"multiply_bn_gamma=True but no affine BatchNorm directly follows {missing}")
            scores = {name: s * gammas[name].to(s) for name, s in scores.items()}
        return scores

    def __repr__(self) -> str:
        return f"ScopImportance(multiply_bn_gamma={self.multiply_bn_gamma})"


class L1Importance:
    """L1 norm of each filter, ``sum |W[j]|`` over (C_in / groups, kH, kW), for every conv."""

    def __call__(self, model: nn.Module) -> dict[str, Tensor]:
        return {name: m.weight.detach().abs().sum(dim=(1, 2, 3)) for name, m in _convs(model).items()}

    def __repr__(self) -> str:
        return "L1Importance()"


class L2Importance:
    """L2 norm of each filter, ``||W[j]||_2`` over (C_in / groups, kH, kW), for every conv."""

    def __call__(self, model: nn.Module) -> dict[str, Tensor]:
        return {name: m.weight.detach().flatten(1).norm(dim=1) for name, m in _convs(model).items()}

    def __repr__(self) -> str:
        return "L2Importance()"


class BNScaleImportance:
    """|gamma| of the affine BatchNorm directly after each conv (network slimming, Liu et al. 2017).

    Convs without such a BatchNorm get no score.
    """

    def __call__(self, model: nn.Module) -> dict[str, Tensor]:
        return _bn_scales(model)

    def __repr__(self) -> str:
        return "BNScaleImportance()"


class RandomImportance:
    """Uniform random scores in [0, 1) for every conv: the baseline any criterion must beat.

    The same ``seed`` gives the same scores on every call (drawn in module order).
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def __call__(self, model: nn.Module) -> dict[str, Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        return {name: torch.rand(m.out_channels, generator=generator) for name, m in _convs(model).items()}

    def __repr__(self) -> str:
        return f"RandomImportance(seed={self.seed})"


_CRITERIA = {
    "scop": ScopImportance,
    "l1": L1Importance,
    "l2": L2Importance,
    "bn_scale": BNScaleImportance,
    "random": RandomImportance,
}


def criterion_names() -> list[str]:
    """The names :func:`make_importance` accepts, sorted."""
    return sorted(_CRITERIA)


def make_importance(name: str, **kwargs):
    """The criterion called ``name`` ("scop", "l1", "l2", "bn_scale", "random"), built with ``kwargs``.

    Example::

        >>> make_importance("scop", multiply_bn_gamma=True)
        ScopImportance(multiply_bn_gamma=True)
    """
    if name not in _CRITERIA:
        raise ValueError(f"unknown importance {name!r}; expected one of {criterion_names()}")
    return _CRITERIA[name](**kwargs)


class TorchPruningImportance(tp.importance.Importance):
    """A criterion's scores as a Torch-Pruning ``Importance``, so its pruners prune by SCOP.

    Example (after stage 2)::

        >>> scores = ScopImportance()(model)       # {conv name: 2 beta - 1}
        >>> scop_ext.restore(model)                # plain convs: Torch-Pruning traces a plain forward
        >>> pruner = tp.pruner.MetaPruner(model, x, importance=TorchPruningImportance(model, scores),
        ...                               pruning_ratio=0.5, ignored_layers=[model.fc])
        >>> pruner.step()

    A group's score for channel ``k`` is the mean of the scores its member convs give ``k``, the
    rule of :meth:`scop_ext.prune.space.PruningSpace.group_scores`, so with the same ratio the
    pruner removes the channels :func:`~scop_ext.prune.select.uniform` does. A group with a
    channel no member scores gets None, which Torch-Pruning's pruners skip.

    Args:
        model: the network the pruner will be given (modules are matched by name, so build this
            after :func:`scop_ext.restore`, which replaces modules).
        scores: ``{conv name: (C_out,) scores}`` from any criterion of this module.
    """

    def __init__(self, model: nn.Module, scores: dict[str, Tensor]) -> None:
        self._names = {m: n for n, m in model.named_modules()}
        self.scores = {n: torch.as_tensor(s).detach().to("cpu", torch.float64).flatten() for n, s in scores.items()}

    @torch.no_grad()
    def __call__(self, group) -> Tensor | None:
        """(size,) float32 scores of ``group``'s channels (Torch-Pruning's ``Importance`` call)."""
        size = len(group[0].idxs)
        total = torch.zeros(size, dtype=torch.float64)
        count = torch.zeros(size, dtype=torch.float64)
        for item in group:
            name = self._names.get(item.dep.target.module)
            outputs = item.dep.handler in (tp.prune_conv_out_channels, tp.prune_depthwise_conv_out_channels)
            if name not in self.scores or not outputs:
                continue
            roots = torch.tensor(item.root_idxs)
            total[roots] += self.scores[name][torch.tensor(item.idxs)]
            count[roots] += 1
        return (total / count).float() if bool((count > 0).all()) else None

    def __repr__(self) -> str:
        return f"TorchPruningImportance({len(self.scores)} scored convs)"
