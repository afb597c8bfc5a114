"""Datasets: scikit-learn's bundled digits (the default, nothing to download), CIFAR-10 in its
python format and ImageFolder trees, both from a local path the user gives."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

__all__ = ["DatasetInfo", "digits"]


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int


DIGITS_INFO = DatasetInfo("digits", num_classes=10, in_channels=1, image_size=8)


def digits(split: str = "train", *, test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """scikit-learn's 1,797 bundled 8x8 handwritten digits as a ``TensorDataset``.

    Images are float32 of shape (1, 8, 8) scaled to [0, 1]; labels int64 in 0..9. ``split`` is
    ``"train"`` or ``"test"``: a stratified split fixed by ``seed``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None]
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels
    )
    idx = train_idx if split == "train" else test_idx
    return TensorDataset(torch.from_numpy(images[idx]), torch.from_numpy(labels[idx]))
