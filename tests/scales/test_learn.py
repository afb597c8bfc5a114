"""Stage 2 (learn_scales), the Lemma 2 bias fit, and the shared training loop."""

import copy
import json
import re

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from scop_ext.train import checkpoint
from scop_ext import convert, scop_layers
from scop_ext.nn import lemma2
from scop_ext.scales import fit_knockoff_biases, learn_scales
from scop_ext.scales.pairs import PairedDataset, pair_dataset
from scop_ext.train.epochs import NonFiniteError
from scop_ext.train import evaluate, fit, make_loader, recalibrate_bn
from scop_ext.train import training as train_module

from tests._helpers import _tiny_net, _toy_data


def _data(n=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=gen)
    x = torch.randn(n, 2, 6, 6, generator=gen) * 0.5
    x[:, 0] += y[:, None, None].float()  # channel 0 carries the label, channel 1 is noise
    return TensorDataset(x, y)


def _noise_knockoff(x, generator=None):
    return torch.randn(x.shape, generator=generator) * x.std()


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )


def _pairs(seed=0):
    return pair_dataset(_data(), _noise_knockoff, seed=seed)


def test_pair_dataset_is_deterministic_and_paired():
    a, b = _pairs(seed=1), _pairs(seed=1)
    assert all(torch.equal(u, v) for u, v in zip(a.tensors, b.tensors))
    assert not torch.equal(a.tensors[1], _pairs(seed=2).tensors[1])
    assert torch.equal(a.tensors[0], _data().tensors[0])
    on_the_fly = PairedDataset(_data(), _noise_knockoff, seed=3)
    assert torch.equal(on_the_fly[5][1], on_the_fly[5][1]) and on_the_fly[5][1].shape == (2, 6, 6)


def test_learn_scales_trains_only_beta_and_keeps_bn_statistics():
    net = convert(_net())
    frozen = {k: v.clone() for k, v in net.state_dict().items() if "beta" not in k}
    history = learn_scales(net, make_loader(_pairs(), 16, shuffle=True), "cpu", epochs=2, progress=False)
    assert len(history.loss) == 2 and set(history.beta_mean) == {"0", "3"}
    after = net.state_dict()
    for k, v in frozen.items():
        assert torch.equal(after[k], v), k
    for layer in scop_layers(net).values():
        assert 0 <= float(layer.beta.detach().min()) and float(layer.beta.detach().max()) <= 1
        assert not torch.equal(layer.beta, torch.full_like(layer.beta, 0.5))
    assert all(p.requires_grad for p in net.parameters())  # restored


def test_ignored_filter_keeps_zero_importance():
    """A filter the next layer ignores has zero gradient for beta, so its importance stays 0."""
    net = _net()
    with torch.no_grad():
        net[3].weight[:, 2] = 0  # layer 3 ignores filter 2 of layer 0
    convert(net)
    learn_scales(net, make_loader(_pairs(), 16, shuffle=True), "cpu", epochs=2, bn="frozen", progress=False)
    imp = scop_layers(net)["0"].importance()
    assert float(imp[2]) == 0.0
    assert float(imp.abs().max()) > 0.01


def test_resume_gives_the_same_betas(tmp_path):
    loader = make_loader(_pairs(), 16, shuffle=True)
    full = convert(_net())
    learn_scales(full, loader, "cpu", epochs=3, progress=False)
    path = str(tmp_path / "scales.pt")
    part = convert(_net())
    learn_scales(part, loader, "cpu", epochs=1, checkpoint_path=path, progress=False)
    resumed = convert(_net())  # a fresh process: nothing in memory but the checkpoint
    learn_scales(resumed, loader, "cpu", epochs=3, checkpoint_path=path, progress=False)
    for name, layer in scop_layers(full).items():
        assert torch.equal(layer.beta, scop_layers(resumed)[name].beta), name


def test_progress_saved_before_adam_betas_was_named_apart_still_resumes(tmp_path):
    loader = make_loader(_pairs(), 16, shuffle=True)
    full = convert(_net())
    learn_scales(full, loader, "cpu", epochs=2, progress=False)
    path = str(tmp_path / "scales.pt")
    learn_scales(convert(_net()), loader, "cpu", epochs=1, checkpoint_path=path, progress=False)
    state = checkpoint.load(path, "scales-progress")
    settings = json.loads(state["settings"])
    settings["betas"] = settings.pop("adam_betas")  # the key an older scop wrote
    checkpoint.save(path, "scales-progress", {**state, "settings": json.dumps(settings, sort_keys=True)})
    resumed = convert(_net())
    learn_scales(resumed, loader, "cpu", epochs=2, checkpoint_path=path, progress=False)
    for name, layer in scop_layers(full).items():
        assert torch.equal(layer.beta, scop_layers(resumed)[name].beta), name


