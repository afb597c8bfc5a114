"""bn='batch_detached': the batch-BN forward, bit for bit, with the statistics constant in the backward."""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from scop_ext import convert, scop_layers
from scop_ext.nn import scop_conv as layers
from scop_ext.ops import reference
from scop_ext.scales.batch_bn import batch_detached
from scop_ext.run.config import PruneConfig
from scop_ext.models import build_model
from scop_ext import scales
from scop_ext.scales import learn as scales_learn
from scop_ext.train import batchnorms

MODELS = {"resnet_digits": (1, 8), "torchvision:mobilenet_v3_small": (3, 32)}  # (channels, px)


def _stage2_model(name, seed=0):
    """A converted float64 model as stage 2 holds it: only beta (random, in [0, 1]) trains, BN
    over the batch, Lemma 2 biases fitted, every layer its own seeded generator."""
    torch.manual_seed(seed)
    channels, _ = MODELS[name]
    net = convert(build_model(name, 5, channels)).double()
    for p in net.parameters():
        p.requires_grad_(False)
    for i, layer in enumerate(scop_layers(net).values()):
        layer.fit_knockoff_bias(torch.rand(layer.in_channels, dtype=torch.float64) + 0.1)
        layer.beta.uniform_().requires_grad_(True)
        layer.generator = torch.Generator().manual_seed(i)
    net.eval()
    for bn in batchnorms(net):
        bn.train()
    return net


def _batch(name, n=3):
    channels, px = MODELS[name]
    gen = torch.Generator().manual_seed(1)
    x2 = torch.randn(2 * n, channels, px, px, generator=gen, dtype=torch.float64)
    return x2, torch.randint(5, (n,), generator=gen)


@contextlib.contextmanager
def _reference(monkeypatch):
    """The same approximation in plain PyTorch: ``reference.dual_scaled_conv2d`` for the fused op,
    and batch norm written out with the batch statistics detached (no graph cut anywhere)."""
    batch_norm = F.batch_norm

    def detached_batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                            eps=1e-5):
        out = batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
        if not training:
            return out
        var, mean = torch.var_mean(x, (0, 2, 3), unbiased=False, keepdim=True)
        shape = (1, -1, 1, 1)
        return (x - mean.detach()) * (var.detach() + eps).rsqrt() * weight.view(shape) + bias.view(shape)

    with monkeypatch.context() as m:
        m.setattr(F, "batch_norm", detached_batch_norm)
        m.setattr(layers, "dual_scaled_conv2d", reference.dual_scaled_conv2d)
        yield


def _run(net, x2, y, context):
    """(2N outputs, grad of every beta, BN running statistics) of one paired forward of a copy."""
    net = copy.deepcopy(net)
    with context:
        out = net(x2)
    betas = [layer.beta for layer in scop_layers(net).values()]
    grads = torch.autograd.grad(F.cross_entropy(out[: y.shape[0]], y), betas)
    stats = [t.clone() for bn in batchnorms(net) for t in (bn.running_mean, bn.running_var)]
    return out.detach(), torch.cat(grads), stats


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_is_batch_and_gradient_is_the_reference_approximation(name, monkeypatch):
    net = _stage2_model(name)
    x2, y = _batch(name)
    out_b, grad_b, stats_b = _run(net, x2, y, contextlib.nullcontext())
    out_d, grad_d, stats_d = _run(net, x2, y, batch_detached())
    out_r, grad_r, _ = _run(net, x2, y, _reference(monkeypatch))
    # the forward is bn='batch''s, bit for bit, running-statistics update included
    assert torch.equal(out_d, out_b)
    assert all(torch.equal(a, b) for a, b in zip(stats_d, stats_b))
    torch.testing.assert_close(out_r, out_b, rtol=0, atol=1e-12)
    # the gradient is the plain-PyTorch one of the same approximation...
    torch.testing.assert_close(grad_d, grad_r, rtol=1e-9, atol=1e-13)
    # ...and not the exact one: the statistics' share of the gradient is really gone
    assert (grad_d - grad_b).abs().max() > 1e-3 * grad_b.abs().max()


