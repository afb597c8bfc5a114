"""Datasets: scikit-learn's bundled digits (the default, nothing to download), Fashion-MNIST from
its four IDX files (Debian's ``dataset-fashion-mnist`` package, or any folder holding them),
CIFAR-10 in its python format and ImageFolder trees, from a local path the user gives. Nothing
here ever downloads anything."""

from __future__ import annotations

import gzip
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset

__all__ = ["DatasetInfo", "MAX_IMAGE_SIZE", "DATASETS", "digits", "fashion_mnist", "read_idx", "cifar10", "image_folder", "load_dataset", "holdout", "Splits",
           "load_splits"]

# Largest edge an image is resized to: one 3 x 4096 x 4096 float32 image is already 200 MB, and a
# larger size would fail on allocation while loading data, before any memory check could run.
MAX_IMAGE_SIZE = 4096


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
_FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60_000),
                  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10_000)}
# The training split's pixel mean and std (over all 47M pixels, scaled to [0, 1]).
_FASHION_MEAN, _FASHION_STD = (0.2860,), (0.3530,)
_FASHION_HOWTO = ("install Debian's dataset-fashion-mnist package (apt-get install dataset-fashion-mnist: "
                  f"{FASHION_MNIST_ROOT}) or pass --data-root DIR, a folder holding the four original IDX files "
                  "(train-images-idx3-ubyte[.gz], ...); nothing is downloaded")
# An IDX file's magic: two zero bytes, a type code (0x08: unsigned bytes) and the number of dims.
_IDX_UBYTE = 0x08


def read_idx(path: str | os.PathLike, shape: tuple[int, ...]) -> np.ndarray:
    """The uint8 array of an IDX file (LeCun's MNIST format), gzipped or not.

    ``shape`` is what the file must hold exactly (its header's dims); the magic number, the
    dims and the payload's length are checked before the array is made.

    Raises:
        ValueError: naming ``path``, when the file is not an IDX file of that shape.
    """
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    header_len = 4 + 4 * len(shape)
    try:
        with opener(path, "rb") as f:
            header = f.read(header_len)
            if len(header) < header_len or header[:2] != b"\0\0" or header[2] != _IDX_UBYTE or header[3] != len(shape):
                raise ValueError(f"{path}: not an IDX file of {len(shape)}-dim unsigned bytes "
                                 f"(magic {header[:4].hex() or 'missing'}, expected 0000{_IDX_UBYTE:02x}{len(shape):02x})")
            dims = tuple(int.from_bytes(header[4 + 4 * i: 8 + 4 * i], "big") for i in range(len(shape)))
            if dims != tuple(shape):
                raise ValueError(f"{path}: holds an array of shape {dims}, expected {tuple(shape)}")
            size = int(np.prod(shape))
            payload = f.read(size + 1)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise ValueError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    if len(payload) != size:
        raise ValueError(f"{path}: {len(payload)} bytes of data after the header, expected {size} for shape {tuple(shape)}"
                         if len(payload) < size else f"{path}: more data than its header's shape {tuple(shape)} holds")
    return np.frombuffer(payload, dtype=np.uint8).reshape(shape)


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

    _check_split(split, ("train", "test"))
    root = FASHION_MNIST_ROOT if root is None else os.fspath(root)
    image_stem, label_stem, count = _FASHION_FILES[split]
    image_path, label_path = _idx_file(root, image_stem), _idx_file(root, label_stem)
    images = read_idx(image_path, (count, 28, 28))
    labels = read_idx(label_path, (count,))
    if labels.max() > 9:
        raise ValueError(f"{label_path}: labels up to {labels.max()}, expected 0..9")
    augment = split == "train" if augment is None else augment
    steps = [T.RandomCrop(28, padding=2), T.RandomHorizontalFlip()] if augment else []
    transform = T.Compose(steps + [T.ToDtype(torch.float32, scale=True), T.Normalize(_FASHION_MEAN, _FASHION_STD)])
    return _ImageTensors(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),
                         transform)


CIFAR10_INFO = DatasetInfo("cifar10", num_classes=10, in_channels=3, image_size=32)
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
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


def _check_split(split: str, allowed: tuple[str, ...]) -> None:
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

    _check_split(split, ("train", "test"))
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


def image_folder(root: str | os.PathLike, split: str = "train", image_size: int = 224, *,
                 augment: bool | None = None) -> Dataset:
    """An ImageFolder tree (``root/train/<class>/*.jpg``, ``root/val/<class>/*.jpg``), ImageNet style.

    Items are ``(image, label)`` with image float32 (3, image_size, image_size) normalised with
    the ImageNet mean/std. ``"train"``: random-resized crop + horizontal flip; ``"val"``: resize
    the short side to ``image_size / 0.875``, then centre crop (also for "train" with
    ``augment=False``; ``augment`` defaults to ``split == "train"``).

    Raises:
        FileNotFoundError: ``root/split`` is not a folder.
        ValueError: it has no class folders with images.
    """
    import torchvision.transforms.v2 as T
    from torchvision.datasets import ImageFolder

    _check_split(split, ("train", "val"))
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 1 <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size must be an int in 1..{MAX_IMAGE_SIZE}, got {image_size!r}")
    folder = os.path.join(os.fspath(root), split)
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"image folder split not found: {folder!r} (expected {os.fspath(root)!r} to hold train/ and val/, "
            f"each with one sub-folder of images per class)"
        )
    augment = split == "train" if augment is None else augment
    if augment:
        steps = [T.RandomResizedCrop(image_size, antialias=True), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(round(image_size / 0.875), antialias=True), T.CenterCrop(image_size)]
    transform = T.Compose(
        [T.ToImage(), *steps, T.ToDtype(torch.float32, scale=True), T.Normalize(_IMAGENET_MEAN, _IMAGENET_STD)]
    )
    try:
        return ImageFolder(folder, transform=transform, loader=_read_image)
    except FileNotFoundError as exc:  # ImageFolder's word for "no classes" / "no images"
        raise ValueError(f"{folder!r} is not an image folder tree: {exc}") from exc


def _read_image(path: str):
    """An RGB PIL image; ValueError naming the file when it is not a readable image (a bare PIL
    error would not say which of thousands of files is damaged)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:  # PIL's decoders raise all of these
        raise ValueError(f"{path}: not a readable image ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


# Every name load_dataset takes; "digits" needs no files at all.
DATASETS = ("digits", "fashion-mnist", "cifar10", "imagefolder")


def load_dataset(
    name: str, root: str | os.PathLike | None = None, split: str = "train", *, image_size: int = 224,
    augment: bool | None = None,
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

    Returns:
        The dataset of ``(image, label)`` pairs and its :class:`DatasetInfo`.
    """
    _check_split(split, ("train", "test"))
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
    dataset = image_folder(root, "val" if split == "test" else "train", image_size, augment=augment)
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
                val_fraction: float = 0.1) -> Splits:
    """The :class:`Splits` of a dataset (arguments as :func:`load_dataset`), the validation part
    chosen by :func:`holdout`: the same images for ``scop train`` and ``scop prune``."""
    train, info = load_dataset(name, root, "train", image_size=image_size, augment=False)
    train_aug, _ = load_dataset(name, root, "train", image_size=image_size)
    test, _ = load_dataset(name, root, "test", image_size=image_size)
    fit_idx, val_idx = holdout(len(train), val_fraction)
    return Splits(Subset(train, fit_idx), Subset(train_aug, fit_idx), Subset(train, val_idx) if val_idx else None,
                  test, info)
