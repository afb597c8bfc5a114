"""Physical pruning (scop_ext.prune.surgery): exactness, coupling, FLOPs, export and rebuild."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import scop_ext
from scop_ext import models
from scop_ext.prune import L1Importance, PruningSpace, ScopImportance, apply_plan, channel_groups, channel_widths, count_flops, fdr, flops_target, global_ranking, rebuild, uniform

RESIDUAL_CONVS_20 = {"conv1"} | {f"layers.{s}.{b}.conv2" for s in range(3) for b in range(3)} | {
    "layers.1.0.shortcut.0",
    "layers.2.0.shortcut.0",
}


def scop_like_scores(model, seed=0):
    """SCOP statistics 2 beta - 1 for every conv, with beta uniform in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    return {n: 2 * torch.rand(m.out_channels, generator=g) - 1 for n, m in convs.items()}


def check_pruned(model, pruned, x, plan, space):
    """The pruned network runs, has the planned widths and exactly the predicted FLOPs."""
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape
    before, after = channel_widths(model), channel_widths(pruned)
    for conv, width in before.items():
        assert after[conv] == width - len(plan.get(conv, [])), conv
    flops = count_flops(pruned, x)
    assert flops == space.flops(plan)
    assert (flops < count_flops(model, x)) == bool(plan)
    return flops


@pytest.mark.parametrize(
    "policy",
    [
        lambda s, sc: uniform(s, sc, 0.5),
        lambda s, sc: global_ranking(s, sc, 0.4, normalize=None),
        lambda s, sc: flops_target(s, sc, 0.45),
        lambda s, sc: fdr(s, sc, 0.3, min_channels=4),
    ],
    ids=["uniform", "global_ranking", "flops_target", "fdr"],
)
def test_resnet20_every_policy(resnet20_space, policy):
    model, x, space = resnet20_space
    plan = policy(space, scop_like_scores(model))
    assert plan and "fc" not in plan
    pruned = apply_plan(copy.deepcopy(model), x, plan)
    check_pruned(model, pruned, x, plan, space)
    for group in space.groups:  # coupled convs lose the same channels
        assert len({tuple(plan.get(c, [])) for c in group.convs}) == 1


def _integer_network():
    """resnet_digits in float64 with small integer weights and BatchNorm (eps = 0, var = 1) that
    maps integers to integers: every sum is exact, so the result cannot depend on summation order."""
    torch.manual_seed(0)
    model = models.resnet_digits().double().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.randint(-1, 2, m.weight.shape))
                if m.bias is not None:
                    m.bias.copy_(torch.randint(-2, 3, m.bias.shape))
            elif isinstance(m, nn.BatchNorm2d):
                m.eps = 0.0
                m.running_var.fill_(1.0)
                m.running_mean.copy_(torch.randint(-2, 3, m.running_mean.shape))
                m.weight.copy_(torch.randint(1, 3, m.weight.shape))
                m.bias.copy_(torch.randint(-1, 3, m.bias.shape))
    return model


def _silence(model, conv, bn, channels):
    """Zero the filters and the BatchNorm entries: those channels output exactly 0 after ReLU."""
    with torch.no_grad():
        model.get_submodule(conv).weight[channels] = 0
        for name in ("weight", "bias"):
            getattr(model.get_submodule(bn), name)[channels] = 0


def test_removing_silent_channels_is_exact():
    model = _integer_network()
    x = torch.randint(0, 2, (4, 1, 8, 8)).double()
    plan = {
        "conv1": [2, 9],  # the stage-1 residual group: stem and block output together
        "layers.0.0.conv2": [2, 9],
        "layers.0.0.conv1": [0, 5, 6, 15],
        "layers.1.0.conv1": [1, 30],
        "layers.1.0.conv2": [3, 4, 31],  # the stage-2 residual group: block output and projection
        "layers.1.0.shortcut.0": [3, 4, 31],
    }
    bns = {"conv1": "bn1", "layers.1.0.shortcut.0": "layers.1.0.shortcut.1"}
    for conv, channels in plan.items():
        _silence(model, conv, bns.get(conv, conv.replace("conv", "bn")), channels)
    with torch.no_grad():
        reference = model(x)
        assert reference.abs().max() > 1e3  # far from trivially zero; still exact in float64
        pruned = apply_plan(copy.deepcopy(model), x, plan)
        assert torch.equal(pruned(x), reference)
        # The check is sharp: removing a channel that is not silent changes the output.
        noisy = apply_plan(copy.deepcopy(model), x, {**plan, "layers.0.0.conv1": [0, 1, 5, 6, 15]})
        assert not torch.equal(noisy(x), reference)


