"""Every torchvision CNN classifier and five timm ones through the whole SCOP path at small
resolution with random weights: convert, one stage-2 step, a 50% FLOPs plan, prune, pruned ==
masked dense, save/load. A fast subset runs in `make test`; the rest is `slow` (`make test-all`)."""

from __future__ import annotations

import fnmatch

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from scop_ext import models
from scop_ext.export import load_model, save_model
from scop_ext.nn import ChannelShuffle, convert
from scop_ext.prune import PruningSpace, ScopImportance, apply_plan, count_flops, flops_target
from scop_ext.scales import learn_scales

from tests._helpers import masked_dense

# Transformers have no conv channels to prune: a patch embedding, then attention blocks whose
# channels reach the output through reshapes torch-pruning does not trace (swin's fails outright).
EXCLUDED = {"vit_*": "transformer", "swin_*": "transformer", "maxvit_t": "transformer (needs 224 px windows too)"}
# One or two of each family, small ones: about a minute on a loaded 2-core machine.
FAST = {"resnet18", "resnext50_32x4d", "regnet_x_400mf", "mobilenet_v2", "mobilenet_v3_small", "mnasnet0_5",
        "efficientnet_b0", "convnext_tiny", "googlenet", "squeezenet1_1", "shufflenet_v2_x0_5"}
TIMM_FAST = {"regnetx_002", "convnext_atto", "mobilenetv3_small_050"}
SIZES = {"inception_v3": 80}  # its stem needs 75 px


def _matches(name: str, table: dict[str, str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in table)


TORCHVISION = sorted(torchvision.models.list_models(module=torchvision.models))
ZOO = [pytest.param("torchvision:" + n, marks=() if n in FAST else pytest.mark.slow)
       for n in TORCHVISION if not _matches(n, EXCLUDED)]
TIMM = ["resnet18", "efficientnet_b0", "regnetx_002", "convnext_atto", "mobilenetv3_small_050"]
ZOO += [pytest.param("timm:" + n, marks=() if n in TIMM_FAST else pytest.mark.slow) for n in TIMM]


@torch.no_grad()
def _lively(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Random weights whose activations neither vanish nor explode (torchvision's own init leaves
    some nets, googlenet among them, with logits that do not depend on the input): He-normal
    convs, random BatchNorm affines, running statistics of one batch."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0.0, 0.1)
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: one batch gives its own statistics
    model.train()(x)
    return model.eval()


def _stage2_step(model: nn.Module, x: torch.Tensor) -> None:
    # Independent N(0, 1) images are exact knockoffs of N(0, 1) images.
    pairs = DataLoader(TensorDataset(x, torch.randn_like(x), torch.arange(len(x)) % 10), batch_size=len(x))
    learn_scales(model, pairs, "cpu", epochs=1, use_knockoff_bias=False, progress=False)


@pytest.mark.parametrize("name", ZOO)
def test_zoo_prunes_exactly_and_reloads(name, tmp_path, one_thread):
    torch.manual_seed(0)
    size = SIZES.get(name.partition(":")[2], 64)
    x = torch.randn(2, 3, size, size)
    model = _lively(models.build_model(name, 10, 3), torch.randn(8, 3, size, size))
    with torch.no_grad():
        dense = model(x)
    convert(model)
    _stage2_step(model, x)
    scores = ScopImportance()(model)
    assert any(bool((s != 0).any()) for s in scores.values())  # beta moved off 0.5

    space = PruningSpace(model, x[:1])
    plan = flops_target(space, scores, 0.5)
    assert abs(space.reduction(plan) - 0.5) <= 0.01
    reference = masked_dense(model, x, plan)
    pruned = apply_plan(model, x[:1], plan)
    assert count_flops(pruned, x[:1]) == space.flops(plan)
    with torch.no_grad():
        got, expected = pruned(x), reference(x)
    scale = expected.abs().max()
    assert (dense - expected).abs().max() > 1e-3 * scale  # the check is sharp: the removed channels mattered
    if not any(isinstance(m, nn.LayerNorm) for m in pruned.modules()):
        assert (got - expected).abs().max() <= 1e-5 * scale
    # else: LayerNorm normalises over the channels that remain, which no masking of the dense
    # net reproduces (convnext); shapes, FLOPs and the round trip are still checked.
    assert got.shape == (2, 10)

    paths = save_model(pruned, tmp_path / "m", model_name=name, num_classes=10, in_channels=3)
    back, _ = load_model(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(back(x), got), paths


def test_functional_channel_shuffle_is_refused_in_one_line():
    # torchvision's own shufflenet shuffles with view/transpose/view, which torch-pruning cannot
    # map; build_model gives it a ChannelShuffle module instead (the zoo test above).
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()
    with pytest.raises(ValueError, match=r"ShuffleNetV2 through the reshape ops ViewBackward0: channel shuffle .* "
                                         r"not supported; build it with scop_ext.nn.ChannelShuffle"):
        PruningSpace(model, torch.randn(1, 3, 64, 64))


def test_channel_shuffle_module_is_torchvisions_shuffle():
    from torchvision.models.shufflenetv2 import channel_shuffle

    x = torch.randn(2, 24, 3, 3)
    assert torch.equal(ChannelShuffle(2)(x), channel_shuffle(x, 2))
    built = models.build_model("torchvision:shufflenet_v2_x0_5", 10, 3).eval()
    plain = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()
    plain.load_state_dict(built.state_dict())
    with torch.no_grad():
        assert torch.equal(built(torch.ones(1, 3, 64, 64)), plain(torch.ones(1, 3, 64, 64)))
