"""Model zoo: He et al.'s ResNets for small images (:mod:`.cifar`), any torchvision or timm CNN by
name, and weights read only from a local file (:mod:`.weights`: a pretrained checkpoint meeting
other data gets a new classifier). Nothing is ever downloaded."""

from __future__ import annotations

import logging
import os
import types

import torch
from torch import Tensor, nn

from ..nn.channels import ChannelShuffle as _ChannelShuffle
from ..ops.checks import check_counts
from .cifar import (
    BasicBlock,
    CifarResNet,
    resnet8,
    resnet20,
    resnet32,
    resnet56,
    resnet110,
    resnet_digits,
)
from .weights import load_weights, read_state_dict

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "resnet8",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet110",
    "resnet_digits",
    "build_model",
    "model_names",
    "example_input",
    "check_sizes",
    "MAX_CLASSES",
    "MAX_IN_CHANNELS",
    "data_config",
    "read_state_dict",
]

logger = logging.getLogger(__name__)

TORCHVISION_PREFIX = "torchvision:"
TIMM_PREFIX = "timm:"

# Bounds on sizes that may come from a file (a model description): beyond them a classifier or a
# stem is gigabytes before anything could check it. ImageNet-21k has 21,841 classes.
MAX_CLASSES = 100_000
MAX_IN_CHANNELS = 1024



def check_sizes(num_classes, in_channels) -> None:
    """ValueError naming ``num_classes`` or ``in_channels`` unless each is a positive int within
    its bound (:data:`MAX_CLASSES`, :data:`MAX_IN_CHANNELS`)."""
    check_counts(False, num_classes=num_classes, in_channels=in_channels)
    for name, value, bound in (("num_classes", num_classes, MAX_CLASSES), ("in_channels", in_channels, MAX_IN_CHANNELS)):
        if value > bound:
            raise ValueError(f"{name} must be at most {bound}, got {value}")


def _shuffle_block_forward(self, x: Tensor) -> Tensor:
    # torchvision's InvertedResidual.forward with the shuffle as a submodule.
    if self.stride == 1:
        x1, x2 = x.chunk(2, dim=1)
        out = torch.cat((x1, self.branch2(x2)), dim=1)
    else:
        out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
    return self.shuffle(out)


def _with_shuffle_modules(model: nn.Module) -> nn.Module:
    from torchvision.models.shufflenetv2 import InvertedResidual

    for block in model.modules():
        if isinstance(block, InvertedResidual):
            block.shuffle = _ChannelShuffle(2)
            block.forward = types.MethodType(_shuffle_block_forward, block)
    return model



_BUILDERS = {
    "resnet8": resnet8,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet_digits": resnet_digits,
}

# Input sizes a model is built and traced at (rebuilding a pruned model needs a forward pass).
_IMAGE_SIZES = {"resnet_digits": 8, "torchvision:inception_v3": 299}


# torchvision's transformers: their channels meet in attention, which the pruner cannot follow.
_TRANSFORMERS = ("vit_", "swin_", "maxvit_")


def _torchvision_names() -> list[str]:
    """torchvision's classification models scop can prune: its CNNs (transformers left out)."""
    import torchvision

    return sorted(n for n in torchvision.models.list_models(module=torchvision.models) if not n.startswith(_TRANSFORMERS))


def _refuse_transformer(name: str, model: nn.Module) -> None:
    if any(isinstance(m, nn.MultiheadAttention) or type(m).__name__ in ("Attention", "WindowAttention")
           for m in model.modules()):
        raise ValueError(f"model {name!r} is a transformer (attention blocks): scop prunes the filters of "
                         "convolutional networks; transformers are out of scope")


def model_names() -> list[str]:
    """Every name :func:`build_model` accepts: our builders, then ``torchvision:<name>`` for
    torchvision's classification models, then ``timm:<name>`` for any of ``timm.list_models()``
    (when timm is installed), written once as ``"timm:<name>"``."""
    names = list(_BUILDERS) + [TORCHVISION_PREFIX + n for n in _torchvision_names()]
    return names + [TIMM_PREFIX + "<name>"] if _timm() is not None else names


def _timm():
    try:
        import timm
    except ImportError:
        return None
    return timm


def _timm_size(timm_name: str) -> int:
    # The resolution the model's default pretrained weights were trained at.
    cfg = _timm().get_pretrained_cfg(timm_name)
    return cfg.input_size[-1] if cfg is not None and cfg.input_size else 224


