"""The trained model a pruning run starts from: loaded from a model name and weights, and checked
against the data (channels, classes) and against the layer names the config gives."""

from __future__ import annotations

import difflib
import fnmatch
import os

import torch
from torch import Tensor, nn

from ..export import load_model, read_arch
from ..models import build_model
from ..prune.groups import plain_forward

__all__ = ["check_conv_names", "load_trained", "model_sizes"]


def load_trained(model_name: str, info, weights: str | None) -> nn.Module:
    """The trained model. A ``save_model`` stem (the output of ``scop train``) describes its own
    architecture; a config naming another model is refused rather than recorded beside weights
    it cannot reload."""
    if weights and os.path.isfile(str(weights) + ".json"):
        arch = read_arch(weights)
        if arch["model"] != model_name:
            raise ValueError(f"weights {weights}: is a {arch['model']!r} model ({weights}.json), but model is "
                             f"{model_name!r}; set model to {arch['model']!r}")
        model, _ = load_model(weights)
        return model
    return build_model(model_name, info.num_classes, info.in_channels, weights=weights)


def check_conv_names(model: nn.Module, key: str, patterns) -> None:
    """Every name or pattern in ``patterns`` must match a convolution of ``model`` (a typo would
    otherwise be ignored silently and the layer wrapped or pruned after all)."""
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in convs):
            near = difflib.get_close_matches(pattern, convs, n=3, cutoff=0.3) or convs[:3]
            raise ValueError(f"{key}: {pattern!r} names no convolution of the model; nearest: {', '.join(near)}")


@torch.no_grad()
def model_sizes(model: nn.Module, example: Tensor, info, what: str) -> tuple[int, int]:
    """``(num_classes, in_channels)`` the model was built for, checked against the data's: its
    first convolution's input channels, and the width of its output on ``example``. Saved
    models record these, not the data's, so they reload; data with more classes than the
    model has outputs is refused."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    in_channels = info.in_channels if conv is None else conv.in_channels
    if in_channels != info.in_channels:
        raise ValueError(f"dataset {info.name!r} has {info.in_channels}-channel images, but {what} takes {in_channels} channels")
    try:
        # SCOP mode off: a converted model (a stage-2 result handed on) would want a paired batch
        with plain_forward(model), torch.no_grad():
            num_classes = model.eval()(example).shape[-1]
    except RuntimeError as exc:  # e.g. images too small for the model's pooling
        raise ValueError(f"{what} cannot run on the dataset's images of shape {tuple(example.shape[1:])} "
                         f"({str(exc).strip().splitlines()[0]})") from None
    if info.num_classes > num_classes:
        raise ValueError(f"dataset {info.name!r} has {info.num_classes} classes, but {what} has {num_classes} outputs")
    return num_classes, in_channels