def test_block_width_keep(resnet20_space):
    model, x, space = resnet20_space
    plan = uniform(space, scop_like_scores(model), 0.5)
    pruned = apply_plan(copy.deepcopy(model), x, plan, block_width="keep")
    before, after = channel_widths(model), channel_widths(pruned)
    for conv in before:
        if conv in RESIDUAL_CONVS_20:
            assert after[conv] == before[conv], conv
        else:
            assert after[conv] == before[conv] // 2, conv
    # A space built the same way plans only what will be pruned, and predicts its FLOPs.
    kbw = PruningSpace(model, x, block_width="keep")
    assert {c for g in kbw.groups for c in g.convs} == set(before) - RESIDUAL_CONVS_20
    plan = uniform(kbw, scop_like_scores(model), 0.5)
    assert count_flops(apply_plan(copy.deepcopy(model), x, plan, block_width="keep"), x) == kbw.flops(plan)


_LOAD_WITHOUT_SCOP_EXT = """
import sys
sys.modules["scop_ext"] = None  # any import of scop_ext now fails
import torch
x = torch.load(sys.argv[3])
exported = torch.export.load(sys.argv[1]).module()
assert torch.equal(exported(x), torch.load(sys.argv[2])), "exported output differs"
whole = torch.load(sys.argv[4], weights_only=False)
assert torch.equal(whole.eval()(x), torch.load(sys.argv[5])), "unpickled output differs"
print("ok")
"""


