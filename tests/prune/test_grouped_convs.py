"""Grouped convolutions (regnet, resnext) prune into valid grouped convs computing the masked
dense network, plans that would break them are refused, and a failing surgery changes nothing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn

from scop_ext import models
from scop_ext.prune import L1Importance, PruningSpace, apply_plan, channel_widths, count_flops, uniform

from tests._helpers import masked_dense


def _grouped_net() -> nn.Module:
    """1x1 conv 3->32, 3x3 conv 32->32 in 4 groups, 1x1 conv 32->16, a classifier."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=4), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()


def _check_exact(model, x, ratio):
    space = PruningSpace(model, x)
    plan = uniform(space, L1Importance()(model), ratio)
    reference = masked_dense(model, x, plan)
    pruned = apply_plan(copy.deepcopy(model), x, plan)
    with torch.no_grad():
        dense, expected, got = model(x), reference(x), pruned(x)
    assert (dense - expected).abs().max() > 1e-2  # the check is sharp: channels really went
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert count_flops(pruned, x) == space.flops(plan) < space.base_flops
    return space, plan, pruned


def test_small_grouped_net_is_exact():
    model, x = _grouped_net(), torch.randn(2, 3, 8, 8)
    space, plan, pruned = _check_exact(model, x, 0.5)
    assert [len(g.units) for g in space.groups] == [0, 8, 8]  # the 1x1s around the grouped conv: 8 units of 4
    grouped = pruned[3]
    assert (grouped.groups, grouped.in_channels, grouped.out_channels) == (4, 16, 16)


@pytest.mark.parametrize("name", ["regnet_x_400mf", "resnext50_32x4d"])
def test_torchvision_grouped_models_are_exact(name):
    torch.manual_seed(0)
    model = models.build_model("torchvision:" + name, 10, 3).eval()
    _, plan, pruned = _check_exact(model, torch.randn(2, 3, 32, 32), 0.5)
    grouped = [(n, m) for n, m in pruned.named_modules() if isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels]
    assert grouped and all(n in plan for n, _ in grouped)  # the grouped convs themselves were pruned


@pytest.mark.parametrize(
    "plan,match",
    [
        ({"0": [0, 1, 2, 3]}, r"plan\['0'\] splits a unit of a grouped conv: channels \[0, 8, 16, 24\]"),
        ({"3": [0]}, r"plan\['3'\] splits a unit"),
    ],
)
def test_plans_that_break_a_grouped_conv_are_refused(plan, match):
    model, x = _grouped_net(), torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match=match):
        apply_plan(model, x, plan)


def test_failing_surgery_leaves_the_model_untouched(monkeypatch):
    model = models.resnet_digits().eval()
    x = torch.randn(1, 1, 8, 8)
    plan = uniform(PruningSpace(model, x), L1Importance()(model), 0.5)
    before, widths = copy.deepcopy(model.state_dict()), channel_widths(model)
    prune, calls = tp.dependency.Group.prune, []

    def fail_on_third(group, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("surgery failed")
        return prune(group, *args, **kwargs)

    monkeypatch.setattr(tp.dependency.Group, "prune", fail_on_third)
    with pytest.raises(RuntimeError, match="surgery failed"):
        apply_plan(model, x, plan)
    assert len(calls) == 3 and channel_widths(model) == widths
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    monkeypatch.undo()
    assert apply_plan(model, x, plan) is model and channel_widths(model) != widths
