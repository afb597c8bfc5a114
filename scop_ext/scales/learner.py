"""Stage 2 inside your own training loop: :class:`ScaleLearner`."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.scop_conv import convert, scop_layers
from ..train.training import batchnorms
from .learn import (
    _check_bn,
    _paired_loss,
    _train_betas_only,
    fit_knockoff_biases,
    layer_seed,
)

__all__ = ["ScaleLearner"]


class ScaleLearner:
    """Stage 2 inside your own training loop (Lightning, accelerate, or a hand-written one).

    Converts ``model`` (:func:`scop_ext.convert`), freezes every parameter but the scales beta
    and puts the model in eval mode, its BatchNorms normalising over each [real; knockoff]
    batch when ``bn="batch"`` (the authors' choice; the running statistics are put back by
    :meth:`finish`) or ``"batch_detached"`` (the same, statistics constant in the backward: see
    :func:`learn_scales`), or using the stored statistics when ``bn="frozen"``. With
    ``knockoff_bias=True`` (the default, as in :func:`learn_scales` and ``scop prune``) each layer
    adds its Lemma 2 bias pair, fitted by :meth:`fit_knockoff_biases` on a few paired batches
    before the first :meth:`loss`. :func:`learn_scales` is the same stage as one call, with
    resumable progress and torchrun.

    Example::

        >>> learner = ScaleLearner(model)
        >>> learner.fit_knockoff_biases(loader)      # a few (x, x_knockoff, y) batches
        >>> opt = torch.optim.Adam(learner.parameters(), lr=0.004, betas=(0.5, 0.9))
        >>> for x, x_knockoff, y in loader:          # e.g. from pairs.pair_dataset(...)
        ...     loss = learner.loss(x, x_knockoff, y)
        ...     opt.zero_grad(); loss.backward(); opt.step()
        ...     learner.clamp_()
        >>> scores = learner.finish()                # {conv name: (C_out,) 2 beta - 1}

    Args:
        model: the pretrained network, changed in place.
        skip: convs to leave unwrapped (names, ``fnmatch`` patterns or a predicate, as for convert).
        bn: ``"batch"``, ``"batch_detached"`` or ``"frozen"``.
        knockoff_bias: add the Lemma 2 biases (False: the authors' forward, without them).
        seed: keys each layer's bias draws (as :func:`learn_scales` does).
    """

    def __init__(self, model: nn.Module, skip=None, bn: str = "batch", knockoff_bias: bool = True,
                 seed: int = 0) -> None:
        _check_bn(bn)
        self.model, self.bn = convert(model, skip), bn
        self.layers = scop_layers(self.model)
        if not self.layers:
            raise ValueError("model has no nn.Conv2d left to wrap (all skipped?)")
        self.knockoff_bias = bool(knockoff_bias)
        for name, layer in self.layers.items():
            layer.use_knockoff_bias = self.knockoff_bias
            if layer.generator is None:  # a generator the caller gave a layer stays
                layer.generator = torch.Generator().manual_seed(layer_seed(seed, name))
        self._restore = _train_betas_only(self.model, self.layers)

    def fit_knockoff_biases(self, pairs, batches: int = 4, gamma: float | None = None) -> dict[str, dict]:
        """Fit every layer's Lemma 2 bias from ``batches`` of ``pairs`` (``(x, x_knockoff, y)``
        batches on the model's device, or movable there); returns
        :func:`~scop_ext.scales.fit_knockoff_biases`' per-layer report."""
        device = next(self.model.parameters()).device
        return fit_knockoff_biases(self.model, pairs, device, batches=batches, gamma=gamma)

    def parameters(self) -> list[nn.Parameter]:
        """The betas, one (C_out,) Parameter per wrapped conv: all an optimizer should see."""
        return [layer.beta for layer in self.layers.values()]

    def loss(self, x: Tensor, x_knockoff: Tensor, y: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy) -> Tensor:
        """``loss_fn`` on the real half's logits of the paired batch ``[x; x_knockoff]``.

        Shapes: ``x``, ``x_knockoff`` (N, C, H, W); ``y`` what ``loss_fn`` takes with (N, classes) logits.
        """
        if x.shape != x_knockoff.shape:
            raise ValueError(f"x_knockoff must have x's shape {tuple(x.shape)}, got {tuple(x_knockoff.shape)}")
        if self.knockoff_bias and not all(layer.knockoff.fitted for layer in self.layers.values()):
            raise RuntimeError("ScaleLearner: the Lemma 2 knockoff biases are not fitted; call "
                               "learner.fit_knockoff_biases(loader) on a few paired batches first, or build it with "
                               "knockoff_bias=False (the authors' forward, without them)")
        self.model.eval()
        for m in batchnorms(self.model):
            m.train(self.bn != "frozen")
        return _paired_loss(self.model, x, x_knockoff, y, self.bn, loss_fn)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp every beta to [0, 1]; call after each optimizer step."""
        for layer in self.layers.values():
            layer.clamp_beta_()

    def finish(self) -> dict[str, Tensor]:
        """Unfreeze what was trainable, put the BatchNorm statistics back, return SCOP's scores."""
        self._restore()
        return {name: layer.importance().clone() for name, layer in self.layers.items()}
