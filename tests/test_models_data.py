"""Model zoo (scop_ext.models) and datasets (scop_ext.data)."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from scop_ext import data, models

# ----------------------------------------------------------------------------------- models


@pytest.mark.parametrize("name,n", [("resnet20", 3), ("resnet32", 5), ("resnet56", 9), ("resnet110", 18)])
def test_cifar_resnet_structure_and_shape(name, n):
    model = models.build_model(name, num_classes=7, in_channels=3).eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    # 6n + 1 convolutions on the main path (depth 6n + 2 with the classifier) plus 2 projections.
    assert len(convs) == 6 * n + 1 + 2
    assert sum(1 for m in convs if m.kernel_size == (1, 1)) == 2
    assert [m.out_channels for m in convs if m.kernel_size == (1, 1)] == [32, 64]
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_resnet_digits_size_and_shape():
    model = models.resnet_digits()
    params = sum(p.numel() for p in model.parameters())
    assert 15_000 <= params <= 50_000
    assert model.conv1.in_channels == 1
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_resnet_digits_learns_digits(one_thread):
    torch.manual_seed(0)
    x, y = data.digits("train").tensors
    xt, yt = data.digits("test").tensors
    model = models.resnet_digits()
    epochs, batch = 8, 64
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=epochs * -(-len(x) // batch))
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(batch):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(xt).argmax(1) == yt).float().mean().item()
    assert accuracy >= 0.95


@pytest.mark.parametrize("name", ["torchvision:resnet18", "torchvision:mobilenet_v2", "torchvision:vgg11_bn"])
def test_torchvision_models(name):
    model = models.build_model(name, num_classes=5, in_channels=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_torchvision_in_channels_replaces_stem():
    model = models.build_model("torchvision:resnet18", num_classes=4, in_channels=1).eval()
    assert model.conv1.in_channels == 1 and model.conv1.out_channels == 64 and model.conv1.stride == (2, 2)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 16, 16)).shape == (2, 4)


def test_model_names_and_errors():
    names = models.model_names()
    for name in ["resnet20", "resnet32", "resnet56", "resnet110", "resnet_digits", "torchvision:resnet18"]:
        assert name in names
    with pytest.raises(ValueError, match="unknown model name"):
        models.build_model("resnet21", 10, 3)
    with pytest.raises(ValueError, match="unknown torchvision model"):
        models.build_model("torchvision:not_a_model", 10, 3)
    with pytest.raises(ValueError, match="num_classes"):
        models.build_model("resnet20", 0, 3)


def test_example_input_sizes():
    assert models.example_input("resnet_digits", 1).shape == (1, 1, 8, 8)
    assert models.example_input("resnet56").shape == (1, 3, 32, 32)
    assert models.example_input("torchvision:resnet18", batch_size=2).shape == (2, 3, 224, 224)


def test_timm_models_build_offline_at_their_pretrained_size(tmp_path):
    import timm
    from safetensors.torch import save_file

    for name in ("convnext_atto", "efficientnet_b3"):  # 224 and 288 px by their default weights
        size = timm.get_pretrained_cfg(name).input_size[-1]
        assert models.example_input("timm:" + name, 1).shape == (1, 1, size, size)
    source = models.build_model("timm:mobilenetv3_small_050", 7, 1).eval()
    assert source.conv_stem.in_channels == 1 and source(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = models.build_model("timm:mobilenetv3_small_050", 7, 1, weights=tmp_path / "w.safetensors")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())
    assert "timm:<name>" in models.model_names()
    with pytest.raises(ValueError, match="unknown timm model 'not_a_model'"):
        models.build_model("timm:not_a_model", 10, 3)
    with pytest.raises(ValueError, match="does not exist"):
        models.build_model("timm:resnet18", 10, 3, weights=tmp_path / "missing.safetensors")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_from_local_file(tmp_path, suffix):
    source = models.build_model("torchvision:resnet18", 10, 3)
    path = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save(source.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    loaded = models.build_model("torchvision:resnet18", 10, 3, weights=path)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_weights_errors_name_the_file(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(models.resnet20(num_classes=10).state_dict(), path)
    with pytest.raises(ValueError, match="does not match") as err:
        models.build_model("resnet32", 10, 3, weights=path)  # missing blocks
    assert str(path) in str(err.value)
    with pytest.raises(ValueError, match="does not exist"):
        models.build_model("resnet20", 10, 3, weights=tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read") as err:
        models.build_model("resnet20", 10, 3, weights=junk)
    assert str(junk) in str(err.value)
    not_state = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_state)
    with pytest.raises(ValueError, match="does not hold a state_dict"):
        models.build_model("resnet20", 10, 3, weights=not_state)


def test_pretrained_checkpoint_gets_a_new_head_for_the_data(tmp_path, caplog):
    """A 1000-class ImageNet-style checkpoint (here random weights, nested as a training checkpoint
    with DataParallel's prefix) starts a 10-class model: every tensor but the classifier loads,
    the classifier is new, and one log line says so. A 3-channel stem meeting 1-channel images is
    summed over its input channels. A difference anywhere else is still an error naming the file."""
    import logging

    torch.manual_seed(0)
    imagenet = torchvision.models.resnet18(num_classes=1000)
    path = tmp_path / "resnet18.pth"
    torch.save({"epoch": 90, "state_dict": {f"module.{k}": v for k, v in imagenet.state_dict().items()}}, path)
    with caplog.at_level(logging.INFO, logger="scop_ext"):
        model = models.build_model("torchvision:resnet18", 10, 3, weights=path)
    assert model.fc.out_features == 10 and not torch.equal(model.fc.weight[:10], imagenet.fc.weight[:10])
    for k, v in imagenet.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(model.state_dict()[k], v), k
    assert "classifier 'fc' has 1000 outputs there; it is replaced" in caplog.text
    grey = models.build_model("torchvision:resnet18", 10, 1, weights=path)
    torch.testing.assert_close(grey.conv1.weight, imagenet.conv1.weight.sum(1, keepdim=True))
    with pytest.raises(ValueError, match=f"{path}.*does not match the architecture 'torchvision:resnet34'"):
        models.build_model("torchvision:resnet34", 10, 3, weights=path)


def test_transformers_are_refused_in_one_line():
    assert not [n for n in models.model_names() if n.startswith(("torchvision:vit", "torchvision:swin", "torchvision:maxvit"))]
    with pytest.raises(ValueError, match="vit_b_16' is a transformer.*out of scope"):
        models.build_model("torchvision:vit_b_16", 10, 3)


# ------------------------------------------------------------------------------------- data


def test_digits_splits():
    train, test = data.digits("train"), data.digits("test")
    assert len(train) + len(test) == 1797 and len(test) == 450
    x, y = train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and 0 <= int(y) <= 9
    dataset, info = data.load_dataset("digits", split="test")
    assert len(dataset) == 450 and info == data.DatasetInfo("digits", 10, 1, 8)


def test_holdout_split():
    fit, val = data.holdout(1347, 0.1, seed=3)
    assert len(val) == 135 and len(fit) == 1212
    assert sorted(fit + val) == list(range(1347))  # disjoint and covering
    assert data.holdout(1347, 0.1, seed=3) == (fit, val)
    assert data.holdout(1347, 0.1, seed=4)[1] != val
    assert data.holdout(10, 0.0) == (list(range(10)), [])
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="fraction"):
            data.holdout(10, bad)


def _write_cifar(folder, per_batch=3, test=2, seed=0):
    """A tiny CIFAR-10 python-format folder; returns the raw uint8 arrays and labels written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    written = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test)]:
        batch = {
            "batch_label": name,
            "labels": rng.integers(0, 10, n).tolist(),
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "filenames": [f"{name}_{i}.png" for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        written[name] = batch
    return written


def test_cifar10_reads_python_format(tmp_path):
    written = _write_cifar(tmp_path / "cifar-10-batches-py")
    test, info = data.load_dataset("cifar10", tmp_path, "test")
    assert info == data.DatasetInfo("cifar10", 10, 3, 32) and len(test) == 2
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    for i in range(2):
        x, y = test[i]
        raw = torch.from_numpy(written["test_batch"]["data"][i].reshape(3, 32, 32)).float() / 255
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        torch.testing.assert_close(x, (raw - mean) / std)
        assert int(y) == written["test_batch"]["labels"][i]
    train = data.cifar10(tmp_path / "cifar-10-batches-py", "train")  # the folder itself works too
    assert len(train) == 15
    assert [int(train[i][1]) for i in range(15)] == sum(
        (written[f"data_batch_{b}"]["labels"] for b in range(1, 6)), []
    )
    # Training items are augmented (padded random crop + flip): repeated draws differ.
    torch.manual_seed(0)
    draws = torch.stack([train[0][0] for _ in range(8)])
    assert not all(torch.equal(draws[0], d) for d in draws[1:])


def test_cifar10_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py") as err:
        data.load_dataset("cifar10", tmp_path / "nowhere", "train")
    assert "nowhere" in str(err.value)
    folder = tmp_path / "c" / "cifar-10-batches-py"
    _write_cifar(folder)
    (folder / "test_batch").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="test_batch"):
        data.cifar10(tmp_path / "c", "test")
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="3072"):
        data.cifar10(tmp_path / "c", "test")
    with pytest.raises(ValueError, match="root is required"):
        data.load_dataset("cifar10", None, "train")


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_cifar10_refuses_code_in_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder)
    target = tmp_path / "pwned"
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": _Evil(str(target)), "labels": []}, f)
    with pytest.raises(ValueError, match="not allowed"):
        data.cifar10(tmp_path, "test")
    assert not target.exists()


def _write_image_folder(root, classes=("cat", "dog"), per_class=2):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            os.makedirs(root / split / c)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")


def test_image_folder(tmp_path):
    _write_image_folder(tmp_path)
    train, info = data.load_dataset("imagefolder", tmp_path, "train", image_size=16)
    assert info == data.DatasetInfo("imagefolder", 2, 3, 16) and len(train) == 4
    x, y = train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and int(y) == 0
    val, _ = data.load_dataset("imagefolder", tmp_path, "test", image_size=8)
    assert len(val) == 4 and val[3][0].shape == (3, 8, 8) and int(val[3][1]) == 1
    assert val.root == os.path.join(tmp_path, "val")


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train") as err:
        data.image_folder(tmp_path / "none", "train")
    assert "none" in str(err.value)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="not an image folder"):
        data.image_folder(tmp_path / "empty", "train")
    with pytest.raises(ValueError, match="split"):
        data.image_folder(tmp_path, "test")


def test_load_dataset_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_dataset("mnist", tmp_path)
    with pytest.raises(ValueError, match="split"):
        data.load_dataset("digits", split="val")
    with pytest.raises(ValueError, match="root must be None"):
        data.load_dataset("digits", tmp_path)