def test_nan_in_knockoffs_stops_with_step():
    pairs = _pairs()
    pairs.tensors[1][40] = float("nan")
    net = convert(_net())
    with pytest.raises(NonFiniteError, match=r"learn_scales: loss became nan at epoch 0, step 2"):
        learn_scales(net, make_loader(pairs, 16, shuffle=False), "cpu", epochs=1, progress=False)


def test_learn_scales_rejects_bad_arguments():
    with pytest.raises(ValueError, match="no ScopConv2d"):
        learn_scales(_net(), make_loader(_pairs(), 16, shuffle=False), "cpu", progress=False)
    with pytest.raises(ValueError, match="bn must be"):
        learn_scales(convert(_net()), make_loader(_pairs(), 16, shuffle=False), "cpu", bn="sync", progress=False)


def test_fit_knockoff_biases_measures_s_at_the_input():
    net = convert(_net())
    pairs = _pairs()
    report = fit_knockoff_biases(net, make_loader(pairs, 32, shuffle=False), "cpu", batches=3)
    x, xk, _ = pairs.tensors
    torch.testing.assert_close(report["0"]["s_in"], lemma2.estimate_s(x, xk))
    for name, layer in scop_layers(net).items():
        assert layer.knockoff_R is not None and report[name]["margin"] > 0


def test_fit_keeps_best_epoch_lower_loss_breaks_ties(monkeypatch):
    """Top-1 decides; among equal top-1 the lower validation loss wins, not the earlier epoch."""
    scripted = iter([(1.0, 0.5), (1.0, 0.1), (0.9, 0.01), (1.0, 0.3)])  # (top1, loss) per epoch
    snapshots = []

    def fake_evaluate(model, loader, device, amp=False):
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        top1, loss = next(scripted)
        return {"top1": top1, "loss": loss, "count": 1}

    monkeypatch.setattr(train_module, "evaluate", fake_evaluate)
    net = _net()
    data = _data()
    result = fit(net, make_loader(data, 16, shuffle=True), make_loader(data, 64, shuffle=False, evaluation=True),
                 epochs=4, lr=0.05, device="cpu", progress=False)
    assert result.best_epoch == 1 and result.best_top1 == 1.0
    for key, value in net.state_dict().items():  # the model holds epoch 1's weights
        torch.testing.assert_close(value, snapshots[1][key])


def test_fit_recalibrate_evaluate(tmp_path):
    data = _data()
    net = _net()
    path = str(tmp_path / "ft.pt")
    result = fit(net, make_loader(data, 16, shuffle=True), make_loader(data, 64, shuffle=False, evaluation=True),
                 epochs=8, lr=0.05, device="cpu", checkpoint_path=path, progress=False)
    assert result.best_top1 > 0.9  # the label is written into channel 0
    assert checkpoint.load(path, "finetune-progress")["epoch"] == 7
    metrics = evaluate(net, make_loader(data, 64, shuffle=False, evaluation=True), "cpu")
    assert metrics["top1"] == pytest.approx(result.best_top1) and metrics["count"] == len(data)
    assert recalibrate_bn(net, make_loader(data, 16, shuffle=False), "cpu", batches=2) == 2


def test_layers_of_equal_width_draw_independent_biases(monkeypatch):
    """Each layer has its own bias stream: with one seed for all, two layers of equal width with
    the same Lemma 2 factor would add the same [b, b~] at every step."""
    from scop_ext.nn import lemma2 as layers_module

    def net():
        torch.manual_seed(0)
        return convert(nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)))

    real_sample = layers_module.lemma2_sample

    def run():
        draws = []
        monkeypatch.setattr(layers_module, "lemma2_sample", lambda *a, **k: draws.append(real_sample(*a, **k)) or draws[-1])
        model = net()
        for layer in scop_layers(model).values():
            layer.set_knockoff_bias(0.1 * torch.eye(6), 0.01)  # the same factor in both layers
        learn_scales(model, make_loader(_pairs(), 32, shuffle=False), "cpu", epochs=1, progress=False)
        return draws

    draws = run()
    assert len(draws) == 6  # two layers, three steps
    for step in range(0, 6, 2):
        assert not torch.allclose(draws[step], draws[step + 1]), step
    assert all(torch.equal(a, b) for a, b in zip(draws, run()))  # and a rerun draws the same


