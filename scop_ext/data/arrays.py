"""Datasets that are arrays of images: scikit-learn's bundled 8x8 digits, Fashion-MNIST from its
IDX files, CIFAR-10 from its python-format batches. Nothing is downloaded."""

from __future__ import annotations

import gzip
import os
import pickle
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

__all__ = ["DatasetInfo", "DIGITS_INFO", "FASHION_MNIST_INFO", "FASHION_MNIST_ROOT", "CIFAR10_INFO", "digits",
           "fashion_mnist", "read_idx", "cifar10", "check_split"]


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


FASHION_MNIST_INFO = DatasetInfo("fashion-mnist", num_classes=10, in_channels=1, image_size=28)
# Where Debian's (and Ubuntu's) dataset-fashion-mnist package puts the four IDX files.
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
_FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# The training split's pixel mean and std (over all 47M pixels, scaled to [0, 1]).
_FASHION_MEAN, _FASHION_STD = (0.2860,), (0.3530,)
_FASHION_HOWTO = ("install Debian's dataset-fashion-mnist package (apt-get install dataset-fashion-mnist: "
                  f"{FASHION_MNIST_ROOT}) or pass --data-root DIR, a folder holding the four original IDX files "
                  "(train-images-idx3-ubyte[.gz], ...); nothing is downloaded")
# An IDX file's magic: two zero bytes, a type code (0x08: unsigned bytes) and the number of dims.
_IDX_UBYTE = 0x08


def read_idx(path: str | os.PathLike, shape: tuple[int | None, ...], max_items: int = 10_000_000) -> np.ndarray:
    """The uint8 array of an IDX file (LeCun's MNIST format), gzipped or not.

    ``shape`` is what the file must hold (its header's dims; None for any count, at most
    ``max_items``); the magic number, the dims and the payload's length are checked before
    anything the size of the payload is allocated.

    Raises:
        ValueError: naming ``path``, when the file is not an IDX file of that shape.
    """
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    header_len = 4 + 4 * len(shape)
    expected = "x".join("N" if d is None else str(d) for d in shape)
    try:
        with opener(path, "rb") as f:
            header = f.read(header_len)
            if len(header) < header_len or header[:2] != b"\0\0" or header[2] != _IDX_UBYTE or header[3] != len(shape):
                raise ValueError(f"{path}: not an IDX file of {len(shape)}-dim unsigned bytes "
                                 f"(magic {header[:4].hex() or 'missing'}, expected 0000{_IDX_UBYTE:02x}{len(shape):02x})")
            dims = tuple(int.from_bytes(header[4 + 4 * i: 8 + 4 * i], "big") for i in range(len(shape)))
            if any(w is not None and d != w for d, w in zip(dims, shape)) or dims[0] > max_items:
                raise ValueError(f"{path}: holds an array of shape {'x'.join(map(str, dims))}, expected {expected}"
                                 + (f" with N <= {max_items}" if dims[0] > max_items else ""))
            size = int(np.prod(dims))
            payload = f.read(size + 1)
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    if len(payload) != size:
        raise ValueError(f"{path}: {len(payload)} bytes of data after the header, expected {size} for shape {dims}"
                         if len(payload) < size else f"{path}: more data than its header's shape {dims} holds")
    return np.frombuffer(payload, dtype=np.uint8).reshape(dims)


def _idx_file(root: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"Fashion-MNIST file {os.path.join(root, stem)}[.gz] not found: {_FASHION_HOWTO}")


def fashion_mnist(root: str | os.PathLike | None = None, split: str = "train", *,
                  augment: bool | None = None) -> Dataset:
    """Fashion-MNIST (Xiao et al. 2017: 60,000 training and 10,000 test images, 28x28 grey, 10
    classes, MIT licence) from its four original IDX files; nothing is downloaded.

    ``root`` is a folder holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each gzipped (``.gz``) or not;
    None is :data:`FASHION_MNIST_ROOT`, where Debian's ``dataset-fashion-mnist`` package puts
    them. Items are ``(image, label)``: image float32 (1, 28, 28) normalised with the training
    split's mean/std, label int64 in 0..9. ``"train"`` adds a random 28x28 crop of the 2-pixel
    zero-padded image and a horizontal flip unless ``augment=False`` (``augment`` defaults to
    ``split == "train"``).

    Raises:
        FileNotFoundError: a file is missing (the message says how to install the package).
        ValueError: a file that is not an IDX file of the expected shape, or labels outside 0..9.
    """
    import torchvision.transforms.v2 as T

    check_split(split, ("train", "test"))
    root = FASHION_MNIST_ROOT if root is None else os.fspath(root)
    image_stem, label_stem = _FASHION_FILES[split]
    image_path, label_path = _idx_file(root, image_stem), _idx_file(root, label_stem)
    images = read_idx(image_path, (None, 28, 28))
    labels = read_idx(label_path, (None,))
    if len(labels) != len(images):
        raise ValueError(f"{label_path}: {len(labels)} labels for the {len(images)} images of {image_path}")
    if len(labels) and labels.max() > 9:
        raise ValueError(f"{label_path}: labels up to {labels.max()}, expected 0..9")
    augment = split == "train" if augment is None else augment
    steps = [T.RandomCrop(28, padding=2), T.RandomHorizontalFlip()] if augment else []
    transform = T.Compose(steps + [T.ToDtype(torch.float32, scale=True), T.Normalize(_FASHION_MEAN, _FASHION_STD)])
    return _ImageTensors(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),
                         transform)


