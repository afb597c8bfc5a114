"""Stage 2 (learn_scales), the Lemma 2 bias fit, and the shared training loop."""

import re

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from scop_ext import checkpoint, convert, lemma2, scop_layers
from scop_ext.prune.excavate import PairedDataset, fit_knockoff_biases, learn_scales, pair_dataset
from scop_ext.train import NonFiniteError, evaluate, fit, make_loader, recalibrate_bn
from scop_ext import train as train_module


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
    from scop_ext import layers as layers_module

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
