"""split_forward: frozen-BN stage 2 with the knockoff stream run apart, without autograd."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils._python_dispatch import TorchDispatchMode

from scop_ext import convert, scop_layers
from scop_ext.scales.split import split_forward
from scop_ext import scales
from scop_ext.scales import learn as scales_learn
from tests._helpers import scop_ready


class _SharedConvNet(nn.Module):
    """Stem, a residual block whose conv runs twice per forward, a reflect-padded conv, head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.shared = nn.Conv2d(6, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.reflect = nn.Conv2d(6, 8, 3, stride=2, padding=1, padding_mode="reflect", bias=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.bn(self.shared(F.relu(self.shared(x)))))
        return self.head(F.adaptive_avg_pool2d(F.relu(self.reflect(x)), 1).flatten(1))


def _model(seed=0):
    torch.manual_seed(seed)
    return scop_ready(_SharedConvNet().double()).eval()


def _pairs(n=48, batch=8):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 8, 8, generator=gen, dtype=torch.float64)
    xk = 0.5 * x + torch.randn(n, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(3, (n,), generator=gen)
    return DataLoader(TensorDataset(x, xk, y), batch_size=batch, shuffle=False)


def _paired_forward(model, x, xk):
    return model(torch.cat([x, xk]))[: x.shape[0]]


def test_learn_scales_frozen_gives_the_betas_of_the_paired_batch(monkeypatch):
    # 6 batches x 50 epochs = 300 Adam steps in float64, the same Lemma 2 draws on both paths.
    runs = {}
    for path in ("split", "paired"):
        net = _model()
        if path == "paired":
            monkeypatch.setattr(scales_learn, "split_forward", _paired_forward)
        scales.learn_scales(net, _pairs(), "cpu", epochs=50, bn="frozen", seed=3, progress=False)
        runs[path] = torch.cat([layer.beta.detach() for layer in scop_layers(net).values()])
    assert not torch.equal(runs["split"], torch.full_like(runs["split"], 0.5))  # beta did move
    torch.testing.assert_close(runs["split"], runs["paired"], rtol=0, atol=1e-9)


def test_split_forward_matches_the_real_half_of_the_paired_forward():
    net = _model()
    for layer in scop_layers(net).values():
        with torch.no_grad():
            layer.beta.uniform_()
    _assert_split_matches_paired(net, seed=10)


def _assert_split_matches_paired(net, seed):
    """Output and beta gradients of split_forward equal those of the paired forward (same draws)."""
    x, xk, _ = next(iter(_pairs()))
    betas = [layer.beta for layer in scop_layers(net).values()]
    results = []
    for forward in (split_forward, _paired_forward):
        for i, layer in enumerate(scop_layers(net).values()):
            layer.generator = torch.Generator().manual_seed(seed + i)
        out = forward(net, x, xk)
        results.append((out.detach(), torch.autograd.grad(out.square().sum(), betas)))
    (out_s, grads_s), (out_p, grads_p) = results
    torch.testing.assert_close(out_s, out_p, rtol=0, atol=1e-12)
    for gs, gp in zip(grads_s, grads_p):
        torch.testing.assert_close(gs, gp, rtol=0, atol=1e-12)


def _activation(t, weights) -> bool:
    """A 4-D tensor that is neither a conv weight nor a broadcast (1, C, 1, 1) per-channel vector."""
    return isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape not in weights and t.numel() != t.shape[1]


class _BackwardOps(TorchDispatchMode):
    """Batch sizes of the activations each aten op reads."""

    def __init__(self, weights):
        super().__init__()
        self.weights, self.calls = weights, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        batches = [a.shape[0] for a in args if _activation(a, self.weights)]
        self.calls.append((func.overloadpacket.__name__, batches))
        return func(*args, **(kwargs or {}))


def _profile(forward, net, x, xk):
    """(batch sizes of the activations autograd saves, (op, batch sizes) of every backward op)."""
    weights = {layer.weight.shape for layer in scop_layers(net).values()}
    saved = []

    def pack(t):
        if _activation(t, weights):
            saved.append(t.shape[0])
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward(net, x, xk)
    with _BackwardOps(weights) as ops:
        out.square().sum().backward()
    return saved, ops.calls


def test_knockoff_half_gets_no_backward():
    x, xk, _ = next(iter(_pairs()))
    n = x.shape[0]
    net = _model()
    for p in net.parameters():  # as in stage 2: only beta trains
        p.requires_grad_(False)
    for layer in scop_layers(net).values():
        layer.beta.requires_grad_(True)
    profiles = {forward: _profile(forward, net, x, xk) for forward in (split_forward, _paired_forward)}
    conv_ops = ("convolution", "convolution_backward")
    # Control: today's paired batch does run conv input-gradients and BN/ReLU backward over 2N.
    saved, calls = profiles[_paired_forward]
    assert any(2 * n in batches for name, batches in calls if name in conv_ops)
    assert 2 * n in saved
    saved, calls = profiles[split_forward]
    assert saved and all(b == n for b in saved), "autograd kept a tensor of the knockoff half"
    assert all(b == n for _, batches in calls for b in batches), "the backward touched the knockoff half"
    # One input-gradient convolution per conv call whose input needs grad: shared twice, reflect.
    assert sum(name in conv_ops for name, _ in calls) == 3


def test_split_forward_refuses_training_bn_and_unpaired_shapes():
    net = _model()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="x and x_knockoff must have one shape"):
        split_forward(net, x, x[:1])
    net.bn.train()
    with pytest.raises(ValueError, match="'bn' is training"):
        split_forward(net, x, x)
    assert all(layer.stream is None for layer in scop_layers(net).values())