def example_input(name: str, in_channels: int = 3, batch_size: int = 1) -> Tensor:
    """A random input of the size ``name`` is built for: 8x8 for ``resnet_digits``, 32x32 for
    the CIFAR ResNets, 224x224 for torchvision models (299x299 for inception_v3), and for timm
    models the input size of their default pretrained configuration.

    Returns:
        (batch_size, in_channels, S, S) float32 on the CPU.
    """
    if name in _IMAGE_SIZES:
        size = _IMAGE_SIZES[name]
    elif name in _BUILDERS:
        size = 32
    elif name.startswith(TORCHVISION_PREFIX):
        size = 224
    elif name.startswith(TIMM_PREFIX):
        _check_timm(name[len(TIMM_PREFIX):])
        size = _timm_size(name[len(TIMM_PREFIX):])
    else:
        raise ValueError(f"unknown model name {name!r}; see scop_ext.models.model_names()")
    return torch.randn(batch_size, in_channels, size, size)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def data_config(name: str) -> dict:
    """How images are prepared for ``name`` when they come from an image folder: ``mean``,
    ``std``, ``crop_pct`` (the centre crop's share of the resized image) and ``interpolation``.

    timm models: their default pretrained configuration (what ``timm.data.resolve_data_config``
    reads); torchvision models: the transforms of their default weights; ours and any model
    without such a record: ImageNet's mean/std, crop 0.875, bilinear. Nothing is downloaded.
    """
    cfg = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "crop_pct": 0.875, "interpolation": "bilinear"}
    if name.startswith(TIMM_PREFIX) and _timm() is not None:
        pre = _timm().get_pretrained_cfg(name[len(TIMM_PREFIX):])
        if pre is not None:
            cfg.update({k: getattr(pre, k) for k in ("mean", "std", "crop_pct", "interpolation")
                        if getattr(pre, k, None) is not None})
    elif name.startswith(TORCHVISION_PREFIX):
        import torchvision

        try:
            weights = torchvision.models.get_model_weights(name[len(TORCHVISION_PREFIX):]).DEFAULT
        except (ValueError, AttributeError):
            return cfg
        t = weights.transforms()
        cfg.update(mean=tuple(t.mean), std=tuple(t.std), crop_pct=t.crop_size[0] / t.resize_size[0],
                   interpolation=t.interpolation.value)
    return {**cfg, "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}


def build_model(name: str, num_classes: int, in_channels: int, weights: str | os.PathLike | None = None) -> nn.Module:
    """Build a model by name, randomly initialised or with weights from a local file.

    Args:
        name: one of :func:`model_names`: ``"resnet20"`` … ``"resnet110"``, ``"resnet_digits"``,
            ``"torchvision:<name>"`` (e.g. ``"torchvision:resnet18"``), which is created with
            ``weights=None`` and ``num_classes``; when ``in_channels != 3`` its first convolution
            is replaced by one taking ``in_channels``; or ``"timm:<name>"`` (e.g.
            ``"timm:convnext_atto"``), created with ``pretrained=False``, ``num_classes`` and
            ``in_chans``. Nothing is ever downloaded.
        num_classes: outputs of the classifier.
        in_channels: channels of the input images.
        weights: optional path to a state_dict, either a ``torch.save`` file (read with
            ``torch.load(weights_only=True)``) or a ``.safetensors`` file.

    Returns:
        The model, in training mode.

    Raises:
        ValueError: an unknown name, or a weights file that is missing, unreadable, not a
            state_dict, or does not match the architecture (the message names the file).
    """
    check_sizes(num_classes, in_channels)
    if name in _BUILDERS:
        model = _BUILDERS[name](num_classes=num_classes, in_channels=in_channels)
    elif name.startswith(TORCHVISION_PREFIX):
        model = _build_torchvision(name[len(TORCHVISION_PREFIX) :], num_classes, in_channels)
    elif name.startswith(TIMM_PREFIX):
        timm_name = name[len(TIMM_PREFIX) :]
        _check_timm(timm_name)
        model = _timm().create_model(timm_name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
        _refuse_transformer(name, model)
    else:
        raise ValueError(
            f"unknown model name {name!r}; expected one of {list(_BUILDERS)}, 'torchvision:<name>' or 'timm:<name>'"
        )
    if weights is not None:
        load_weights(model, name, weights)
    return model


def _build_torchvision(tv_name: str, num_classes: int, in_channels: int) -> nn.Module:
    import torchvision

    if tv_name.startswith(_TRANSFORMERS):
        raise ValueError(f"model 'torchvision:{tv_name}' is a transformer: scop prunes the filters of convolutional "
                         "networks; transformers are out of scope (see `scop info` for the models it prunes)")
    if tv_name not in _torchvision_names():
        raise ValueError(
            f"unknown torchvision model {tv_name!r}; expected one of torchvision.models.list_models()"
        )
    kwargs = {"weights": None, "num_classes": num_classes}
    if tv_name in ("googlenet", "inception_v3"):
        kwargs["aux_logits"] = False  # the auxiliary heads only exist for training from scratch
        kwargs["init_weights"] = True
    model = torchvision.models.get_model(tv_name, **kwargs)
    if tv_name.startswith("shufflenet_v2"):
        model = _with_shuffle_modules(model)
    if in_channels != 3:
        # torchvision registers the stem first: its first convolution is the one reading the image.
        name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
        if conv.in_channels != 3 or conv.groups != 1:
            raise ValueError(
                f"cannot adapt torchvision:{tv_name} to in_channels={in_channels}: "
                f"its first conv {name!r} is not a 3-channel stem"
            )
        new = nn.Conv2d(
            in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
        )
        model.set_submodule(name, new)
    return model


def _check_timm(timm_name: str) -> None:
    timm = _timm()
    if timm is None:
        raise ValueError(f"model 'timm:{timm_name}' needs the timm package: pip install timm")
    if not timm.is_model(timm_name):
        raise ValueError(f"unknown timm model {timm_name!r}; expected one of timm.list_models()")


# Keys a training checkpoint nests its state_dict under (timm's train.py, Lightning, ...), tried in order.

def __getattr__(name: str):
    if name == "ChannelShuffle":  # its home until 0.2
        import warnings

        warnings.warn("scop_ext.models.ChannelShuffle moved to scop_ext.nn.ChannelShuffle", DeprecationWarning, stacklevel=2)
        return _ChannelShuffle
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
