"""Pruned latency (``speed.py --parts latency``): ResNet-20 / ResNet-56 pruned to half the FLOPs (random
scores, ``flops_target`` with the per-layer uniform ratio; kept widths as chosen and rounded up
to multiples of 8 and 16) against the dense network, batch 1 and 64, next to the FLOPs ratio,
run as built and with BatchNorm folded into the convs in channels_last.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _report  # noqa: E402
from _timing import ratio, timed  # noqa: E402

from scop_ext.models import resnet20, resnet56  # noqa: E402
from scop_ext.prune import PruningSpace, apply_plan, count_flops, count_params, select  # noqa: E402
from scop_ext.prune.importance import RandomImportance  # noqa: E402


MODELS = {"resnet20": resnet20, "resnet56": resnet56}


LATENCY_MODES = {
    "eager": "eager, NCHW",
    "deploy": "BN folded + channels_last",
}


def _deployable(model: nn.Module, mode: str, device: str) -> nn.Module:
    """``model`` as it is run for the ``mode`` row: as is, or with every BatchNorm folded into the
    conv before it (``torch.fx.experimental.optimization.fuse``) and channels_last weights."""
    model = copy.deepcopy(model).eval()
    if mode == "deploy":
        from torch.fx.experimental.optimization import fuse

        model = fuse(model).to(memory_format=torch.channels_last)
    return model.to(device)


@torch.no_grad()
def _latency(model, batch: int, mode: str, device: str, min_run_time) -> float:
    x = torch.randn(batch, 3, 32, 32, device=device)
    if mode == "deploy":
        x = x.contiguous(memory_format=torch.channels_last)
    return timed(lambda: model(x), min_run_time, device)


def width_scan(device: str, min_run_time: float, log, px: int = 8, batch: int = 64,
               widths=(16, 24, 32, 40, 45, 48, 56, 64)) -> list[dict]:
    """Time of one 3x3 conv (C_in = C_out = c, ``batch`` images of ``px`` pixels) for each width,
    against its FLOPs, both relative to the widest: how convolution time follows the channels."""
    rows = []
    for c in widths:
        x = torch.randn(batch, c, px, px, device=device)
        w = torch.randn(c, c, 3, 3, device=device)
        with torch.no_grad():
            rows.append(dict(c=c, ms=timed(lambda: F.conv2d(x, w, None, 1, 1), min_run_time, device)))
    log("  width scan " + ", ".join(f"{r['c']}: {r['ms']:.3f} ms" for r in rows))
    return rows


def width_table(rows, px: int = 8, batch: int = 64) -> str:
    top = rows[-1]
    header = ["channels in = out", *[str(r["c"]) for r in rows]]
    return _report.markdown_table(header, [
        [f"3x3 conv, {batch} x {px}x{px}: time ratio", *[f"{r['ms'] / top['ms']:.2f}" for r in rows]],
        ["FLOPs ratio", *[f"{(r['c'] / top['c']) ** 2:.2f}" for r in rows]],
    ])


def measure_latency(device: str, min_run_time: float, models, log) -> list[dict]:
    rows = []
    for name in models:
        torch.manual_seed(0)
        dense = MODELS[name]().eval()
        example = torch.randn(1, 3, 32, 32)
        base_flops, base_params = count_flops(dense, example), count_params(dense)
        space = PruningSpace(dense, example)
        scores = RandomImportance(seed=0)(dense)
        pruned = {}
        for round_to in (1, 8, 16):
            plan = select(space, scores, "flops_target", reduction=0.5, round_to=round_to, tolerance=0.02)
            pruned[round_to] = apply_plan(copy.deepcopy(dense), example, plan).eval()
        for mode in LATENCY_MODES:
            dense_run = _deployable(dense, mode, device)
            dense_lat = {b: _latency(dense_run, b, mode, device, min_run_time) for b in (1, 64)}
            for round_to, model in pruned.items():
                flops_ratio = count_flops(model, example) / base_flops
                run = _deployable(model, mode, device)
                lat = {b: _latency(run, b, mode, device, min_run_time) for b in (1, 64)}
                widths = sorted({m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)})
                rows.append(dict(model=name, mode=mode, round_to=round_to, flops_ratio=flops_ratio,
                                 params_ratio=count_params(model) / base_params, dense=dense_lat, pruned=lat,
                                 widths=widths))
                log(f"  latency {device} {name} {mode} round_to={round_to}: FLOPs x{flops_ratio:.3f}, b64 "
                    f"{lat[64]:.2f} / {dense_lat[64]:.2f} ms = x{lat[64] / dense_lat[64]:.3f}")
    return rows


def latency_table(rows) -> str:
    header = ["model", "run as", "widths", "FLOPs ratio", "params ratio", "batch 1 ms: dense / pruned", "ratio",
              "batch 64 ms: dense / pruned", "ratio", "images/s at 64: dense / pruned",
              "latency ratio ÷ FLOPs ratio (64)"]
    body = []
    for r in rows:
        d, p = r["dense"], r["pruned"]
        widths = "as chosen" if r["round_to"] == 1 else f"multiples of {r['round_to']}"
        body.append([r["model"], LATENCY_MODES[r["mode"]], f"{widths} ({', '.join(map(str, r['widths']))})",
                     f"{r['flops_ratio']:.3f}", f"{r['params_ratio']:.3f}", f"{d[1]:.2f} / {p[1]:.2f}",
                     ratio(p[1], d[1]), f"{d[64]:.1f} / {p[64]:.1f}", ratio(p[64], d[64]),
                     f"{64e3 / d[64]:,.0f} / {64e3 / p[64]:,.0f}", f"**{p[64] / d[64] / r['flops_ratio']:.2f}**"])
    return _report.markdown_table(header, body)


def section(device: str, args, min_run: float, log) -> tuple[str, str, str]:
    """(title, tables, notes) of the pruned-latency table and the width scan on ``device``;
    ``args``: speed.py's options."""
    rows = measure_latency(device, min_run, ["resnet20"] if args.quick else ["resnet20", "resnet56"], log)
    text = latency_table(rows)
    text += ("\n\nHow one convolution's time follows its width (the last stage's shape; a kernel that "
             "tracked FLOPs would give the second row):\n\n" + width_table(width_scan(device, min_run, log)))
    notes = (
        "Dense network against the same network pruned to about half its FLOPs (random scores, "
        "`flops_target` 0.5 with per-layer uniform ratio, residual groups included; *multiples of 8 / 16*: "
        "kept widths rounded up with `round_to`; the distinct conv widths are listed), eval mode, "
        "no_grad, 32x32 inputs. *eager, NCHW*: "
        "the modules as they come out of `apply_plan`; *BN folded + channels_last*: every BatchNorm "
        "folded into its conv (`torch.fx.experimental.optimization.fuse`) and weights and input in "
        "channels_last, a common way to deploy on CPU (dense and pruned alike). Target: latency ratio "
        "within 15% of the FLOPs ratio at batch 64 on the CPU (last column ≤ 1.15)."
    )
    return f"### Pruned network latency ({device})", text, notes