def test_split_forward_keeps_no_batchnorm_or_conv_input():
    # Per conv call autograd keeps the branch difference, and ReLU its output; a frozen BN keeps
    # a per-channel scale, not its (N, C, H, W) input, and a ScopConv2d not its input.
    x, xk, _ = next(iter(_pairs()))
    net = _model()
    for p in net.parameters():
        p.requires_grad_(False)
    for layer in scop_layers(net).values():
        layer.beta.requires_grad_(True)
    bn_inputs = []
    hook = net.bn.register_forward_hook(lambda m, args, out: bn_inputs.append(args[0]))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = split_forward(net, x, xk)
    hook.remove()
    weights = {layer.weight.shape for layer in scop_layers(net).values()}
    activations = {t.untyped_storage().data_ptr() for t in saved if _activation(t, weights)}
    assert bn_inputs[-1].untyped_storage().data_ptr() not in activations
    # 4 conv calls (stem, shared twice, reflect) and 4 ReLUs: one activation each, no more.
    assert len(activations) == 8
    out.sum().backward()  # and what was kept suffices


class _InPlaceNet(nn.Module):
    """VGG-like: an in-place ReLU right on a conv's output, which changes the knockoff record."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True),
                                      nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def test_split_forward_survives_in_place_changes_of_the_knockoff_output():
    torch.manual_seed(0)
    net = convert(_InPlaceNet().double()).eval()
    for layer in scop_layers(net).values():
        layer.fit_knockoff_bias(torch.rand(layer.in_channels, dtype=torch.float64) + 0.1)
        with torch.no_grad():
            layer.beta.uniform_()
    # The first call finds the overwritten record and redoes the knockoff pass; the next copies it at once.
    for seed in (20, 30):
        _assert_split_matches_paired(net, seed)


def test_split_forward_refuses_batchnorm_without_running_statistics():
    net = _model()
    net.bn.track_running_stats, net.bn.running_mean, net.bn.running_var = False, None, None
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="'bn' keeps no running statistics"):
        split_forward(net, x, x)


def test_compiled_split_forward_matches_eager_in_one_graph():
    # fullgraph=True: the knockoff pass, the records and the real pass trace with no graph break;
    # float64, the same Lemma 2 keys (torch's default generator, reseeded), three batches.
    torch._dynamo.reset()
    compiled = torch.compile(split_forward, fullgraph=True)
    torch._dynamo.utils.counters.clear()
    graphs = torch._dynamo.utils.counters["stats"]
    runs = {}
    for name, forward in (("eager", split_forward), ("compiled", compiled)):
        net = _model()
        for i, layer in enumerate(scop_layers(net).values()):
            layer.generator = None  # dynamo cannot trace a torch.Generator argument
            with torch.no_grad():
                layer.beta.uniform_(generator=torch.Generator().manual_seed(i))
        betas = [layer.beta for layer in scop_layers(net).values()]
        runs[name] = []
        for x, xk, y in list(_pairs())[:3]:
            torch.manual_seed(5)
            loss = F.cross_entropy(forward(net, x, xk), y)
            runs[name].append((loss.detach(), torch.autograd.grad(loss, betas)))
    assert graphs["unique_graphs"] == 1  # one graph, never recompiled
    for (loss_e, grads_e), (loss_c, grads_c) in zip(runs["eager"], runs["compiled"]):
        torch.testing.assert_close(loss_c, loss_e, rtol=0, atol=1e-12)
        for gc, ge in zip(grads_c, grads_e):
            torch.testing.assert_close(gc, ge, rtol=0, atol=1e-12)
