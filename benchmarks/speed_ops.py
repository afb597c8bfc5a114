"""Operators (``speed.py --parts ops``): the fused dual-branch convolution ``scop_ext.dual_scaled_conv2d``
against the two-branch plain-PyTorch reference (eager and ``torch.compile``) and a bare conv
over the same 2N batch, forward and forward+backward (weight frozen, input and beta requiring
grad, as in stage 2), at the CIFAR ResNet layer shapes (16/32/64 channels at 32/16/8 px) and
N = 64 and 128 real images (NCHW, and again with input and weight in channels_last, which
oneDNN convolves faster on the CPU), and the ImageNet ResNet ones (64@56, 128@28, 256@14, 512@7; N = 4
on the CPU, 32 on CUDA). On CUDA also the fused mix passes' achieved memory bandwidth against the
GPU's peak: the fused pass moves 5 N C H W elements either way (forward: reads both halves of
the conv output, writes them and the branch difference; backward: reads grad_out's two halves
and the difference, writes grad_y's two halves).
"""

from __future__ import annotations

import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _report  # noqa: E402
from _timing import PeakMemory, mib, ratio, saved_bytes, timed  # noqa: E402

import scop_ext  # noqa: E402
from scop_ext.ops import reference  # noqa: E402


CIFAR_SHAPES = [(16, 32), (32, 16), (64, 8)]


IMAGENET_SHAPES = [(64, 56), (128, 28), (256, 14), (512, 7)]


def op_implementations():
    compiled_ref = torch.compile(reference.dual_scaled_conv2d, dynamic=False)
    return {
        "scop": lambda x, w, beta, noise: scop_ext.dual_scaled_conv2d(x, w, None, beta, noise, 1, 1),
        "eager": lambda x, w, beta, noise: reference.dual_scaled_conv2d(x, w, None, beta, noise, 1, 1),
        "compiled": lambda x, w, beta, noise: compiled_ref(x, w, None, beta, noise, 1, 1),
        "conv": lambda x, w, beta, noise: F.conv2d(x, w, None, 1, 1),
    }


