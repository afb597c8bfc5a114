"""FLOPs / MACs / parameter counting (scop_ext.prune.flops) against closed forms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import scop_ext
from scop_ext import models
from scop_ext.prune import count_flops, count_macs, count_params, flops_by_module


def conv_flops(n, c_in, c_out, h_out, w_out, k, groups=1):
    """Closed form: 2 FLOPs per multiply-accumulate."""
    return 2 * n * c_out * h_out * w_out * (c_in // groups) * k[0] * k[1]


@pytest.mark.parametrize(
    "c_in,c_out,k,stride,padding,groups,hw",
    [
        (3, 8, (3, 3), 1, 1, 1, (9, 7)),
        (6, 4, (1, 1), 2, 0, 1, (8, 8)),
        (8, 8, (3, 3), 1, 1, 8, (5, 5)),  # depthwise
        (4, 6, (3, 5), 2, (1, 2), 2, (11, 10)),  # grouped, rectangular
    ],
)
def test_conv_flops_closed_form(c_in, c_out, k, stride, padding, groups, hw):
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding, groups=groups, bias=True)
    x = torch.randn(3, c_in, *hw)
    h_out, w_out = conv(x).shape[2:]
    expected = conv_flops(3, c_in, c_out, h_out, w_out, k, groups)
    assert count_flops(conv, x) == expected
    assert count_macs(conv, x) == expected // 2


def test_linear_flops_closed_form():
    assert count_flops(nn.Linear(7, 5), torch.randn(4, 7)) == 2 * 4 * 7 * 5


def test_scop_mode_counts_conv_over_paired_batch():
    conv = scop_ext.ScopConv2d(4, 6, 3, padding=1, stride=2).enable_scop()
    x = torch.randn(2 * 3, 4, 9, 9)  # 3 real images and their 3 knockoffs
    expected = conv_flops(6, 4, 6, 5, 5, (3, 3))
    assert count_flops(conv, x) == expected
    g = torch.Generator().manual_seed(0)
    conv.set_knockoff_bias(torch.randn(6, 6, generator=g), 0.1)  # bias adds are elementwise: 0 FLOPs
    assert count_flops(conv, x) == expected
    conv.disable_scop()
    assert count_flops(conv, x) == expected


def test_scop_model_counts_every_wrapped_conv():
    model = models.resnet_digits()
    x = torch.randn(4, 1, 8, 8)
    plain = count_flops(model, x)
    scop_ext.convert(model, skip=["conv1"])
    assert count_flops(model, x) == plain
    by_module = flops_by_module(model, x)
    assert by_module["layers.0.0.conv1"] == conv_flops(4, 16, 16, 8, 8, (3, 3))


def test_flops_by_module_sums_to_total():
    model = models.resnet20()
    x = torch.randn(1, 3, 32, 32)
    by_module = flops_by_module(model, x)
    assert sum(by_module.values()) == count_flops(model, x)
    layers = dict(model.named_modules())
    assert all(isinstance(layers[name], (nn.Conv2d, nn.Linear)) for name in by_module)
    assert len(by_module) == 19 + 2 + 1
    assert by_module["conv1"] == conv_flops(1, 3, 16, 32, 32, (3, 3))
    assert by_module["layers.2.0.shortcut.0"] == conv_flops(1, 32, 64, 8, 8, (1, 1))
    assert by_module["fc"] == 2 * 64 * 10


def test_counting_leaves_the_model_unchanged():
    model = models.resnet_digits().train()
    model.bn1.eval()  # modes may be mixed (frozen BatchNorm): each is kept
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_flops(model, torch.randn(8, 1, 8, 8))
    assert model.training and model.layers[0][0].bn1.training and not model.bn1.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # BatchNorm statistics untouched


def test_count_params_closed_form():
    conv = nn.Conv2d(3, 8, 3)
    model = nn.Sequential(conv, nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 2))
    assert count_params(model) == (8 * 3 * 9 + 8) + (8 + 8) + (8 * 2 + 2)
    shared = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(8, 8, 1))
    shared.append(shared[0])  # the same conv twice: counted once
    assert count_params(shared) == (8 * 3 * 9 + 8) + (8 * 8 + 8)
