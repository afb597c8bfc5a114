"""pytest-benchmark suite: the fused operator, a stage-2 step and pruned latency, grouped so that
each group's rows compare implementations of the same work.

    pytest benchmarks/ --benchmark-only                     # CPU (and CUDA when available)
    pytest benchmarks/ --benchmark-only --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

Not collected by ``make test`` (its testpaths is tests/). ``benchmarks/speed.py`` prints the same
comparisons as ratio tables for the README.
"""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402
import speed_ops  # noqa: E402
import speed_step  # noqa: E402

import scop_ext  # noqa: E402
from scop_ext.models import resnet20  # noqa: E402
from scop_ext.prune import PruningSpace, apply_plan, select  # noqa: E402
from scop_ext.prune.importance import RandomImportance  # noqa: E402

CUDA = torch.cuda.is_available() and scop_ext.build_info()["cuda"]
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda,
                                               pytest.mark.skipif(not CUDA, reason="needs a CUDA device and the CUDA build")])]
# (channels, pixels, real images N): CIFAR ResNet stages and one ImageNet ResNet stage
SHAPES = [(16, 32, 32), (32, 16, 32), (64, 8, 32), (64, 56, 2)]
torch._dynamo.config.recompile_limit = 64
_timing.malloc_for_timing()  # as speed.py times: no page faults from re-mapping freed activations


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def implementations():
    """speed.py's four implementations, one compiled reference for the module."""
    return speed_ops.op_implementations()


def _inputs(c, px, n, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * n, c, px, px, generator=g).to(device)
    w = (torch.randn(c, c, 3, 3, generator=g) / (9 * c) ** 0.5).to(device)
    return x, w, torch.rand(c, generator=g).to(device), torch.randn(n, 2, c, generator=g).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}ch{s[1]}px_n{s[2]}")
@pytest.mark.parametrize("impl", ["scop", "eager", "compiled", "conv"])
def test_forward(benchmark, impl, shape, device, implementations):
    benchmark.group = f"forward {shape[0]}ch@{shape[1]}px 2N={2 * shape[2]} {device}"
    fn = implementations[impl]
    x, w, beta, noise = _inputs(*shape, device)

    def run():
        with torch.no_grad():
            fn(x, w, beta, noise)
        _sync(device)

    run()
    benchmark(run)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}ch{s[1]}px_n{s[2]}")
@pytest.mark.parametrize("impl", ["scop", "eager", "compiled", "conv"])
def test_forward_backward(benchmark, impl, shape, device, implementations):
    benchmark.group = f"forward+backward {shape[0]}ch@{shape[1]}px 2N={2 * shape[2]} {device}"
    fn = implementations[impl]
    x, w, beta, noise = _inputs(*shape, device)
    x.requires_grad_()
    beta.requires_grad_()

    def run():
        out = fn(x, w, beta, noise)
        out.backward(torch.ones_like(out))
        x.grad = beta.grad = None
        _sync(device)

    run()
    benchmark(run)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["scop", "plain eager"])
def test_stage2_step_resnet20(benchmark, impl, device):
    benchmark.group = f"stage-2 step resnet20 16+16 images {device}"
    _, scop, plain = speed_step._stage2_models("resnet20", device, "batch", torch.contiguous_format)
    model = scop if impl == "scop" else plain
    g = torch.Generator().manual_seed(0)
    x2, y = torch.randn(32, 3, 32, 32, generator=g).to(device), torch.randint(10, (16,), generator=g).to(device)
    step, _ = speed_step._beta_step(model, model, x2, y)

    def run():
        step()
        _sync(device)

    run()
    benchmark(run)


@pytest.fixture(scope="module")
def resnet20_pair():
    torch.manual_seed(0)
    dense = resnet20().eval()
    example = torch.randn(1, 3, 32, 32)
    space = PruningSpace(dense, example)
    plan = select(space, RandomImportance(seed=0)(dense), "flops_target", reduction=0.5)
    return dense, apply_plan(copy.deepcopy(dense), example, plan).eval()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["dense", "pruned to 50% FLOPs"])
def test_latency_resnet20_batch64(benchmark, which, device, resnet20_pair):
    benchmark.group = f"resnet20 inference batch 64 {device}"
    model = resnet20_pair[0 if which == "dense" else 1].to(device)
    x = torch.randn(64, 3, 32, 32, device=device)

    def run():
        with torch.no_grad():
            model(x)
        _sync(device)

    run()
    benchmark(run)
