"""SCOP inside other people's code: Torch-Pruning's MetaPruner pruning by SCOP's scores, and
stage 2 as a piece of the user's own training loop."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn

from scop_ext import models, restore, scop_layers
from scop_ext.prune import PruningSpace, ScopImportance, TorchPruningImportance, apply_plan, uniform
from scop_ext.scales import ScaleLearner


def _scored_resnet20(seed: int = 0) -> nn.Module:
    """resnet20 after a stand-in for stage 2: every conv's beta uniform in [0, 1]."""
    torch.manual_seed(seed)
    model = models.resnet20().eval()
    learner = ScaleLearner(model)
    with torch.no_grad():
        for beta in learner.parameters():
            beta.uniform_(0.0, 1.0)
    learner.finish()
    return model


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_metapruner_with_scop_importance_removes_what_uniform_removes(ratio):
    model = _scored_resnet20()
    x = torch.randn(1, 3, 32, 32)
    scores = ScopImportance()(model)
    ours = apply_plan(copy.deepcopy(model), x, uniform(PruningSpace(model, x), scores, ratio))

    theirs = restore(copy.deepcopy(model))
    pruner = tp.pruner.MetaPruner(theirs, x, importance=TorchPruningImportance(theirs, scores),
                                  pruning_ratio=ratio, ignored_layers=[theirs.fc], root_module_types=[nn.Conv2d])
    pruner.step()
    # The same channels went: every weight and BatchNorm statistic is the same tensor.
    mine, other = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == other.keys()
    assert all(mine[k].shape == other[k].shape and torch.equal(mine[k], other[k]) for k in mine)
    assert theirs.layers[0][0].conv1.out_channels == 16 - int(16 * ratio)


def test_group_without_scores_is_skipped():
    model = models.resnet_digits().eval()
    x = torch.randn(1, 1, 8, 8)
    importance = TorchPruningImportance(model, {"layers.0.0.conv1": torch.arange(16.0)})
    graph = tp.DependencyGraph().build_dependency(model, x)
    scored = graph.get_pruning_group(model.layers[0][0].conv1, tp.prune_conv_out_channels, list(range(16)))
    unscored = graph.get_pruning_group(model.layers[1][0].conv1, tp.prune_conv_out_channels, list(range(32)))
    assert torch.equal(importance(scored), torch.arange(16.0)) and importance(unscored) is None


def test_scale_learner_in_a_hand_written_loop():
    torch.manual_seed(0)
    model = models.resnet_digits().eval()
    bn_before = copy.deepcopy(model.layers[0][0].bn1.state_dict())
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    learner = ScaleLearner(model)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    xk = torch.randn_like(x)
    with pytest.raises(RuntimeError, match="Lemma 2 knockoff biases are not fitted; call learner.fit_knockoff_biases"):
        learner.loss(x, xk, y)
    report = learner.fit_knockoff_biases([(x, xk, y)])
    assert set(report) == set(scop_layers(model)) and all(r["margin"] > -1e-9 for r in report.values())
    assert all(layer.knockoff.fitted and layer.use_knockoff_bias for layer in scop_layers(model).values())
    optimizer = torch.optim.Adam(learner.parameters(), lr=0.05, betas=(0.5, 0.9))
    losses = []
    for _ in range(30):
        loss = learner.loss(x, xk, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        learner.clamp_()
        losses.append(loss.item())
    scores = learner.finish()
    assert set(scores) == set(scop_layers(model)) and len(learner.parameters()) == 6
    assert all(bool(((s >= -1) & (s <= 1)).all()) for s in scores.values())
    # each step draws new bias noise, so the loss falls on average, not at every step
    assert any(bool((s != 0).any()) for s in scores.values()) and sum(losses[-5:]) < sum(losses[:5])
    # Only beta moved: the weights and the BatchNorm statistics are as they were.
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())
    assert all(torch.equal(model.layers[0][0].bn1.state_dict()[k], v) for k, v in bn_before.items())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.endswith("beta"))
    with pytest.raises(ValueError, match="x_knockoff must have x's shape"):
        learner.loss(x, x[:8], y)
