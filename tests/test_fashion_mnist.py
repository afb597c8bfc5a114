"""Fashion-MNIST from its IDX files: the reader against hand-written files, every damaged file
refused in one line naming it, and the real files (Debian's dataset-fashion-mnist package, which
CI installs) subsampled to a few hundred images for an end-to-end `scop train`."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from scop_ext.data import FASHION_MNIST_ROOT, fashion_mnist, load_dataset, load_splits, read_idx
from tests._helpers import assert_one_line, cli
from tests.conftest import ENV

FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
REAL = os.path.isfile(os.path.join(FASHION_MNIST_ROOT, "train-images-idx3-ubyte.gz"))
needs_real = pytest.mark.skipif(not REAL, reason=f"Fashion-MNIST is not installed in {FASHION_MNIST_ROOT} "
                                                  "(apt-get install dataset-fashion-mnist)")


def write_idx(path, array: np.ndarray, *, magic: bytes | None = None, gz: bool = False) -> None:
    header = (magic or bytes([0, 0, 0x08, array.ndim])) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    with (gzip.open if gz else open)(str(path) + (".gz" if gz else ""), "wb") as f:
        f.write(data)


def make_folder(root, train=40, test=12, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in (("train", train), ("test", test)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        write_idx(root / FILES[split][0], images, gz=gz)
        write_idx(root / FILES[split][1], labels, gz=gz)
        arrays[split] = (images, labels)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_reads_the_idx_files_gzipped_or_not(tmp_path, gz):
    arrays = make_folder(tmp_path, gz=gz)
    for split in ("train", "test"):
        data = fashion_mnist(tmp_path, split, augment=False)
        images, labels = arrays[split]
        assert len(data) == len(labels)
        x, y = data[3]
        assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and int(y) == int(labels[3])
        # normalised with the training split's mean and std, pixel by pixel
        torch.testing.assert_close(x[0], (torch.from_numpy(images[3]).float() / 255 - 0.2860) / 0.3530)
    dataset, info = load_dataset("fashion-mnist", tmp_path, "test")
    assert (info.name, info.num_classes, info.in_channels, info.image_size) == ("fashion-mnist", 10, 1, 28)
    augmented = fashion_mnist(tmp_path, "train")  # random crop and flip: same shape, other pixels
    assert augmented[0][0].shape == (1, 28, 28)


def test_damaged_files_are_named_in_one_line(tmp_path):
    make_folder(tmp_path)
    images = tmp_path / FILES["train"][0]
    rng = np.random.default_rng(1)
    cases = [
        (lambda: write_idx(images, rng.integers(0, 9, (40, 28, 28)), magic=b"\x00\x00\x0d\x03"),
         "not an IDX file of 3-dim unsigned bytes"),
        (lambda: write_idx(images, rng.integers(0, 9, (40, 32, 32))), "holds an array of shape 40x32x32, expected Nx28x28"),
        (lambda: images.write_bytes(images.read_bytes()[:-100]), "bytes of data after the header, expected 31360"),
        (lambda: write_idx(images, rng.integers(0, 9, (41, 28, 28))), "40 labels for the 41 images"),
        (lambda: write_idx(tmp_path / FILES["train"][1], np.full(40, 12)), "labels up to 12, expected 0..9"),
    ]
    for damage, message in cases:
        make_folder(tmp_path)
        damage()
        with pytest.raises(ValueError, match=message) as err:
            fashion_mnist(tmp_path, "train")
        assert str(tmp_path) in str(err.value)
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="bad.gz: unreadable"):
        read_idx(tmp_path / "bad.gz", (None,))


def test_a_missing_file_says_how_to_install(tmp_path, capsys):
    make_folder(tmp_path)
    os.unlink(tmp_path / FILES["test"][1])
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.*apt-get install dataset-fashion-mnist"):
        fashion_mnist(tmp_path, "test")
    assert_one_line(*cli(capsys, "train", "--dataset", "fashion-mnist", "--data-root", str(tmp_path), "--epochs", "1",
                         "--out", str(tmp_path / "out")), "t10k-labels-idx1-ubyte", "dataset-fashion-mnist")


@needs_real
def test_the_installed_files_hold_the_whole_dataset():
    train, _ = load_dataset("fashion-mnist", None, "train", augment=False)
    test, _ = load_dataset("fashion-mnist", None, "test")
    assert (len(train), len(test)) == (60_000, 10_000)
    labels = torch.tensor([int(test[i][1]) for i in range(0, 10_000, 7)])
    assert set(labels.tolist()) == set(range(10))


@needs_real
def test_train_end_to_end_on_a_subsample_of_the_real_files(tmp_path):
    """`scop train --dataset fashion-mnist` on 400 + 100 of the real images (written as a folder
    of IDX files, as a user's own download would be): it trains, logs each epoch, and learns."""
    small = tmp_path / "fm"
    small.mkdir()
    for split, count in (("train", 400), ("test", 100)):
        for name, shape in zip(FILES[split], ((None, 28, 28), (None,))):
            array = read_idx(os.path.join(FASHION_MNIST_ROOT, name + ".gz"), shape)[:count]
            write_idx(small / name, array, gz=True)
    splits = load_splits("fashion-mnist", small)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (360, 40, 100)
    proc = subprocess.run([sys.executable, "-m", "scop_ext", "train", "--model", "resnet8", "--dataset", "fashion-mnist",
                           "--data-root", str(small), "--epochs", "3", "--batch-size", "32", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("[train] epoch")][-1].startswith("[train] epoch 3/3")
    top1 = float(proc.stdout.split("test top-1 ")[1].split("%")[0])
    assert top1 > 30.0  # ten classes: chance is 10%