def test_progress_of_other_settings_is_refused(tmp_path):
    path = str(tmp_path / "progress.pt")
    loader = make_loader(_pairs(), 16, shuffle=True)
    learn_scales(convert(_net()), loader, "cpu", epochs=1, checkpoint_path=path, progress=False)
    saved = checkpoint.load(path, "scales-progress")
    for change, pattern in ((dict(bn="frozen"), 'bn: "batch" there, "frozen" now'),
                            (dict(seed=1), "seed: 0 there, 1 now"),
                            (dict(settings={"run": "other"}), 'run: null there, "other" now')):
        net = convert(_net())
        with pytest.raises(checkpoint.CheckpointError, match=re.escape(pattern)):
            learn_scales(net, loader, "cpu", epochs=2, checkpoint_path=path, progress=False, **change)
        assert all(torch.equal(layer.beta, torch.full_like(layer.beta, 0.5)) for layer in scop_layers(net).values())
    assert torch.equal(checkpoint.load(path, "scales-progress")["betas"]["0"], saved["betas"]["0"])
    longer = str(tmp_path / "longer.pt")
    learn_scales(convert(_net()), loader, "cpu", epochs=2, checkpoint_path=longer, progress=False)
    with pytest.raises(checkpoint.CheckpointError, match="holds 2 epochs of progress, more than the epochs=1 asked for"):
        learn_scales(convert(_net()), loader, "cpu", epochs=1, checkpoint_path=longer, progress=False)


def test_fit_refuses_the_progress_of_other_settings(tmp_path):
    path = tmp_path / "ft.pt"
    data = make_loader(_data(), 16, shuffle=True)
    fit(_net(), data, None, epochs=2, lr=0.05, device="cpu", checkpoint_path=str(path), progress=False)
    kept = path.read_bytes()
    with pytest.raises(checkpoint.CheckpointError, match=re.escape("(epochs: 2 there, 3 now)")):
        fit(_net(), data, None, epochs=3, lr=0.05, device="cpu", checkpoint_path=str(path), progress=False)
    with pytest.raises(checkpoint.CheckpointError, match=re.escape("(data: null there, \"cifar\" now)")):
        fit(_net(), data, None, epochs=2, lr=0.05, device="cpu", checkpoint_path=str(path), settings={"data": "cifar"},
            progress=False)
    assert path.read_bytes() == kept
    state = checkpoint.load(path, "finetune-progress")
    del state["settings"]  # as written before progress files recorded their settings
    checkpoint.save(path, "finetune-progress", state)
    with pytest.raises(checkpoint.CheckpointError, match="records no settings to match this run against"):
        fit(_net(), data, None, epochs=2, lr=0.05, device="cpu", checkpoint_path=str(path), progress=False)


# ----------------- faults: NaN/Inf stops at the step naming the layer; resumed augmentation


class PoisonAfter(Dataset):
    """Serves ``items`` cleanly for the first ``clean`` fetches, then with NaN in the image."""

    def __init__(self, items: Dataset, clean: int):
        self.items, self.clean, self.fetched = items, clean, 0

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        self.fetched += 1
        x, *rest = self.items[i]
        if self.fetched > self.clean:
            x = x.clone()
            x[0, 0, 0] = float("nan")
        return (x, *rest)


@pytest.mark.usefixtures("one_thread")
def test_nan_input_during_finetuning_stops_at_the_step_and_keeps_the_checkpoint(tmp_path):
    x, y = _toy_data()
    data = PoisonAfter(TensorDataset(x, y), clean=len(x) + 40)  # epoch 1 clean, then mid-epoch 2 (batch 3 of 4)
    model = _tiny_net()
    snapshots = []
    ckpt = tmp_path / "finetune-progress.pt"
    with pytest.raises(NonFiniteError) as info:
        fit(model, make_loader(data, 24, shuffle=True, seed=1), None, epochs=3, lr=0.05, device="cpu", progress=False,
            checkpoint_path=str(ckpt), log=lambda line: snapshots.append(copy.deepcopy(model.state_dict())))
    message = str(info.value)
    assert "finetune: loss became nan at epoch 1, step 1" in message
    assert "input batch already holds NaN/Inf" in message and "first non-finite output: layer 0 (Conv2d)" in message
    assert len(snapshots) == 1  # epoch 1 finished, epoch 2 did not
    state = checkpoint.load(ckpt, "finetune-progress")
    assert state["epoch"] == 0
    for key, value in snapshots[0].items():
        assert torch.equal(state["model"][key], value), key