def test_scop_model_prunes_to_plain_torch(tmp_path):
    model = models.resnet20().eval()
    scop_ext.convert(model, skip=["conv1", "*.shortcut.0"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in scop_ext.scop_layers(model).values():
            layer.beta.copy_(torch.rand(layer.out_channels, generator=g))
    x = torch.randn(2, 3, 32, 32)
    space = PruningSpace(model, x)  # SCOP mode is on; tracing uses a plain batch
    plan = uniform(space, ScopImportance()(model), 0.5)
    # The stem is not wrapped (no score) but is coupled to wrapped block outputs: it follows them.
    assert plan["conv1"] == plan["layers.0.0.conv2"] == plan["layers.0.2.conv2"]
    pruned = apply_plan(model, x, plan)
    convs = [m for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 21 and all(type(m) is nn.Conv2d for m in convs)
    assert not any("beta" in k or "knockoff" in k for k in pruned.state_dict())
    assert count_flops(pruned, x) == space.flops(plan)
    # Our own model exported with torch.export, and a pickled torchvision model, load without scop_ext.
    tv = models.build_model("torchvision:resnet18", 10, 3).eval()
    scop_ext.convert(tv)
    tv_plan = uniform(PruningSpace(tv, x), L1Importance()(tv), 0.25)
    apply_plan(tv, x, tv_plan)
    with torch.no_grad():
        torch.export.save(torch.export.export(pruned, (x,)), tmp_path / "m.pt2")
        torch.save(pruned(x), tmp_path / "y.pt")
        torch.save(x, tmp_path / "x.pt")
        torch.save(tv, tmp_path / "tv.pt")
        torch.save(tv(x), tmp_path / "tv_y.pt")
    names = ["m.pt2", "y.pt", "x.pt", "tv.pt", "tv_y.pt"]
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_SCOP_EXT, *[str(tmp_path / n) for n in names]],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.parametrize("name", ["torchvision:resnet18", "torchvision:mobilenet_v2"])
def test_torchvision_models_prune_and_run(name):
    torch.manual_seed(0)
    model = models.build_model(name, 10, 3).eval()
    x = torch.randn(1, 3, 32, 32)
    space = PruningSpace(model, x)
    plan = uniform(space, L1Importance()(model), 0.3, round_to=8)
    pruned = apply_plan(copy.deepcopy(model), x, plan)
    check_pruned(model, pruned, x, plan, space)
    for conv_name, m in pruned.named_modules():
        if isinstance(m, nn.Conv2d) and conv_name in plan:
            assert m.out_channels % 8 == 0, conv_name
        if isinstance(m, nn.Conv2d) and m.groups > 1:  # depthwise convs follow their input
            assert m.groups == m.in_channels == m.out_channels
    assert pruned.get_submodule("fc" if name.endswith("resnet18") else "classifier.1").out_features == 10


@pytest.mark.parametrize("name,ratio", [("resnet20", 0.5), ("torchvision:mobilenet_v2", 0.4)])
def test_rebuild_from_widths_and_safetensors(tmp_path, name, ratio):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = models.build_model(name, 10, 3).eval()
    x = torch.randn(2, 3, 32, 32)
    plan = uniform(PruningSpace(model, x), scop_like_scores(model, seed=1), ratio)
    pruned = apply_plan(model, x, plan)
    with torch.no_grad():  # give the BatchNorm statistics non-default values
        for m in pruned.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    (tmp_path / "widths.json").write_text(json.dumps(channel_widths(pruned)))
    save_file(pruned.state_dict(), str(tmp_path / "w.safetensors"))
    copy_ = rebuild(name, json.loads((tmp_path / "widths.json").read_text()), 10, 3)
    copy_.load_state_dict(load_file(str(tmp_path / "w.safetensors")))
    copy_.eval()
    with torch.no_grad():
        assert torch.equal(copy_(x), pruned(x))


def test_rebuild_errors():
    widths = channel_widths(models.resnet_digits())
    with pytest.raises(ValueError, match="missing"):
        rebuild("resnet_digits", {k: v for k, v in widths.items() if k != "conv1"}, 10, 1)
    with pytest.raises(ValueError, match="one width"):
        rebuild("resnet_digits", {**widths, "conv1": 8}, 10, 1)  # its coupled block output stays 16
    with pytest.raises(ValueError, match="1..32"):
        rebuild("resnet_digits", {**widths, "layers.1.0.conv1": 40}, 10, 1)


def test_modes_are_kept():
    model = models.resnet_digits().train()
    model.layers[0][0].bn1.eval()
    x = torch.randn(2, 1, 8, 8)
    space = PruningSpace(model, x)
    pruned = apply_plan(model, x, uniform(space, L1Importance()(model), 0.5))
    modes = {name: m.training for name, m in pruned.named_modules()}
    assert not modes.pop("layers.0.0.bn1") and all(modes.values())


def test_apply_plan_errors():
    model = models.resnet_digits().eval()
    x = torch.randn(1, 1, 8, 8)
    with pytest.raises(ValueError, match="not prunable"):
        apply_plan(copy.deepcopy(model), x, {"fc": [0]})
    with pytest.raises(ValueError, match="removed together"):
        apply_plan(copy.deepcopy(model), x, {"conv1": [0], "layers.0.0.conv2": [1]})
    with pytest.raises(ValueError, match="missing"):
        apply_plan(copy.deepcopy(model), x, {"conv1": [0]})
    with pytest.raises(ValueError, match="distinct channel indices"):
        apply_plan(copy.deepcopy(model), x, {"layers.0.0.conv1": [3, 16]})
    with pytest.raises(ValueError, match="at least one must stay"):
        apply_plan(copy.deepcopy(model), x, {"layers.0.0.conv1": list(range(16))})
    # A rejected plan leaves the model as it was, SCOP layers included.
    scop_ext.convert(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError):
        apply_plan(model, x, {"layers.0.0.conv1": [0], "layers.1.0.conv1": [32]})
    assert len(scop_ext.scop_layers(model)) == 6
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_channel_groups_of_mobilenet_couple_depthwise():
    model = models.build_model("torchvision:mobilenet_v2", 10, 3).eval()
    groups = {g.convs[0]: g for g in channel_groups(model, torch.randn(1, 3, 32, 32))}
    expand = next(g for g in groups.values() if "features.2.conv.0.0" in g.convs)
    assert set(expand.convs) == {"features.2.conv.0.0", "features.2.conv.1.0"} and not expand.residual
    project = next(g for g in groups.values() if "features.2.conv.2" in g.convs)
    assert set(project.convs) == {"features.2.conv.2", "features.3.conv.2"} and project.residual
    assert not any("classifier" in c for g in groups.values() for c in g.convs)
