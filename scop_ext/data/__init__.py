"""Datasets: scikit-learn's bundled digits (the default, nothing to download), Fashion-MNIST from
its four IDX files (Debian's ``dataset-fashion-mnist`` package, or any folder holding them),
CIFAR-10 in its python format and ImageFolder trees, from a local path the user gives. Nothing
here ever downloads anything.

:func:`load_dataset` is the one entry point, :func:`load_splits` the parts a training run uses;
:mod:`.arrays` holds the array datasets and :mod:`.folder` the image folders.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, Subset

from .arrays import (
    CIFAR10_INFO,
    DIGITS_INFO,
    FASHION_MNIST_INFO,
    FASHION_MNIST_ROOT,
    DatasetInfo,
    check_split,
    cifar10,
    digits,
    fashion_mnist,
    read_idx,
)
from .folder import MAX_IMAGE_SIZE, image_folder, same_classes

__all__ = ["DatasetInfo", "MAX_IMAGE_SIZE", "DATASETS", "FASHION_MNIST_ROOT", "digits", "fashion_mnist", "read_idx",
           "cifar10", "image_folder", "load_dataset", "holdout", "Splits", "load_splits"]

# Every name load_dataset takes; "digits" needs no files at all.
DATASETS = ("digits", "fashion-mnist", "cifar10", "imagefolder")


def load_dataset(
    name: str, root: str | os.PathLike | None = None, split: str = "train", *, image_size: int = 224,
    augment: bool | None = None, normalization: Mapping | None = None,
) -> tuple[Dataset, DatasetInfo]:
    """One entry point for every dataset: ``(dataset, info)``.

    Args:
        name: one of :data:`DATASETS`: ``"digits"`` (bundled with scikit-learn; ``root`` must be
            None), ``"fashion-mnist"`` (``root``: see :func:`fashion_mnist`, None for the Debian
            package's folder), ``"cifar10"`` (``root``: see :func:`cifar10`) or ``"imagefolder"``
            (``root``: see :func:`image_folder`).
        root: local path of the data; nothing is ever downloaded.
        split: ``"train"`` or ``"test"`` (for ``"imagefolder"`` the test split is ``root/val``).
        image_size: crop size for ``"imagefolder"`` (ignored by the others, whose size is fixed).
        augment: random training augmentation; defaults to ``split == "train"`` (digits never
            augments). Stage 2 and BN recalibration use ``augment=False``.
        normalization: for ``"imagefolder"``, the model's ``mean``, ``std``, ``crop_pct`` and
            ``interpolation`` (:func:`scop_ext.models.data_config`); ImageNet's when None.

    Returns:
        The dataset of ``(image, label)`` pairs and its :class:`DatasetInfo`.
    """
    check_split(split, ("train", "test"))
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if name == "digits":
        if root is not None:
            raise ValueError(f"root must be None for 'digits' (bundled with scikit-learn), got {root!r}")
        return digits(split), DIGITS_INFO
    if name == "fashion-mnist":
        return fashion_mnist(root, split, augment=augment), FASHION_MNIST_INFO
    if root is None:
        raise ValueError(f"root is required for {name!r}: the local folder holding the data")
    if name == "cifar10":
        return cifar10(root, split, augment=augment), CIFAR10_INFO
    dataset = image_folder(root, "val" if split == "test" else "train", image_size, augment=augment,
                           **dict(normalization or {}))
    return dataset, DatasetInfo("imagefolder", len(dataset.classes), 3, image_size)


def holdout(length: int, fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Split ``range(length)`` into (train, validation) index lists, validation ``fraction`` of it.

    The validation part chooses among training epochs, so the test split is only ever used to
    report. ``scop train`` and ``scop prune`` both use the default ``seed``, whatever their run
    seed: the part a pruning run validates on is then one its baseline never trained on.
    ``fraction = 0`` gives an empty validation part.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    order = torch.randperm(length, generator=torch.Generator().manual_seed(seed)).tolist()
    cut = int(round(length * fraction))
    return sorted(order[cut:]), sorted(order[:cut])


@dataclass(frozen=True)
class Splits:
    """The parts of one dataset a training run uses.

    Attributes:
        train, train_aug: the same images (the training split less ``val``), without and with
            random augmentation.
        val: the held-out part of the training split (no augmentation), which picks the best
            epoch; None when ``val_fraction`` is 0.
        test: the test split; it only ever reports.
        info: what :func:`load_dataset` says about the data.
    """

    train: Dataset
    train_aug: Dataset
    val: Dataset | None
    test: Dataset
    info: DatasetInfo


def load_splits(name: str, root: str | os.PathLike | None = None, *, image_size: int = 224,
                val_fraction: float = 0.1, normalization: Mapping | None = None) -> Splits:
    """The :class:`Splits` of a dataset (arguments as :func:`load_dataset`), the validation part
    chosen by :func:`holdout`: the same images for ``scop train`` and ``scop prune``. An image
    folder's train/ and val/ must have the same classes."""
    kw = dict(image_size=image_size, normalization=normalization)
    train, info = load_dataset(name, root, "train", augment=False, **kw)
    train_aug, _ = load_dataset(name, root, "train", **kw)
    test, _ = load_dataset(name, root, "test", **kw)
    if name == "imagefolder":
        same_classes(train, test, root)
    fit_idx, val_idx = holdout(len(train), val_fraction)
    return Splits(Subset(train, fit_idx), Subset(train_aug, fit_idx), Subset(train, val_idx) if val_idx else None,
                  test, info)