class _Convolutions(TorchDispatchMode):
    """Batch size of every convolution's input (forward and transposed)."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("convolution", "convolution_backward"):
            self.batches.append(args[0].shape[0])
        return func(*args, **(kwargs or {}))


def test_backward_runs_no_knockoff_half_and_bn_saves_nothing():
    net = _stage2_model("resnet_digits")
    x2, y = _batch("resnet_digits", n=4)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        with batch_detached():
            loss = F.cross_entropy(net(x2)[:4], y)
    with _Convolutions() as convs:
        loss.backward()
    # one input-gradient convolution per wrapped conv but the first (its input needs no grad), over N
    assert convs.batches == [4] * (len(scop_layers(net)) - 1)
    # autograd keeps per-channel BN scales and ReLU outputs, but no BN input: 2N activations only
    # from ReLU (one per BN) and the N-image branch difference of each conv
    full = [s for s in saved if len(s) == 4 and s[0] == 8]
    assert len(full) <= len(batchnorms(net)), full


def test_learn_scales_batch_detached_follows_the_reference(monkeypatch):
    # 60 float64 Adam steps, the same Lemma 2 draws; the reference runs bn='batch_detached''s
    # approximation in plain PyTorch through the same loop
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(24, 1, 8, 8, generator=gen, dtype=torch.float64)
    data = TensorDataset(x, 0.6 * x + torch.randn(x.shape, generator=gen, dtype=torch.float64),
                         torch.randint(5, (24,), generator=gen))
    runs = {}
    for path in ("fused", "reference"):
        net = _stage2_model("resnet_digits")
        with torch.no_grad():
            for layer in scop_layers(net).values():
                layer.beta.fill_(0.5)
        if path == "reference":
            monkeypatch.setattr(scales_learn, "batch_detached", lambda: _reference(monkeypatch))
        scales.learn_scales(net, DataLoader(data, batch_size=6), "cpu", epochs=15, bn="batch_detached", seed=3,
                              progress=False)
        runs[path] = torch.cat([layer.beta.detach() for layer in scop_layers(net).values()])
    assert (runs["fused"] - 0.5).abs().max() > 0.01  # beta did move
    torch.testing.assert_close(runs["fused"], runs["reference"], rtol=0, atol=1e-9)


def test_scale_learner_batch_detached_is_the_same_mode():
    net = _stage2_model("resnet_digits")
    x2, y = _batch("resnet_digits")
    learner = scales.ScaleLearner(copy.deepcopy(net), bn="batch_detached")  # the copy draws the same biases
    grads = torch.autograd.grad(learner.loss(x2[:3], x2[3:], y), learner.parameters())
    _, expected, _ = _run(net, x2, y, batch_detached())
    torch.testing.assert_close(torch.cat(grads), expected, rtol=0, atol=0)


def test_bn_modes_are_checked_by_name():
    with pytest.raises(ValueError, match="bn must be one of 'batch', 'batch_detached', 'frozen', got 'detached'"):
        scales.learn_scales(_stage2_model("resnet_digits"), None, "cpu", bn="detached")
    with pytest.raises(ValueError, match="bn must be one of batch, batch_detached, frozen"):
        PruneConfig(bn="detached").validate()
    PruneConfig(bn="batch_detached").validate()


def test_trains_beta_only():
    net = _stage2_model("resnet_digits")
    x2, y = _batch("resnet_digits")
    next(iter(scop_layers(net).values())).weight.requires_grad_(True)
    with batch_detached():
        loss = F.cross_entropy(net(x2)[:3], y)
    with pytest.raises(RuntimeError, match="bn='batch_detached' trains beta only, but a conv weight"):
        loss.backward()
