"""Importance criteria and selection policies (scop_ext.prune.importance / select)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

import scop_ext
from scop_ext import models
from scop_ext.prune import BNScaleImportance, L1Importance, L2Importance, PruningSpace, RandomImportance, ScopImportance, apply_plan, count_flops, cuts, fdr, flops_target, following_batchnorm, global_ranking, knockoff_threshold, make_importance, make_policy, policy_names, select, uniform

# ------------------------------------------------------------------------- fixtures / helpers

DIGITS_GROUPS = {  # resnet_digits: coupled convs and group sizes
    ("conv1", "layers.0.0.conv2"): 16,
    ("layers.0.0.conv1",): 16,
    ("layers.1.0.conv2", "layers.1.0.shortcut.0"): 32,
    ("layers.1.0.conv1",): 32,
}


def coupled_scores(seed=0, low_group=None):
    """Random scores, identical for the members of a coupled group (so the mean is known)."""
    g = torch.Generator().manual_seed(seed)
    scores = {}
    for convs, size in DIGITS_GROUPS.items():
        s = torch.randn(size, generator=g)
        if convs == low_group:
            s = s - 100
        for conv in convs:
            scores[conv] = s.clone()
    return scores


def group_of(space, conv):
    return next(i for i, g in enumerate(space.groups) if conv in g.convs)


def kept(plan, conv, size):
    return sorted(set(range(size)) - set(plan.get(conv, [])))


def brute_force_threshold(w, q, offset=1):
    """Definition of the knockoff(+) threshold, searched over t in {|W_j|} \\ {0}."""
    for t in sorted({abs(v) for v in w if v != 0}):
        if (offset + sum(v <= -t for v in w)) / max(1, sum(v >= t for v in w)) <= q:
            return t
    return math.inf


# ----------------------------------------------------------------------- knockoff threshold


def test_knockoff_threshold_hand_example():
    w = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 2.0, 2.5, 3.0, 4.0, 5.0])
    # t=0.5: (1 + #{-3,-1}) / #{0.5..5} = 3/7 = 0.43          -> T = 0.5 at q = 0.5
    # t=1:   3/6 = 0.5;  t=2: (1 + #{-3}) / #{2,2.5,3,4,5} = 2/5 = 0.4 -> T = 2 at q = 0.4
    # t=2.5: 2/4; t=3: 2/3; t=4: 1/2; t=5: 1/1: none <= 0.2      -> T = inf at q = 0.2
    assert knockoff_threshold(w, 0.5) == 0.5
    assert knockoff_threshold(w, 0.4) == 2.0
    assert knockoff_threshold(w, 0.2) == math.inf
    # The original knockoff filter (offset 0): t=2 gives 1/5 = 0.2.
    assert knockoff_threshold(w, 0.2, offset=0) == 2.0
    assert knockoff_threshold(torch.zeros(5), 0.5) == math.inf


def test_knockoff_threshold_matches_definition_on_random_statistics():
    g = torch.Generator().manual_seed(1)
    for trial in range(300):
        p = int(torch.randint(1, 40, (1,), generator=g))
        w = (torch.randn(p, generator=g) + 0.8 * torch.rand(1, generator=g)).mul(4).round().div(4)  # ties and zeros
        q = [0.05, 0.1, 0.2, 0.3, 0.5, 1.0][trial % 6]
        offset = trial % 2
        assert knockoff_threshold(w, q, offset=offset) == brute_force_threshold(w.tolist(), q, offset), (w, q, offset)


def test_knockoff_threshold_arguments():
    with pytest.raises(ValueError, match="q"):
        knockoff_threshold(torch.ones(3), 0.0)
    with pytest.raises(ValueError, match="NaN"):
        knockoff_threshold(torch.tensor([1.0, float("nan")]), 0.1)


# -------------------------------------------------------------------------------- the space


def test_space_groups_and_mean_aggregation(digits_space):
    model, _, space = digits_space
    assert {tuple(sorted(g.convs)): g.size for g in space.groups} == DIGITS_GROUPS
    residual = {tuple(sorted(g.convs)) for g in space.groups if g.residual}
    assert residual == {("conv1", "layers.0.0.conv2"), ("layers.1.0.conv2", "layers.1.0.shortcut.0")}
    a, b = torch.arange(16.0), torch.arange(16.0).flip(0) * 3
    group_scores = space.group_scores({"conv1": a, "layers.0.0.conv2": b, "layers.0.0.conv1": a})
    i = group_of(space, "conv1")
    torch.testing.assert_close(group_scores[i], ((a + b) / 2).double())
    # A member without a score is left out of the mean; a group with none is not scored.
    only_one = space.group_scores({"layers.0.0.conv2": b})
    torch.testing.assert_close(only_one[i], b.double())
    assert only_one[group_of(space, "layers.1.0.conv1")] is None
    with pytest.raises(ValueError, match="expected 16"):
        space.group_scores({"conv1": torch.ones(15)})


def test_space_ignores_layers_and_never_the_classifier(digits_space):
    model, _, _ = digits_space
    space = PruningSpace(model, torch.randn(1, 1, 8, 8), ignored_layers=["layers.1.*"])
    assert {c for g in space.groups for c in g.convs} == {"conv1", "layers.0.0.conv1", "layers.0.0.conv2"}
    kbw = PruningSpace(model, torch.randn(1, 1, 8, 8), block_width="keep")
    assert sorted(c for g in kbw.groups for c in g.convs) == ["layers.0.0.conv1", "layers.1.0.conv1"]
    # scatter: the internal groups as they are, and each residual conv with its own BatchNorm alone
    sc = PruningSpace(model, torch.randn(1, 1, 8, 8), block_width="scatter")
    units = {g.convs: (g.size, g.scatter) for g in sc.groups}
    assert units == {("layers.0.0.conv1",): (16, False), ("layers.1.0.conv1",): (32, False),
                     ("conv1",): (16, True), ("layers.0.0.conv2",): (16, True),
                     ("layers.1.0.conv2",): (32, True), ("layers.1.0.shortcut.0",): (32, True)}
    with pytest.raises(ValueError, match="single string"):
        PruningSpace(model, torch.randn(1, 1, 8, 8), ignored_layers="conv1")


# ------------------------------------------------------------------------------- policies


def test_uniform_removes_lowest_per_group(digits_space):
    _, _, space = digits_space
    scores = coupled_scores()
    plan = uniform(space, scores, 0.4)
    json.dumps(plan)  # plain and serialisable
    assert "fc" not in plan
    for convs, size in DIGITS_GROUPS.items():
        expected = sorted(torch.argsort(scores[convs[0]])[: math.floor(0.4 * size)].tolist())
        for conv in convs:
            assert plan[conv] == expected, conv


def test_uniform_round_to_and_floor(digits_space):
    _, _, space = digits_space
    scores = coupled_scores()
    plan = uniform(space, scores, 0.3, round_to=8)
    # 16 -> keep 16 - 4 = 12 -> rounded up to 16 (untouched); 32 -> keep 32 - 9 = 23 -> 24.
    assert "conv1" not in plan and "layers.0.0.conv1" not in plan
    assert len(plan["layers.1.0.conv1"]) == 8 and len(plan["layers.1.0.conv2"]) == 8
    plan = uniform(space, scores, 1.0, min_channels=3)
    for convs, size in DIGITS_GROUPS.items():
        top3 = sorted(torch.argsort(scores[convs[0]], descending=True)[:3].tolist())
        assert kept(plan, convs[0], size) == top3
    with pytest.raises(ValueError, match="ratio"):
        uniform(space, scores, 1.5)
    with pytest.raises(ValueError, match="round_to"):
        uniform(space, scores, 0.5, round_to=0)


def test_uniform_leaves_unscored_groups_alone(digits_space):
    _, _, space = digits_space
    scores = {"layers.0.0.conv1": torch.randn(16), "layers.1.0.conv1": torch.randn(32)}  # like SCOP skipping some convs
    plan = uniform(space, scores, 0.5)
    assert sorted(plan) == ["layers.0.0.conv1", "layers.1.0.conv1"]
    with pytest.raises(ValueError, match="no conv"):
        uniform(space, {"fc": torch.randn(10)}, 0.5)


def test_global_ranking_normalised(digits_space):
    _, _, space = digits_space
    g = torch.Generator().manual_seed(3)
    scale = {16: 1.0, 32: 50.0}  # raw scales differ by layer: "max" normalisation makes them comparable
    scores = {}
    for convs, size in DIGITS_GROUPS.items():
        s = torch.rand(size, generator=g) * scale[size]
        scores.update({c: s for c in convs})
    plan = global_ranking(space, scores, 0.5)
    everything = []
    for convs, size in DIGITS_GROUPS.items():
        s = scores[convs[0]]
        everything += [(float(v / s.abs().max()), convs[0], k) for k, v in enumerate(s)]
    everything.sort()
    n_remove = math.floor(0.5 * 96)
    for convs, size in DIGITS_GROUPS.items():
        expected = sorted(k for _, c, k in everything[:n_remove] if c == convs[0])
        for conv in convs:
            assert plan.get(conv, []) == expected


def test_global_ranking_raw_scores_respect_floor(digits_space):
    _, _, space = digits_space
    scores = coupled_scores(low_group=("layers.0.0.conv1",))  # one group far below the others
    plan = global_ranking(space, scores, 0.25, normalize=None, min_channels=2)
    # 24 of 96 channels go: the low group gives all but its floor (14), the rest come from elsewhere.
    assert len(plan["layers.0.0.conv1"]) == 14
    assert kept(plan, "layers.0.0.conv1", 16) == sorted(torch.argsort(scores["layers.0.0.conv1"])[-2:].tolist())
    assert sum(len(plan.get(convs[0], [])) for convs in DIGITS_GROUPS) == 24
    rest = [(float(scores[c[0]][k]), c[0], k) for c in DIGITS_GROUPS for k in range(DIGITS_GROUPS[c])]
    rest = sorted(r for r in rest if r[1] != "layers.0.0.conv1")[:10]
    for convs in DIGITS_GROUPS:
        if convs[0] != "layers.0.0.conv1":
            assert plan.get(convs[0], []) == sorted(k for _, c, k in rest if c == convs[0])


def test_fdr_per_layer_and_global(digits_space):
    _, _, space = digits_space
    g = torch.Generator().manual_seed(5)
    scores = {}
    for convs, size in DIGITS_GROUPS.items():
        signal = torch.rand(size // 2, generator=g) * 0.9 + 0.1
        null = torch.rand(size - size // 2, generator=g) * 0.4 - 0.2  # symmetric about 0
        w = torch.cat([signal, null])
        scores.update({c: w for c in convs})
    scores["layers.0.0.conv1"] = -torch.rand(16, generator=g)  # nothing selected here: T = inf
    q = 0.2
    plan = fdr(space, scores, q, min_channels=2)
    for convs, size in DIGITS_GROUPS.items():
        w = scores[convs[0]]
        t = knockoff_threshold(w, q)
        expected = sorted(torch.nonzero(w >= t).flatten().tolist())
        if len(expected) < 2:
            expected = sorted(torch.argsort(w, descending=True)[:2].tolist())
        for conv in convs:
            assert kept(plan, conv, size) == expected, conv
    assert len(kept(plan, "layers.0.0.conv1", 16)) == 2  # the floor
    plan = fdr(space, scores, q, scope="global")
    t = knockoff_threshold(torch.cat([scores[c[0]] for c in DIGITS_GROUPS]), q)
    for convs, size in DIGITS_GROUPS.items():
        expected = torch.nonzero(scores[convs[0]] >= t).flatten().tolist()
        assert kept(plan, convs[0], size) == sorted(expected or [int(scores[convs[0]].argmax())])
    with pytest.raises(ValueError, match="scope"):
        fdr(space, scores, q, scope="block")


def test_cuts_are_where_the_policy_cut(digits_space):
    _, _, space = digits_space
    scores = coupled_scores(seed=4)
    # a global ranking of raw scores is one threshold: every removed score below every kept one
    plan = global_ranking(space, scores, 0.4, normalize=None)
    pairs = cuts(space, scores, plan)
    assert len(pairs) == sum(1 for convs in DIGITS_GROUPS if plan.get(convs[0]))
    assert max(r for r, _ in pairs) < min(k for _, k in pairs)
    # a uniform ratio cuts each group at its own place
    plan = uniform(space, scores, 0.5)
    pairs = cuts(space, scores, plan)
    assert len(pairs) == len(DIGITS_GROUPS)
    for (highest_removed, lowest_kept), convs in zip(pairs, [c for g in space.groups for c in DIGITS_GROUPS if c[0] in g.convs]):
        s = scores[convs[0]]
        assert highest_removed == float(s[plan[convs[0]]].max()) < lowest_kept == float(s[kept(plan, convs[0], s.numel())].min())
    assert max(r for r, _ in pairs) >= min(k for _, k in pairs)


@pytest.mark.parametrize("search", ["uniform", "global_ranking"])
@pytest.mark.parametrize("target", [0.3, 0.55])
def test_flops_target_hits_target(resnet20_space, search, target):
    model, x, space = resnet20_space
    scores = L1Importance()(model)
    plan = flops_target(space, scores, target, search=search)
    assert abs(space.reduction(plan) - target) <= 0.01
    if target == 0.55:  # the real pruned network has exactly the predicted FLOPs
        pruned = apply_plan(copy.deepcopy(model), x, plan)
        assert count_flops(pruned, x) == space.flops(plan)
        assert abs(1 - count_flops(pruned, x) / count_flops(model, x) - target) <= 0.01


def test_flops_target_unreachable(resnet20_space):
    model, _, space = resnet20_space
    with pytest.raises(ValueError, match="out of reach"):
        flops_target(space, L1Importance()(model), 0.9, min_channels=12)


def test_select_dispatch(digits_space):
    _, _, space = digits_space
    scores = coupled_scores()
    assert select(space, scores, "uniform", ratio=0.5) == uniform(space, scores, 0.5)
    assert select(space, scores, "fdr", q=0.3, min_channels=3) == fdr(space, scores, 0.3, min_channels=3)
    with pytest.raises(ValueError, match="unknown policy"):
        select(space, scores, "magic")
    # make_policy binds the same function: select is make_policy(name, **params)(space, scores)
    assert make_policy("flops_target", reduction=0.3)(space, scores) == flops_target(space, scores, 0.3)
    with pytest.raises(ValueError, match="unknown policy 'magic'; expected one of"):
        make_policy("magic")
    assert {"uniform", "global_ranking", "flops_target", "fdr"} <= set(policy_names())


# ---------------------------------------------------------------------- importance criteria


def test_weight_norm_criteria():
    model = models.resnet_digits()
    conv = model.layers[1][0].conv1
    l1, l2 = L1Importance()(model), L2Importance()(model)
    assert set(l1) == {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    for j in (0, 7, 31):
        torch.testing.assert_close(l1["layers.1.0.conv1"][j], conv.weight[j].abs().sum())
        torch.testing.assert_close(l2["layers.1.0.conv1"][j], conv.weight[j].pow(2).sum().sqrt())


def test_bn_scale_and_following_batchnorm():
    model = models.resnet_digits()
    with torch.no_grad():
        model.layers[0][0].bn1.weight.copy_(torch.linspace(-2, 1, 16))
    pairs = following_batchnorm(model)
    assert pairs["layers.0.0.conv1"] == "layers.0.0.bn1"
    assert pairs["layers.1.0.shortcut.0"] == "layers.1.0.shortcut.1"
    assert set(pairs) == {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    scores = BNScaleImportance()(model)
    torch.testing.assert_close(scores["layers.0.0.conv1"], torch.linspace(-2, 1, 16).abs())


def test_scop_importance():
    model = models.resnet_digits()
    scop_ext.convert(model, skip=["conv1", "*.shortcut.0"])
    layers = scop_ext.scop_layers(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in layers.values():
            layer.beta.copy_(torch.rand(layer.out_channels, generator=g))
        model.layers[1][0].bn2.weight.copy_(torch.linspace(0.5, -1, 32))
    scores = ScopImportance()(model)
    assert set(scores) == set(layers) == {f"layers.{s}.0.conv{i}" for s in (0, 1) for i in (1, 2)}
    for name, layer in layers.items():
        torch.testing.assert_close(scores[name], 2 * layer.beta.detach() - 1)
    gamma = ScopImportance(multiply_bn_gamma=True)(model)
    expected = (2 * layers["layers.1.0.conv2"].beta.detach() - 1) * torch.linspace(0.5, -1, 32).abs()
    torch.testing.assert_close(gamma["layers.1.0.conv2"], expected)
    with pytest.raises(ValueError, match="no ScopConv2d"):
        ScopImportance()(models.resnet_digits())


def test_random_importance_and_factory():
    model = models.resnet_digits()
    a, b = RandomImportance(seed=3)(model), make_importance("random", seed=3)(model)
    c = RandomImportance(seed=4)(model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1"], c["conv1"])
    assert isinstance(make_importance("l2"), L2Importance)
    assert make_importance("scop", multiply_bn_gamma=True).multiply_bn_gamma
    with pytest.raises(ValueError, match="unknown importance"):
        make_importance("taylor")


def test_a_space_without_prunable_groups_says_why():
    # Every conv's channels reach the output: its single group is refused, and the policy says so.
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    space = PruningSpace(model, torch.randn(1, 3, 8, 8))
    assert space.groups == [] and space.refused == {"0": "its channels are the model's output"}
    with pytest.raises(ValueError, match=r"no prunable channel group \(1 refused; '0': its channels are the model's output\)"):
        uniform(space, L1Importance()(model), 0.5)
    ignored = PruningSpace(models.resnet_digits().eval(), torch.randn(1, 1, 8, 8), ignored_layers=["*"])
    assert set(ignored.refused.values()) == {"it holds a conv of ignored_layers"}
