"""ImageFolder trees (``root/train/<class>/*.jpg``, ``root/val/<class>/*.jpg``), read defensively:
only regular files, no directory link that leaves the root or loops, images checked against a
pixel cap from their header before they are decoded, and every bad file named in one line."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

__all__ = ["MAX_IMAGE_SIZE", "MAX_FILE_BYTES", "MAX_PIXELS", "image_folder", "same_classes"]

# Largest edge an image is resized to: one 3 x 4096 x 4096 float32 image is already 200 MB, and a
# larger size would fail on allocation while loading data, before any memory check could run.
MAX_IMAGE_SIZE = 4096
# An image file is read only if it is at most this large, and decoded only if its header says at
# most this many pixels: a PNG of a few KB can claim 20000 x 20000 (400 M pixels, 1.2 GB as RGB).
MAX_FILE_BYTES = 256 * 2**20
MAX_PIXELS = 100_000_000
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def image_folder(root: str | os.PathLike, split: str = "train", image_size: int = 224, *,
                 augment: bool | None = None, mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225), crop_pct: float = 0.875,
                 interpolation: str = "bilinear") -> Dataset:
    """One split of an ImageFolder tree, ImageNet style.

    Items are ``(image, label)`` with image float32 (3, image_size, image_size), normalised with
    ``mean``/``std`` (pass a model's own: :func:`scop_ext.models.data_config`). ``"train"``:
    random-resized crop + horizontal flip; ``"val"``: resize the short side to
    ``image_size / crop_pct``, then centre crop (also for "train" with ``augment=False``;
    ``augment`` defaults to ``split == "train"``). Class folders are sorted by name; the label is
    the position.

    Raises:
        FileNotFoundError: ``root/split`` is not a folder.
        ValueError: it has no class folders with images.
    """
    import torchvision.transforms.v2 as T
    from torchvision.datasets import DatasetFolder
    from torchvision.transforms import InterpolationMode

    if split not in ("train", "val"):
        raise ValueError(f"split must be one of ('train', 'val'), got {split!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 1 <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size must be an int in 1..{MAX_IMAGE_SIZE}, got {image_size!r}")
    folder = os.path.join(os.fspath(root), split)
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"image folder split not found: {folder!r} (expected {os.fspath(root)!r} to hold train/ and val/, "
            f"each with one sub-folder of images per class)"
        )
    augment = split == "train" if augment is None else augment
    mode = InterpolationMode(interpolation)
    if augment:
        steps = [T.RandomResizedCrop(image_size, interpolation=mode, antialias=True), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(round(image_size / crop_pct), interpolation=mode, antialias=True), T.CenterCrop(image_size)]
    transform = T.Compose([T.ToImage(), *steps, T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])

    class _Folder(DatasetFolder):
        @staticmethod
        def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
            return _samples(directory, class_to_idx)

    try:
        return _Folder(folder, loader=read_image, extensions=IMAGE_EXTENSIONS, transform=transform)
    except FileNotFoundError as exc:  # DatasetFolder's word for "no classes" / "no images"
        raise ValueError(f"{folder!r} is not an image folder tree: {exc}") from None


def _samples(directory: str, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """``(path, label)`` of every image file under each class folder; links to folders are
    followed only while they stay inside ``directory`` and do not lead back up (a loop)."""
    top = os.path.realpath(directory)
    samples = []
    for name, label in sorted(class_to_idx.items(), key=lambda kv: kv[1]):
        start = os.path.join(directory, name)
        seen = {os.path.realpath(start)}
        for here, dirs, files in os.walk(start, followlinks=True):
            keep = []
            for d in sorted(dirs):
                real = os.path.realpath(os.path.join(here, d))
                inside = real == top or real.startswith(top + os.sep)
                if inside and real not in seen and not os.path.realpath(here).startswith(real + os.sep):
                    seen.add(real)
                    keep.append(d)
            dirs[:] = keep
            for f in sorted(files):
                path = os.path.join(here, f)
                if f.lower().endswith(IMAGE_EXTENSIONS) and _regular(path):
                    samples.append((path, label))
    if not samples:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {directory}")
    return samples


def _regular(path: str) -> bool:
    # A FIFO or device named *.png would block or stream forever when read.
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def read_image(path: str):
    """An RGB PIL image; ValueError naming the file when it is not a readable image, is not a
    regular file, or is larger than :data:`MAX_FILE_BYTES` / :data:`MAX_PIXELS` (checked from the
    header, before decoding)."""
    from PIL import Image, UnidentifiedImageError

    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            raise ValueError(f"{info.st_size} bytes, more than the {MAX_FILE_BYTES} an image may have")
        with open(path, "rb") as f:
            image = Image.open(f)
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ValueError(f"its header says {width} x {height} pixels, more than the {MAX_PIXELS} allowed")
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        # PIL's decoders raise all of these
        text = str(exc).splitlines()[0] if str(exc) else ""
        raise ValueError(f"{path}: not a readable image ({type(exc).__name__}: {text})") from None


def same_classes(train: Dataset, val: Dataset, root: str | os.PathLike) -> None:
    """ValueError naming the difference unless both splits have the same class folders: labels are
    positions in the sorted class list, so a split with other classes would be labelled wrongly."""
    a, b = list(train.classes), list(val.classes)
    if a != b:
        only_train, only_val = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise ValueError(f"{os.fspath(root)}: train/ and val/ must have the same class folders; only in train: "
                         f"{only_train or 'none'}, only in val: {only_val or 'none'}")
