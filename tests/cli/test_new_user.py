"""A new user's first hour, through the command line alone: a torchvision checkpoint with a
1000-class head (as an ImageNet download would be) and a small image folder of their own, taken
to a pruned, exported model; the log shows a line per epoch of every stage."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

from tests.conftest import ENV


def _image_folder(root, classes=("cat", "dog"), per_class=(14, 5), size=40):
    """Two classes told apart by colour, as PNGs of another size than the model runs at."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in zip(("train", "val"), per_class):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
                pixels[..., c] += 150
                Image.fromarray(pixels).save(folder / f"{i}.png")


def _scop(*args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "scop_ext", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout)
    assert proc.returncode == 0, f"scop {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_from_a_pretrained_checkpoint_to_an_exported_pruned_model(tmp_path):
    import onnxruntime

    data = tmp_path / "images"
    _image_folder(data)
    torch.manual_seed(0)
    checkpoint = tmp_path / "resnet18-imagenet.pth"
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), checkpoint)

    common = ["--dataset", "imagefolder", "--data-root", data, "--image-size", 32, "--batch-size", 8]
    train = _scop("train", "--model", "torchvision:resnet18", "--weights", checkpoint, *common, "--epochs", 2,
                  "--lr", 0.01, "--val-fraction", 0, "--out", tmp_path / "base")
    assert "classifier 'fc' has 1000 outputs there; it is replaced by a new, randomly initialised one with 2" in train.stderr
    assert re.search(r"^\[train\] epoch 2/2 .*ETA", train.stderr, re.M)

    prune = _scop("prune", "--weights", tmp_path / "base" / "model", *common, "--scales-epochs", 2,
                  "--finetune-epochs", 2, "--finetune-lr", 0.01, "--flops-reduction", 0.5, "--no-latency",
                  "--set", "knockoff_options={working_size: 8}",
                  "--out", tmp_path / "pruned")
    for stage in ("scales", "finetune"):
        assert re.search(rf"^\[{stage}\] epoch 2/2 .*ETA", prune.stderr, re.M), prune.stderr
    assert "FLOPs" in prune.stdout and (tmp_path / "pruned" / "metrics.jsonl").read_text().count("\n") == 4

    export = _scop("export", "--model", tmp_path / "pruned" / "final", "--out", tmp_path / "export")
    assert "onnx:" in export.stdout
    model, _ = __import__("scop_ext.export", fromlist=["load_model"]).load_model(tmp_path / "pruned" / "final")
    session = onnxruntime.InferenceSession(str(tmp_path / "export" / "model.onnx"))
    for shape in ((1, 3, 32, 32), (3, 3, 48, 48)):  # traced at the trained 32 px; batch and size stay dynamic
        x = torch.randn(*shape)
        got = session.run(None, {"input": x.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(got), model(x).detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scope", ["train", "val"])
def test_image_folders_with_other_classes_or_loops_are_refused(tmp_path, scope, capsys):
    from tests._helpers import cli

    data = tmp_path / "images"
    _image_folder(data)
    if scope == "val":  # val has a class train lacks: labels by position would be wrong
        (data / "val" / "cat").rename(data / "val" / "zebra")
        status, lines = cli(capsys, "train", "--model", "resnet8", "--dataset", "imagefolder", "--data-root", data,
                            "--image-size", 16, "--epochs", 1, "--out", tmp_path / "run")
        assert status == 2 and len(lines) == 1 and "only in train: ['cat'], only in val: ['zebra']" in lines[0]
        return
    (data / "train" / "cat" / "up").symlink_to("..")  # a loop: would index every image again and again
    from scop_ext.data import image_folder

    folder = image_folder(data, "train", 16)
    assert len(folder) == 28 and sorted({label for _, label in folder.samples}) == [0, 1]