CIFAR10_INFO = DatasetInfo("cifar10", num_classes=10, in_channels=3, image_size=32)
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)
_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


class _ArrayUnpickler(pickle.Unpickler):
    # The CIFAR batches are pickles: resolve only what a dict of numpy arrays needs, so a
    # hostile file cannot run code.
    _allowed = {
        ("_codecs", "encode"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")
        import codecs

        core = np._core if hasattr(np, "_core") else np.core
        return {
            "encode": codecs.encode,
            "ndarray": np.ndarray,
            "dtype": np.dtype,
            "_reconstruct": core.multiarray._reconstruct,
            "_frombuffer": core.numeric._frombuffer,
        }[name]


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="latin1").load()
    except Exception as exc:  # unpickling a corrupt file raises many types
        raise ValueError(f"{path!r} is not a CIFAR-10 python batch (a pickled dict): {exc}") from exc
    if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
        raise ValueError(f"{path!r} is not a CIFAR-10 python batch: expected a dict with 'data' and 'labels'")
    data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        raise ValueError(
            f"{path!r} holds data of shape {data.shape} ({data.dtype}) and {labels.size} labels; "
            f"expected uint8 (N, 3072) and N labels"
        )
    if labels.size and not (0 <= labels.min() and labels.max() < 10):
        raise ValueError(f"{path!r} has labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


class _ImageTensors(Dataset):
    """uint8 images (N, C, H, W) and int64 labels, turned into float tensors by ``transform``."""

    def __init__(self, images: Tensor, labels: Tensor, transform: Callable[[Tensor], Tensor]) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.transform(self.images[i]), self.labels[i]


def check_split(split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise ValueError(f"split must be one of {allowed}, got {split!r}")


def cifar10(root: str | os.PathLike, split: str = "train", *, augment: bool | None = None) -> Dataset:
    """CIFAR-10 from its standard python-format folder; nothing is downloaded.

    ``root`` is the ``cifar-10-batches-py`` folder (``data_batch_1`` .. ``data_batch_5``,
    ``test_batch``) or the folder containing it. Items are ``(image, label)`` with image float32
    (3, 32, 32), normalised with the CIFAR-10 channel mean/std; the ``"train"`` split adds the
    standard augmentation (random 32x32 crop of the 4-pixel zero-padded image, horizontal flip)
    unless ``augment=False`` (``augment`` defaults to ``split == "train"``).

    Raises:
        FileNotFoundError: no batch files under ``root``.
        ValueError: a batch file that is not in the CIFAR-10 python format.
    """
    import torchvision.transforms.v2 as T

    check_split(split, ("train", "test"))
    root = os.fspath(root)
    names = _CIFAR_FILES["train"] + _CIFAR_FILES["test"]
    inside = any(os.path.isfile(os.path.join(root, name)) for name in names)
    folder = root if inside else os.path.join(root, _CIFAR_FOLDER)
    files = [os.path.join(folder, name) for name in _CIFAR_FILES[split]]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 not found at {root!r}: expected the python-format folder {_CIFAR_FOLDER!r} "
            f"(data_batch_1..5, test_batch) there or inside it; missing {missing}. Nothing is downloaded."
        )
    batches = [_read_cifar_batch(f) for f in files]
    images = torch.from_numpy(np.concatenate([b[0] for b in batches]))
    labels = torch.from_numpy(np.concatenate([b[1] for b in batches]))
    augment = split == "train" if augment is None else augment
    steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if augment else []
    transform = T.Compose(steps + [T.ToDtype(torch.float32, scale=True), T.Normalize(_CIFAR_MEAN, _CIFAR_STD)])
    return _ImageTensors(images, labels, transform)


