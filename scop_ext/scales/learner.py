"""Stage 2 inside your own training loop: :class:`ScaleLearner`."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.scop_conv import convert, scop_layers
from ..train.training import batchnorms
from .learn import _check_bn, _paired_loss, _train_betas_only

__all__ = ["ScaleLearner"]


class ScaleLearner:
    """Stage 2 inside your own training loop (Lightning, accelerate, or a hand-written one).

    Converts ``model`` (:func:`scop_ext.convert`), freezes every parameter but the scales beta
    and puts the model in eval mode, its BatchNorms normalising over each [real; knockoff]
    batch when ``bn="batch"`` (the authors' choice; the running statistics are put back by
    :meth:`finish`) or ``"batch_detached"`` (the same, statistics constant in the backward: see
    :func:`learn_scales`), or using the stored statistics when ``bn="frozen"``. :func:`learn_scales`
    is the same stage as one call, with resumable progress, Lemma 2 biases and torchrun.

    Example::

        >>> learner = ScaleLearner(model)
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
    """

    def __init__(self, model: nn.Module, skip=None, bn: str = "batch") -> None:
        _check_bn(bn)
        self.model, self.bn = convert(model, skip), bn
        self.layers = scop_layers(self.model)
        if not self.layers:
            raise ValueError("model has no nn.Conv2d left to wrap (all skipped?)")
        self._restore = _train_betas_only(self.model, self.layers)

    def parameters(self) -> list[nn.Parameter]:
        """The betas, one (C_out,) Parameter per wrapped conv: all an optimizer should see."""
        return [layer.beta for layer in self.layers.values()]

    def loss(self, x: Tensor, x_knockoff: Tensor, y: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy) -> Tensor:
        """``loss_fn`` on the real half's logits of the paired batch ``[x; x_knockoff]``.

        Shapes: ``x``, ``x_knockoff`` (N, C, H, W); ``y`` what ``loss_fn`` takes with (N, classes) logits.
        """
        if x.shape != x_knockoff.shape:
            raise ValueError(f"x_knockoff must have x's shape {tuple(x.shape)}, got {tuple(x_knockoff.shape)}")
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
