"""The operators under torch.compile(fullgraph=True) and torch.export."""

import pytest
import torch
from torch import nn

from scop_ext import ScopConv2d, convert, scop_layers
from tests._helpers import scop_ready


def _model(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),
    )
    convert(net)
    for layer in scop_layers(net).values():
        layer.weight.requires_grad_(False)
        with torch.no_grad():
            layer.beta.uniform_()
        layer.fit_knockoff_bias(torch.rand(layer.in_channels) + 0.1)
    return net


def _run(net, x):
    out = net(x)
    out[: x.shape[0] // 2].square().mean().backward()
    return out.detach(), [layer.beta.grad.clone() for layer in scop_layers(net).values()]


def test_compiled_model_matches_eager():
    x = torch.randn(8, 3, 10, 10)
    eager, compiled_net = _model(), _model()
    compiled = torch.compile(compiled_net, fullgraph=True)
    # Inductor has its own RNG; fallback_random makes the compiled graph draw the bias keys
    # from torch's generator exactly as eager does, so outputs are comparable.
    with torch._inductor.config.patch(fallback_random=True):
        torch.manual_seed(123)
        out_c, grads_c = _run(compiled, x)
    torch.manual_seed(123)
    out_e, grads_e = _run(eager, x)
    torch.testing.assert_close(out_c, out_e, atol=1e-4, rtol=1e-4)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, atol=1e-4, rtol=1e-4)


def test_compiled_model_hands_inductor_the_mixing_as_plain_ops():
    # An opaque custom op would keep inductor from fusing the mixing with BN and ReLU (and the
    # Lemma 2 draw would be an extern call per layer).
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    torch.compile(_model(), backend=backend, fullgraph=True)(torch.randn(8, 3, 10, 10))
    assert any("conv2d" in t for t in seen)
    assert not any("scop." in t for t in seen)


def test_export_round_trip():
    net = _model().eval()
    for layer in scop_layers(net).values():
        layer.use_knockoff_bias = False  # deterministic program
    x = torch.randn(4, 3, 10, 10)
    program = torch.export.export(net, (x,))
    assert any("scop.dual_scaled_conv2d" in str(node.target) for node in program.graph.nodes)
    torch.testing.assert_close(program.module()(x), net(x))


def test_compiled_plain_mode_layer():
    layer = ScopConv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x))


def test_compiled_model_under_autocast_matches_eager():
    net = _model().eval()
    for layer in scop_layers(net).values():
        layer.use_knockoff_bias = False  # deterministic program
    x = torch.randn(4, 3, 10, 10)

    def run(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return net(x)

    eager = run(x)
    compiled = torch.compile(run, fullgraph=True)(x)
    assert compiled.dtype == eager.dtype == torch.bfloat16
    torch.testing.assert_close(compiled, eager, atol=0.02, rtol=0.02)


def test_compiled_lemma2_draw_matches_the_kernel(device):
    # What ScopConv2d draws under torch.compile: the Philox stream in plain ops, keyed on a seed
    # tensor (inductor's C++ on the CPU, Triton on CUDA); float64, the kernel's numbers to 1e-12
    # (libm, libdevice and inductor's vector math may differ in the last ulp).
    from scop_ext import lemma2_sample
    from scop_ext.ops import reference

    R = torch.randn(6, 6, dtype=torch.float64).to(device)
    seed = torch.tensor([-(2**40) + 12345], dtype=torch.int64)
    draw = torch.compile(reference.lemma2_sample, fullgraph=True)
    torch.testing.assert_close(draw(R, 0.3, 5, seed), lemma2_sample(R, 0.3, 5, seed=seed), rtol=0, atol=1e-12)


def _classifier(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    ).double()
    return scop_ready(net, mean=0.2)


@pytest.mark.parametrize("bn", ["batch", "frozen"])
def test_compiled_learn_scales_matches_eager(bn):
    """learn_scales(compile=True) learns eager's beta (float64, to 1e-9 after 24 steps): the same
    Lemma 2 draws, keyed from each layer's generator ahead of the step, and one graph (no
    recompiles: the keys are copied into the same tensor each step)."""
    from torch.utils.data import DataLoader, TensorDataset

    from scop_ext.scales import learn_scales

    g = torch.Generator().manual_seed(1)
    x, xk = torch.randn(2, 48, 3, 8, 8, generator=g, dtype=torch.float64)
    pairs = DataLoader(TensorDataset(x, xk, torch.randint(0, 3, (48,), generator=g)), batch_size=8)
    eager, compiled = _classifier(), _classifier()
    learn_scales(eager, pairs, "cpu", epochs=4, lr=0.05, bn=bn, seed=3, progress=False)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        learn_scales(compiled, pairs, "cpu", epochs=4, lr=0.05, bn=bn, seed=3, progress=False, compile=True)
    for (name, a), b in zip(scop_layers(eager).items(), scop_layers(compiled).values()):
        assert not torch.equal(a.beta, torch.ones_like(a.beta)), "beta did not train"
        torch.testing.assert_close(b.beta, a.beta, rtol=0, atol=1e-9, msg=name)
        assert torch.equal(a.generator.get_state(), b.generator.get_state())
        assert b.knockoff.key_ahead is None


def test_compiled_learn_scales_refuses_batch_detached():
    from torch.utils.data import DataLoader, TensorDataset

    from scop_ext.scales import learn_scales

    pairs = DataLoader(TensorDataset(torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)))
    with pytest.raises(ValueError, match="compile=True runs with bn 'batch' or 'frozen'"):
        learn_scales(_classifier(), pairs, "cpu", epochs=1, bn="batch_detached", progress=False, compile=True)


class _SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 3, 3, padding=1), nn.Linear(3, 3)

    def forward(self, x):
        return self.head(self.conv(torch.relu(self.conv(x))).mean((2, 3)))


def test_compiled_learn_scales_refuses_a_layer_run_twice():
    """A shared ScopConv2d draws twice per step in eager; compiled, with one key per layer and
    step, it would reuse the first draw, so it is an error instead of different numbers."""
    from torch.utils.data import DataLoader, TensorDataset

    from scop_ext.scales import learn_scales

    torch.manual_seed(0)
    net = scop_ready(_SharedConv().double())
    x = torch.randn(2, 8, 3, 8, 8, dtype=torch.float64)
    pairs = DataLoader(TensorDataset(x[0], x[1], torch.zeros(8, dtype=torch.long)), batch_size=4)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="ran twice in one compiled stage-2 forward"):
        learn_scales(net, pairs, "cpu", epochs=1, bn="batch", progress=False, compile=True)
