"""Model zoo: the CIFAR ResNets of He et al. (2016), a small ResNet for the bundled 8x8 digits,
and any torchvision or timm classification model by name, with weights read only from a local file.

Shortcuts. He et al. train their CIFAR ResNets with option A shortcuts (identity plus zero
padding on downsampling), which has no parameters and pads channels with zeros. We use option B
(a 1x1 convolution + BatchNorm projection where the shape changes, identity elsewhere): it adds
two small projections per network (ResNet-20: +1% parameters, +0.6% FLOPs) but makes every
residual add a plain ``a + b`` of two conv/BN outputs, which torch-pruning's dependency graph
couples exactly, so the channels of a stage can be pruned together and the FLOPs saving is real.
"""

from __future__ import annotations

import logging
import os
import types
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .nn.channels import ChannelShuffle as _ChannelShuffle
from .ops.checks import check_counts

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


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a residual add (He et al. 2016, Fig. 2 left).

    The shortcut is the identity when the shape is kept and a 1x1 conv + BN projection
    (option B) when ``stride != 1`` or the width changes.

    Shape:
        - Input: (N, in_planes, H, W)
        - Output: (N, planes, H_out, W_out) with H_out = ceil(H / stride).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """A ResNet for small images: a 3x3 stem, stages of :class:`BasicBlock`, global pooling, a linear head.

    Stage ``i`` has ``depths[i]`` blocks of width ``widths[i]``; every stage after the first
    halves the spatial size in its first block.

    Args:
        depths: blocks per stage, e.g. ``(3, 3, 3)`` for ResNet-20.
        widths: channels per stage, e.g. ``(16, 32, 64)``; the stem has ``widths[0]``.
        num_classes: outputs of the classifier.
        in_channels: channels of the input images.

    Shape:
        - Input: (N, in_channels, H, W)
        - Output: (N, num_classes)
    """

    def __init__(
        self, depths: Sequence[int], widths: Sequence[int], num_classes: int = 10, in_channels: int = 3
    ) -> None:
        super().__init__()
        if len(depths) != len(widths) or not depths or min(depths) < 1 or min(widths) < 1:
            raise ValueError(
                f"depths and widths must be non-empty sequences of positive ints of equal length, "
                f"got depths={tuple(depths)}, widths={tuple(widths)}"
            )
        check_counts(False, num_classes=num_classes, in_channels=in_channels)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        stages = []
        in_planes = widths[0]
        for i, (depth, planes) in enumerate(zip(depths, widths)):
            blocks = []
            for j in range(depth):
                blocks.append(BasicBlock(in_planes, planes, stride=2 if i > 0 and j == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


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


def _cifar_resnet(depth: int, num_classes: int, in_channels: int) -> CifarResNet:
    n = (depth - 2) // 6
    return CifarResNet((n, n, n), (16, 32, 64), num_classes, in_channels)


def resnet8(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-8 for small images (3 stages x 1 block, 16/32/64 channels, ~78k parameters).

    The depth-8 member of He et al.'s 6n + 2 family: the network 2 CPU cores train on
    Fashion-MNIST (28x28x1) to over 92% test top-1 in about ten minutes.
    """
    return _cifar_resnet(8, num_classes, in_channels)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-20 for 32x32 images (3 stages x 3 blocks, 16/32/64 channels, ~0.27M parameters)."""
    return _cifar_resnet(20, num_classes, in_channels)


def resnet32(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-32 for 32x32 images (3 stages x 5 blocks, 16/32/64 channels, ~0.47M parameters)."""
    return _cifar_resnet(32, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-56 for 32x32 images (3 stages x 9 blocks, 16/32/64 channels, ~0.86M parameters)."""
    return _cifar_resnet(56, num_classes, in_channels)


def resnet110(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-110 for 32x32 images (3 stages x 18 blocks, 16/32/64 channels, ~1.7M parameters)."""
    return _cifar_resnet(110, num_classes, in_channels)


def resnet_digits(num_classes: int = 10, in_channels: int = 1) -> CifarResNet:
    """A small ResNet for 8x8 digits: 2 stages x 1 block of 16/32 channels (~20k parameters).

    Stage 2 downsamples 8x8 to 4x4 and carries a projection shortcut, so the network has
    both kinds of residual coupling a pruner must handle.
    """
    return CifarResNet((1, 1), (16, 32), num_classes, in_channels)


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
        _load_weights(model, name, weights)
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
_WRAPPERS = ("state_dict_ema", "model_ema", "state_dict", "model")


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state_dict in a weights file: ``.safetensors``, or a ``torch.save`` file read with
    ``weights_only=True`` holding a state_dict or a training checkpoint that nests one (under
    ``state_dict``, ``model``, or their ``_ema`` forms, as timm's checkpoints do), with
    DataParallel's ``module.`` prefix removed. Nothing is unpickled beyond tensors and containers.

    Raises:
        ValueError: naming the file, when it is missing, unreadable, or holds no state_dict.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"weights file {path!r} does not exist (expected a state_dict saved with torch.save "
                         "or safetensors)")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the readers raise many types for a corrupt file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"weights file {path!r} could not be read as a state_dict: {first}") from None
    if isinstance(state, dict):
        nested = next((state[k] for k in _WRAPPERS if isinstance(state.get(k), dict) and state[k]), None)
        state = nested if nested is not None else state
    if not (isinstance(state, dict) and state and
            all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items())):
        raise ValueError(f"weights file {path!r} does not hold a state_dict (a dict of str -> Tensor)")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _load_weights(model: nn.Module, name: str, path: str | os.PathLike) -> None:
    path = os.fspath(path)
    state = read_state_dict(path)
    from .train.checkpoint import first_nonfinite

    bad = first_nonfinite(state)
    if bad is not None:
        raise ValueError(f"weights file {path!r}: tensor {bad!r} holds NaN or Inf; the model is unusable")
    state, notes, dropped = _fitted_to(model, state)
    try:
        result = model.load_state_dict(state, strict=False)
        missing = sorted(set(result.missing_keys) - dropped)
        if missing or result.unexpected_keys:
            raise RuntimeError(f"missing keys {missing[:5]}, unexpected keys {sorted(result.unexpected_keys)[:5]}")
    except RuntimeError as exc:
        text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise ValueError(f"weights file {path!r} does not match the architecture {name!r}: {text}") from None
    for note in notes:
        logger.info("weights %s: %s", path, note)


def _fitted_to(model: nn.Module, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str], set[str]]:
    """``state`` made to fit ``model`` where a pretrained checkpoint meets other data: a classifier
    for another number of classes is left out (the model keeps its own, new head), and a 3-channel
    stem meeting 1-channel images is summed over its input channels (timm's convention). Any
    other difference is left for load_state_dict to report. Returns the state, what changed, and
    the model's keys left to their own initialisation."""
    own = model.state_dict()
    differ = [k for k in state if k in own and state[k].shape != own[k].shape]
    if not differ:
        return state, [], set()
    state, notes, dropped = dict(state), [], set()
    head = [k for k in differ if own[k].dim() >= 1 and own[k].shape[1:] == state[k].shape[1:]
            and own[k].shape[0] != state[k].shape[0]]
    counts = {state[k].shape[0] for k in head}
    if head and len(counts) == 1 and {own[k].shape[0] for k in head} == {_outputs(model)}:
        module = head[0].rsplit(".", 1)[0]
        if all(k.rsplit(".", 1)[0] == module for k in head):
            missing = [k for k in own if k.startswith(module + ".") and k not in head]
            for k in head + missing:
                state.pop(k, None)
            dropped = set(head + missing)
            notes.append(f"classifier {module!r} has {counts.pop()} outputs there; it is replaced by a new, randomly "
                         f"initialised one with {_outputs(model)} (train or fine-tune to fit it)")
            differ = [k for k in differ if k not in head]
    stem = next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    key = f"{stem}.weight"
    if key in differ and state[key].shape[1] == 3 and own[key].shape[1] == 1 and \
            state[key].shape[0] == own[key].shape[0] and state[key].shape[2:] == own[key].shape[2:]:
        state[key] = state[key].sum(1, keepdim=True)
        notes.append(f"stem {stem!r} reads 3 channels there; its weights are summed over them for 1-channel images")
        differ.remove(key)
    return (state, notes, dropped) if not differ else (state, [], set())


def _outputs(model: nn.Module) -> int | None:
    """The class count the model was built for: the out_features of its last Linear (or the out
    channels of a conv classifier such as squeezenet's), None when neither exists."""
    last = None
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            last = m
    if last is None:
        return None
    return last.out_features if isinstance(last, nn.Linear) else last.out_channels


def __getattr__(name: str):
    if name == "ChannelShuffle":  # its home until 0.2
        import warnings

        warnings.warn("scop_ext.models.ChannelShuffle moved to scop_ext.nn.ChannelShuffle", DeprecationWarning, stacklevel=2)
        return _ChannelShuffle
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
