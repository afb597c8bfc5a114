"""block_width="scatter", the authors' scheme: block-final convs lose filters, their BatchNorm
output is written back to full width (ChannelScatter); exactness against the masked dense net,
FLOPs, saving without pickle, export."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from scop_ext import ChannelScatter, models
from scop_ext.export import export_onnx, export_torchscript, load_model, save_model
from scop_ext.prune import PruningSpace, apply_plan, channel_widths, count_flops, rebuild, uniform
from scop_ext.prune.importance import following_batchnorm
from scop_ext.prune.surgery import scattered_convs


@pytest.fixture(scope="module")
def resnet20_stats():
    """resnet20 in eval mode with non-trivial BatchNorm statistics and affine parameters."""
    torch.manual_seed(0)
    model = models.resnet20()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def random_scores(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(m.out_channels, generator=g) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def masked(model, plan):
    """The dense model with every removed filter's BatchNorm output zeroed (the authors'
    Masked_Conv2d_bn): what a pruned network must compute."""
    dense = copy.deepcopy(model)
    modules = dict(dense.named_modules())
    for conv, bn in following_batchnorm(dense).items():
        if plan.get(conv):
            mask = torch.ones(modules[conv].out_channels)
            mask[plan[conv]] = 0
            modules[bn].register_forward_hook(lambda m, i, out, mask=mask: out * mask[None, :, None, None])
    return dense


def test_scatter_prunes_block_final_convs_and_equals_the_masked_dense_net(resnet20_stats):
    model = resnet20_stats
    x = torch.randn(4, 3, 32, 32)
    space = PruningSpace(model, x[:1], block_width="scatter", ignored_layers=["conv1", "*.shortcut.0"])
    plan = uniform(space, random_scores(model), 0.5)
    pruned = apply_plan(copy.deepcopy(model), x[:1], plan, block_width="scatter")
    finals = [f"layers.{s}.{b}.conv2" for s in range(3) for b in range(3)]
    assert scattered_convs(pruned) == sorted(finals)
    widths = channel_widths(pruned)
    for conv, width in channel_widths(model).items():
        assert widths[conv] == width - len(plan.get(conv, [])), conv
        assert (conv in plan) == (conv.endswith(("conv1", "conv2")) and conv != "conv1"), conv
    with torch.no_grad():
        out, reference = pruned(x), masked(model, plan)(x)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    # The check is sharp: the dense net differs from its masked self.
    assert not torch.allclose(model(x), reference, atol=1e-3)
    # The scatter costs no FLOPs: the counter and the prediction agree, and the residual stays full.
    assert count_flops(pruned, x[:1]) == space.flops(plan) < count_flops(model, x[:1])
    scatter = pruned.get_submodule("layers.1.0.bn2")
    assert isinstance(scatter, ChannelScatter) and scatter.channels == 32 and scatter.index.numel() == 16


def test_scatter_plans_of_other_modes_and_refusals(resnet20_stats):
    model = resnet20_stats
    x = torch.randn(1, 3, 32, 32)
    space = PruningSpace(model, x, block_width="scatter")
    assert all(g.scatter == (len(g.convs) == 1 and g.residual) for g in space.groups)
    assert {g.convs[0] for g in space.groups if g.scatter} >= {"conv1", "layers.1.0.shortcut.0"}
    with pytest.raises(ValueError, match="block_width must be one of prune, keep, scatter"):
        PruningSpace(model, x, block_width="wide")
    with pytest.raises(ValueError, match="block_width must be one of"):
        apply_plan(copy.deepcopy(model), x, {}, block_width="wide")


def test_scattered_model_saves_reloads_and_exports(resnet20_stats, tmp_path):
    model = resnet20_stats
    x = torch.randn(2, 3, 32, 32)
    space = PruningSpace(model, x[:1], block_width="scatter", ignored_layers=["conv1", "*.shortcut.0"])
    pruned = apply_plan(copy.deepcopy(model), x[:1], uniform(space, random_scores(model, 1), 0.45), block_width="scatter")
    save_model(pruned, tmp_path / "m", model_name="resnet20", num_classes=10, in_channels=3)
    arch = json.loads((tmp_path / "m.json").read_text())
    assert arch["scatter"] == scattered_convs(pruned)
    loaded, _ = load_model(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    # The kept indices travel in the state_dict: a rebuild alone has placeholders.
    placeholder = rebuild("resnet20", arch["widths"], 10, 3, scattered=arch["scatter"])
    assert not torch.equal(placeholder.get_submodule("layers.0.0.bn2").index, pruned.get_submodule("layers.0.0.bn2").index)
    with pytest.raises(ValueError, match="scattered convs must be"):
        rebuild("resnet20", arch["widths"], 10, 3, scattered=["layers.0.0.conv1"])
    program = torch.export.export(pruned, (x,))
    export_torchscript(pruned, x[:1], tmp_path / "m.ts")
    with torch.no_grad():
        assert torch.equal(program.module()(x), pruned(x))
        assert torch.equal(torch.jit.load(str(tmp_path / "m.ts"))(x), pruned(x))
    ort = pytest.importorskip("onnxruntime")
    export_onnx(pruned, x[:1], tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    (logits,) = session.run(None, {"input": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), pruned(x).detach(), rtol=1e-4, atol=1e-4)


def test_channel_scatter_checks_its_index():
    scatter = ChannelScatter(nn.Identity(), [2, 0], 4)
    y = scatter(torch.ones(1, 2, 1, 1) * torch.tensor([5.0, 7.0])[None, :, None, None])
    assert y.flatten().tolist() == [7.0, 0.0, 5.0, 0.0]
    for bad in ([0, 0], [4], []):
        with pytest.raises(ValueError, match="distinct channels"):
            ChannelScatter(nn.Identity(), bad, 4)