def peak_bandwidth() -> float:
    """Bytes per second the current GPU's memory moves at most: double data rate x bus width."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8


def mix_bandwidth(x, beta, fwd: dict, min_run_time: float) -> dict:
    """Bytes per second of the fused forward pass (the fused op's time less the bare conv's) and of
    the backward pass (``_dual_mix_backward`` timed alone) on conv outputs shaped like ``x``."""
    n = x.shape[0] // 2
    moved = 5 * n * x[0].numel() * x.element_size()
    grad_out = torch.randn_like(x)
    diff = grad_out[:n].clone()
    backward = timed(lambda: torch.ops.scop._dual_mix_backward.default(grad_out, beta, diff, True, True), min_run_time, "cuda")
    forward = fwd["scop"] - fwd["conv"]
    return {"fwd": moved / (forward * 1e-3) if forward > 0 else math.nan, "bwd": moved / (backward * 1e-3)}


def measure_ops(device: str, min_run_time: float, cifar_batches, imagenet_batch: int, log) -> list[dict]:
    peak = PeakMemory(device)
    impls = op_implementations()
    rows = []
    cases = [("CIFAR", c, px, n, fmt) for fmt in (torch.contiguous_format, torch.channels_last)
             for c, px in CIFAR_SHAPES for n in cifar_batches]
    cases += [("ImageNet", c, px, imagenet_batch, torch.contiguous_format) for c, px in IMAGENET_SHAPES]
    for family, c, px, n, fmt in cases:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2 * n, c, px, px, generator=gen).to(device).contiguous(memory_format=fmt)
        w = (torch.randn(c, c, 3, 3, generator=gen) / (9 * c) ** 0.5).to(device).contiguous(memory_format=fmt)
        if fmt == torch.channels_last:
            family += " NHWC"
        beta = torch.rand(c, generator=gen).to(device)
        noise = torch.randn(n, 2, c, generator=gen).to(device)
        fwd, fb, mem, saved = {}, {}, {}, {}
        for name, fn in impls.items():
            with torch.no_grad():
                fwd[name] = timed(lambda: fn(x, w, beta, noise), min_run_time, device)
            xg, bg = x.clone().requires_grad_(), beta.clone().requires_grad_()

            def step(fn=fn, xg=xg, bg=bg):
                out = fn(xg, w, bg, noise)
                out.backward(torch.ones_like(out))
                xg.grad = bg.grad = None

            fb[name] = timed(step, min_run_time, device)
            mem[name] = peak(step)
            saved[name] = saved_bytes(lambda fn=fn, xg=xg, bg=bg: fn(xg, w, bg, noise)) if name != "compiled" else math.nan
            del xg, bg
        row = dict(family=family, c=c, px=px, n=n, fwd=fwd, fb=fb, mem=mem, saved=saved)
        if device == "cuda":  # stride 1, padding 1: the conv output is shaped like x
            row["mix"] = mix_bandwidth(x, beta, fwd, min_run_time)
        rows.append(row)
        log(f"  ops {device} {family} C={c} {px}px N={n}: fwd scop {fwd['scop']:.3f} ms "
            f"(eager {fwd['eager']:.3f}, compiled {fwd['compiled']:.3f}, conv {fwd['conv']:.3f}); "
            f"f+b scop {fb['scop']:.3f} ms (eager {fb['eager']:.3f})")
    return rows


def ops_table(rows) -> str:
    header = ["shape", "2N", "fwd ms: scop / eager / compiled / conv", "fwd scop ÷ conv", "fwd eager ÷ scop",
              "f+b ms: scop / eager / compiled / conv", "f+b eager ÷ scop", "f+b compiled ÷ scop",
              "peak MiB f+b: scop / eager / compiled / conv", "saved MiB: scop / eager / conv"]
    cuda = any("mix" in r for r in rows)
    if cuda:
        header.append("mix pass GB/s fwd / bwd (÷ peak)")
        peak = peak_bandwidth()
    body = []
    for r in rows:
        f, b, m, s = r["fwd"], r["fb"], r["mem"], r["saved"]
        order = ("scop", "eager", "compiled", "conv")
        body.append([
            f"{r['family']} {r['c']}@{r['px']}", 2 * r["n"],
            " / ".join(f"{f[k]:.2f}" for k in order), ratio(f["scop"], f["conv"]), ratio(f["eager"], f["scop"]),
            " / ".join(f"{b[k]:.2f}" for k in order), ratio(b["eager"], b["scop"]), ratio(b["compiled"], b["scop"]),
            " / ".join(mib(m[k]) for k in order), " / ".join(mib(s[k]) for k in ("scop", "eager", "conv")),
        ])
        if cuda:
            mix = r["mix"]
            body[-1].append(f"{mix['fwd'] / 1e9:.0f} / {mix['bwd'] / 1e9:.0f} ({ratio(mix['fwd'], peak)} / {ratio(mix['bwd'], peak)})")
    return _report.markdown_table(header, body)


def section(device: str, args, min_run: float, log) -> tuple[str, str, str]:
    """(title, table, notes) of the operator table on ``device``; ``args``: speed.py's options."""
    imagenet_n = 2 if args.quick else 4 if device == "cpu" else 32
    rows = measure_ops(device, min_run, [64] if args.quick else [64, 128], imagenet_n, log)
    notes = (
        "3x3 conv, stride 1, C_in = C_out, 2N images (N real + N knockoff), knockoff bias on. "
        "*NHWC* rows: input and weight in channels_last for every implementation, bare conv included. "
        "*fwd*: forward under no_grad; *f+b*: forward + backward of a sum, weight frozen, input and "
        "beta requiring grad. *scop*: the fused operator; *eager*: `scop_ext.reference` (two branches "
        "in plain PyTorch); *compiled*: `torch.compile` of that; *conv*: a bare conv over the 2N batch "
        "(the floor). Ratios > 1 in the `eager ÷ scop` / `compiled ÷ scop` columns mean scop is faster. "
        "*peak*: memory above the level before the forward+backward call; *saved*: activation bytes "
        "autograd keeps for the backward (eager code only). "
        + ("*mix pass*: bytes the fused pass moves per second (forward: scop − conv time; backward: "
           "`_dual_mix_backward` alone), and in brackets ÷ the GPU's peak memory bandwidth "
           f"({peak_bandwidth() / 1e9:.0f} GB/s from its clock and bus width)."
           if device == "cuda" else
           "The mix pass's bandwidth ÷ the device's peak is a CUDA row only: a CPU's peak is not known here.")
    )
    return f"### Operators ({device})", ops_table(rows), notes
