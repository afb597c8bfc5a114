"""ScopConv2d as a drop-in nn.Conv2d, its SCOP mode, and convert/restore over module trees."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import scop_ext
from scop_ext import ScopConv2d, convert, restore, scop_layers
from scop_ext.ops import reference

CONFIGS = [
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=8, kernel_size=3, stride=2, padding=1, bias=False),
    dict(in_channels=4, out_channels=4, kernel_size=3, padding=2, dilation=2, groups=4),
    dict(in_channels=4, out_channels=6, kernel_size=4, padding="same"),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding="valid"),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="circular"),
]


def _pair(cfg, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(**cfg)
    scop = ScopConv2d(**cfg)
    scop.load_state_dict(conv.state_dict())
    return conv, scop


@pytest.mark.parametrize("cfg", CONFIGS)
def test_plain_mode_is_bitwise_nn_conv2d(cfg):
    conv, scop = _pair(cfg)
    assert list(scop.state_dict()) == list(conv.state_dict())
    x = torch.randn(3, 4, 11, 10)
    assert torch.equal(scop(x), conv(x))


@pytest.mark.parametrize("cfg", CONFIGS)
def test_scop_mode_matches_reference(cfg):
    conv, scop = _pair(cfg)
    scop.enable_scop()
    with torch.no_grad():
        scop.beta.copy_(torch.rand(scop.out_channels))
    x = torch.randn(4, 4, 11, 10)
    # nn.Conv2d's own padding handling, then the reference mixing on a padding-free conv.
    padded = x
    padding = conv.padding
    if isinstance(padding, str) or conv.padding_mode != "zeros":
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        padded = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode) if padding != "valid" else x
        padding = 0
    want = reference.dual_scaled_conv2d(
        padded, conv.weight, conv.bias, scop.beta, None, conv.stride, padding, conv.dilation, conv.groups
    )
    torch.testing.assert_close(scop(x), want)
    # with beta = 1 the real half is exactly the plain conv of the real images
    with torch.no_grad():
        scop.beta.fill_(1.0)
    torch.testing.assert_close(scop(x)[:2], conv(x[:2]))
    torch.testing.assert_close(scop(x)[2:], conv(x[2:]))


def test_knockoff_bias_is_drawn_from_the_generator():
    torch.manual_seed(0)
    layer = ScopConv2d(3, 5, 3, padding=1).enable_scop()
    solution = layer.fit_knockoff_bias(torch.rand(3) + 0.1, gamma=0.01)
    assert solution.margin > 0
    x = torch.randn(4, 3, 6, 6)
    layer.generator = torch.Generator().manual_seed(42)
    out = layer(x)
    seed = scop_ext.draw_seed(torch.Generator().manual_seed(42))
    knockoff_bias = scop_ext.lemma2_sample(layer.knockoff_R, float(layer.knockoff_gamma), 2, seed=seed)
    want = reference.dual_scaled_conv2d(x, layer.weight, layer.bias, layer.beta, knockoff_bias, 1, 1)
    torch.testing.assert_close(out, want)
    layer.use_knockoff_bias = False
    torch.testing.assert_close(layer(x), reference.dual_scaled_conv2d(x, layer.weight, layer.bias, layer.beta, None, 1, 1))
    assert "knockoff_bias=off" in repr(layer) and "scop=on" in repr(layer)


def test_scop_mode_under_autocast_runs_like_nn_conv2d():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    layer = ScopConv2d.from_conv(conv).enable_scop(beta_init=1.0)
    x = torch.randn(4, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, plain = layer(x), conv(x)
    assert out.dtype == plain.dtype == torch.bfloat16
    # beta = 1 and no knockoff bias: each half is the plain conv of its images
    torch.testing.assert_close(out[:2], plain[:2], atol=0.02, rtol=0.02)
    torch.testing.assert_close(out[2:], plain[2:], atol=0.02, rtol=0.02)
    layer.fit_knockoff_bias(torch.rand(3) + 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().square().sum().backward()
    assert layer.beta.grad.dtype == torch.float32 and bool(torch.isfinite(layer.beta.grad).all())


def test_beta_gets_gradient_and_frozen_weight_does_not():
    layer = ScopConv2d(3, 5, 3, padding=1).enable_scop()
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    layer(torch.randn(4, 3, 6, 6)).sum().backward()
    assert layer.weight.grad is None and layer.beta.grad is not None and layer.beta.grad.shape == (5,)


def test_importance_and_clamp():
    layer = ScopConv2d(3, 4, 1).enable_scop(beta_init=0.25)
    torch.testing.assert_close(layer.importance(), torch.full((4,), -0.5))
    with torch.no_grad():
        layer.beta.copy_(torch.tensor([-0.5, 0.2, 1.7, 0.9]))
    layer.clamp_beta_()
    torch.testing.assert_close(layer.beta.detach(), torch.tensor([0.0, 0.2, 1.0, 0.9]))
    with pytest.raises(RuntimeError, match="needs beta"):
        ScopConv2d(3, 4, 1).importance()
    with pytest.raises(ValueError, match="beta_init must be in"):
        ScopConv2d(3, 4, 1).enable_scop(beta_init=2.0)


def test_odd_batch_in_scop_mode_is_rejected():
    layer = ScopConv2d(3, 4, 3).enable_scop()
    with pytest.raises(ValueError, match="input batch must be 2N"):
        layer(torch.randn(3, 3, 5, 5))
    layer.fit_knockoff_bias(torch.ones(3))
    with pytest.raises(ValueError, match="paired batch"):
        layer(torch.randn(3, 3, 5, 5))


def test_state_dict_round_trip_materialises_scop_state():
    layer = ScopConv2d(3, 4, 3).enable_scop()
    layer.fit_knockoff_bias(torch.ones(3), gamma=0.2)
    with torch.no_grad():
        layer.beta.uniform_()
    state = layer.state_dict()
    assert set(state) == {"weight", "bias", "beta", "knockoff.R", "knockoff.gamma"}
    fresh = ScopConv2d(3, 4, 3)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.beta, layer.beta) and torch.equal(fresh.knockoff_R, layer.knockoff_R)
    assert float(fresh.knockoff_gamma) == pytest.approx(0.2)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def test_convert_and_restore():
    torch.manual_seed(0)
    net = _Net()
    dense = copy.deepcopy(net)
    weight = net.body[0].weight
    convert(net, skip=["stem"])
    layers = scop_layers(net)
    assert list(layers) == ["body.0", "body.3"] and type(net.stem) is nn.Conv2d
    assert layers["body.0"].weight is weight  # shared, not copied
    x = torch.randn(4, 1, 8, 8)
    net.eval(), dense.eval()
    with torch.no_grad():
        for layer in layers.values():
            layer.beta.fill_(1.0)
        torch.testing.assert_close(net(x)[:2], dense(x[:2]))
    restore(net)
    assert not scop_layers(net) and type(net.body[0]) is nn.Conv2d and net.body[0].weight is weight
    assert list(net.state_dict()) == list(dense.state_dict())
    convert(net, skip=lambda name, m: m.in_channels == 1, enable=False)
    assert list(scop_layers(net)) == ["body.0", "body.3"] and not net.body[0].scop_enabled
    convert(restore(net), skip=["body.*"])
    assert list(scop_layers(net)) == ["stem"]
    with pytest.raises(ValueError, match="skip must be a list"):
        convert(net, skip="stem")


def test_convert_and_restore_a_bare_conv_return_the_new_layer():
    conv = nn.Conv2d(3, 4, 3)
    layer = convert(conv)
    assert type(layer) is ScopConv2d and layer.scop_enabled and layer.weight is conv.weight
    # the only child is the layer's own knockoff-bias state
    assert not list(conv.children()) and [type(m).__name__ for m in layer.children()] == ["KnockoffBias"]
    plain = restore(layer)
    assert type(plain) is nn.Conv2d and plain.weight is conv.weight and not list(plain.children())
    assert convert(conv, skip=lambda name, m: True) is conv


def test_shared_conv_stays_one_shared_layer():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    net = nn.Sequential(nn.Conv2d(4, 4, 1), conv, nn.ReLU(), conv)
    convert(net)
    assert type(net[1]) is ScopConv2d and net[3] is net[1] and net[1].weight is conv.weight
    assert list(scop_layers(net)) == ["0", "1"]
    restore(net)
    assert type(net[1]) is nn.Conv2d and net[3] is net[1] and net[1].weight is conv.weight
    with pytest.raises(ValueError, match=r"skip names \['3'\] but not \['1'\]"):
        convert(net, skip=["3"])
    assert type(net[0]) is nn.Conv2d  # nothing converted before the error


def test_clear_knockoff_bias_forgets_gamma():
    layer = ScopConv2d(3, 4, 3).enable_scop()
    layer.fit_knockoff_bias(torch.ones(3), gamma=0.2)
    layer.clear_knockoff_bias()
    assert layer.knockoff_R is None and layer.knockoff_gamma is None and layer.knockoff._gamma == 0.0
    assert "knockoff_bias" not in repr(layer)


def test_repr_shows_the_mode():
    layer = ScopConv2d(3, 4, 3)
    assert "scop=off" in repr(layer)
    assert "scop=on" in repr(layer.enable_scop()) and "beta=(4,)" in repr(layer)


def test_checkpoint_of_converted_model_reloads():
    net = convert(_Net())
    with torch.no_grad():
        for layer in scop_layers(net).values():
            layer.beta.uniform_()
    state = net.state_dict()
    again = convert(_Net(), enable=False)
    again.load_state_dict(state)
    for name, layer in scop_layers(again).items():
        assert torch.equal(layer.beta, scop_layers(net)[name].beta)
