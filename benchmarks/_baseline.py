"""Shared by planted.py, accuracy.py and figures.py: seeded baselines (cached), data, helpers.

A baseline is trained the way ``scop train`` trains one (SGD Nesterov, cosine, lr 0.1, weight
decay 5e-4, on the training split less the 10% that ``scop_ext.data.holdout`` keeps for
validation, so the pruning runs can pick their fine-tuning epoch on images the baseline never
saw); the weights are the last epoch's. With a cache folder the state_dict is stored as
``<model>-<dataset>-e<epochs>[-b<batch>][-n<subset>]-s<seed>-v10.safetensors`` and reused by every
script. :data:`RECIPES` holds each dataset's network and budgets.
"""

from __future__ import annotations

import os
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from scop_ext.data import Splits, load_splits
from scop_ext.models import build_model
from scop_ext.train import evaluate, fit, make_loader


# learn_scales's bn modes (scop_ext.prune.excavate.BN_MODES) as the tables' notes describe them
BN_MODES = {"batch": "BN over the paired batch",
            "batch_detached": "BN over the paired batch, its statistics constant in the backward",
            "frozen": "BN frozen"}


def add_bn_argument(parser) -> None:
    parser.add_argument("--bn", choices=tuple(BN_MODES), default="batch", help="stage-2 BatchNorm mode (learn_scales)")


# Per dataset: the network, its baseline recipe and the pruning budgets every script uses.
# Fashion-MNIST: resnet8 reaches 92-93% test top-1 in 15 epochs at batch 128 (about 11 min on
# 2 cores); its stage 2 and fine-tuning budgets are short because each epoch is 54,000 images.
RECIPES = {
    "digits": dict(model="resnet_digits", train_epochs=15, batch_size=64, scales_epochs=10, finetune_epochs=10,
                   finetune_lr=0.02, gan_iterations=600),
    "fashion-mnist": dict(model="resnet8", train_epochs=15, batch_size=128, scales_epochs=4, finetune_epochs=2,
                          finetune_lr=0.01, gan_iterations=3000),
    "cifar10": dict(model="resnet20", train_epochs=160, batch_size=128, scales_epochs=20, finetune_epochs=40,
                    finetune_lr=0.01, gan_iterations=20000),
}


def _picked(length: int, count: int, seed: int) -> list[int]:
    return sorted(torch.randperm(length, generator=torch.Generator().manual_seed(seed))[:count].tolist())


def splits(name: str = "digits", root: str | None = None, *, val_fraction: float = 0.1,
           subset: int | None = None) -> Splits:
    """The dataset's :class:`Splits`; with ``subset`` the training part keeps that many images
    (validation and test a fifth as many each), drawn once with a fixed seed: for smoke runs."""
    data = load_splits(name, root, val_fraction=val_fraction)
    if subset is None or subset >= len(data.train):
        return data
    keep = _picked(len(data.train), subset, 0)
    small = max(subset // 5, 1)
    val = Subset(data.val, _picked(len(data.val), small, 1)) if data.val is not None else None
    return Splits(Subset(data.train, keep), Subset(data.train_aug, keep), val,
                  Subset(data.test, _picked(len(data.test), small, 2)), data.info)


def datasets(name: str = "digits", root: str | None = None, subset: int | None = None):
    """``(train without augmentation, train with augmentation, test, info)``, the whole training split."""
    data = splits(name, root, val_fraction=0.0, subset=subset)
    return data.train, data.train_aug, data.test, data.info


def images(dataset) -> torch.Tensor:
    """Every image of ``dataset`` (a ``TensorDataset`` or a ``Subset`` of one) as one tensor."""
    return next(iter(DataLoader(dataset, batch_size=len(dataset))))[0]


def test_loader(test, batch_size: int = 256):
    return make_loader(test, batch_size, shuffle=False, evaluation=True)


def evaluate_top1(model: nn.Module, test, device: str = "cpu") -> float:
    """Test top-1 of ``model`` (its train/eval mode is kept)."""
    return evaluate(model, test_loader(test), device)["top1"]


def accuracy(model: nn.Module, test) -> float:
    return evaluate_top1(model, test, "cpu")


def baseline(model_name: str, dataset: str, seed: int, epochs: int, *, root: str | None = None,
             cache: str | None = None, lr: float = 0.1, weight_decay: float = 5e-4, batch_size: int = 64,
             device: str = "cpu", subset: int | None = None, log=print) -> nn.Module:
    """A trained ``model_name`` on ``dataset`` for ``seed`` (from ``cache`` when it is there), in eval mode."""
    from safetensors.torch import load_file, save_file

    data = splits(dataset, root, val_fraction=0.1, subset=subset)
    info, test = data.info, data.test
    path = None
    if cache:
        os.makedirs(cache, exist_ok=True)
        tag = (f"-b{batch_size}" if batch_size != 64 else "") + (f"-n{subset}" if subset else "")
        path = os.path.join(cache, f"{model_name}-{dataset}-e{epochs}{tag}-s{seed}-v10.safetensors")
    torch.manual_seed(seed)
    model = build_model(model_name, info.num_classes, info.in_channels)
    if path and os.path.exists(path):
        model.load_state_dict(load_file(path))
        return model.to(device).eval()
    start = time.time()
    fit(model, make_loader(data.train_aug, batch_size, shuffle=True, seed=seed), None, epochs=epochs, lr=lr,
        device=device, weight_decay=weight_decay, stage="train", progress=False)
    model.eval()
    log(f"  baseline {model_name} seed {seed}: {epochs} epochs in {time.time() - start:.0f} s, "
        f"test top-1 {100 * evaluate_top1(model, test, device):.2f}%")
    if path:
        tmp = path + ".tmp"
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, path)
    return model


def log_line(*parts) -> None:
    """A progress line on stderr (stdout carries the tables)."""
    print(*parts, file=sys.stderr, flush=True)


def mean_std(values) -> tuple[float, float]:
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    return float(t.mean()), (float(t.std()) if t.numel() > 1 else 0.0)


def pm(values, scale: float = 1.0, digits: int = 2) -> str:
    """``mean ± std`` of ``values`` (times ``scale``), or "–" when empty."""
    values = list(values)
    if not values:
        return "–"
    m, s = mean_std(values)
    return f"{scale * m:.{digits}f} ± {scale * s:.{digits}f}"


def load_line() -> str:
    """The 1/5/15-minute load averages, for the section text."""
    try:
        one, five, fifteen = os.getloadavg()
        return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min) at the start"
    except OSError:
        return "load average unknown"


def load_now() -> str:
    """The 1-minute load average now, for "... at the end"."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "unknown"