@pytest.mark.usefixtures("one_thread")
def test_nan_weights_name_the_layer_where_they_start(tmp_path):
    x, y = _toy_data()
    model = _tiny_net()
    calls = []

    def poison(module, args):  # the second BN's scale turns Inf at the 6th forward (epoch 2, step 1)
        calls.append(1)
        if len(calls) == 6:
            with torch.no_grad():
                model[4].weight.fill_(float("inf"))

    model.register_forward_pre_hook(poison)
    with pytest.raises(NonFiniteError, match="at epoch 1, step 1; first non-finite output: layer 4 \\(BatchNorm2d\\)"):
        fit(model, make_loader(TensorDataset(x, y), 24, shuffle=True, seed=1), None, epochs=2, lr=0.05, device="cpu",
            progress=False)


def _paired(x, y):
    return TensorDataset(x, torch.randn(x.shape, generator=torch.Generator().manual_seed(5)), y)


def _scop_net():
    net = convert(_tiny_net())
    x, y = _toy_data()
    fit_knockoff_biases(net, DataLoader(_paired(x, y), 48), "cpu", batches=1)
    return net


@pytest.mark.usefixtures("one_thread")
def test_nan_input_during_stage2_stops_at_the_step_and_keeps_the_checkpoint(tmp_path):
    x, y = _toy_data()
    ckpt = tmp_path / "scales-progress.pt"
    net = _scop_net()
    data = PoisonAfter(_paired(x, y), clean=len(x) + 40)
    with pytest.raises(NonFiniteError) as info:
        learn_scales(net, make_loader(data, 24, shuffle=True, seed=2), "cpu", epochs=3, checkpoint_path=str(ckpt),
                     progress=False)
    assert re.search(r"learn_scales: loss became nan at epoch 1, step 1; the input batch already holds NaN/Inf "
                     r"\(first non-finite output: layer 0 \(ScopConv2d\)\)", str(info.value)), str(info.value)
    # the checkpoint holds exactly epoch 1 of the run: the same as a clean one-epoch run
    clean = _scop_net()
    learn_scales(clean, make_loader(_paired(x, y), 24, shuffle=True, seed=2), "cpu", epochs=1, progress=False)
    state = checkpoint.load(ckpt, "scales-progress")
    assert state["epoch"] == 0
    for name, layer in scop_layers(clean).items():
        assert not torch.equal(layer.beta.detach(), torch.full_like(layer.beta, 0.5))
        assert torch.equal(state["betas"][name], layer.beta.detach()), name


@pytest.mark.usefixtures("one_thread")
def test_nan_beta_names_the_layer_and_step(monkeypatch):
    net = _scop_net()
    layer = scop_layers(net)["3"]
    steps = []

    def clamp_then_poison():
        steps.append(1)
        with torch.no_grad():
            layer.beta.clamp_(0, 1)
            if len(steps) == 3:
                layer.beta[2] = float("nan")

    monkeypatch.setattr(layer, "clamp_beta_", clamp_then_poison)
    x, y = _toy_data()
    with pytest.raises(NonFiniteError, match="beta of layer '3' became NaN/Inf at epoch 0, step 2 \\(its gradient was finite\\)"):
        learn_scales(net, make_loader(_paired(x, y), 24, shuffle=True, seed=2), "cpu", epochs=2, progress=False)


@pytest.mark.usefixtures("one_thread")
def test_layer_fit_warnings_name_the_layer():
    net = _tiny_net()
    with torch.no_grad():
        net[3].weight.zero_()
    convert(net)
    x, y = _toy_data()
    with pytest.warns(UserWarning, match="layer '3': M = W\\^T diag"):
        fit_knockoff_biases(net, DataLoader(_paired(x, y), 48), "cpu", batches=1)


class RandomFlip(Dataset):
    """Flips images at random with the global generator, as torchvision augmentation does."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        x, y = self.items[i]
        return (x.flip(-1) if torch.rand(()) < 0.5 else x), y


@pytest.mark.usefixtures("one_thread")
def test_resumed_fit_with_random_augmentation_equals_an_uninterrupted_one(tmp_path):
    x, y = _toy_data()
    data = RandomFlip(TensorDataset(x, y))

    def run(ckpt, stop_at=None):
        torch.manual_seed(0)
        model = _tiny_net()
        lines = []

        def log(line):
            lines.append(line)
            if len(lines) == stop_at:
                raise KeyboardInterrupt  # killed after the last complete epoch's checkpoint, mid-way
        fit(model, make_loader(data, 24, shuffle=True, seed=1), None, epochs=3, lr=0.05, device="cpu",
            progress=False, checkpoint_path=str(ckpt), log=log)
        return model

    whole = run(tmp_path / "whole.pt")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut.pt", stop_at=3)  # the third epoch's checkpoint is never written
    torch.manual_seed(123)  # whatever the state of the process that resumes
    resumed = run(tmp_path / "cut.pt")
    for (key, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key
