"""How fast is SCOP, and is the pruned network's saving real? Three tables per backend, one run.

1. **Operators** (``ops``): the fused dual-branch convolution ``scop_ext.dual_scaled_conv2d``
   against the two-branch plain-PyTorch reference (eager and ``torch.compile``) and a bare conv
   over the same 2N batch, forward and forward+backward (weight frozen, input and beta requiring
   grad, as in stage 2), at the CIFAR ResNet layer shapes (16/32/64 channels at 32/16/8 px) and
   N = 64 and 128 real images (NCHW, and again with input and weight in channels_last, which
   oneDNN convolves faster on the CPU), and the ImageNet ResNet ones (64@56, 128@28, 256@14, 512@7; N = 4
   on the CPU, 32 on CUDA).
2. **Stage-2 step** (``step``): one SCOP training step of a whole ResNet-20 / ResNet-56 (every
   conv converted, BN over the paired batch, Lemma 2 knockoff bias on, beta-only Adam step and
   clamp, on [N real; N knockoff] images) as the package runs it, against the same step written
   in plain PyTorch (each conv replaced by a module calling ``scop_ext.reference.dual_scaled_conv2d``
   with biases drawn by ``torch.randn`` and a matmul), against ``torch.compile`` of that plain
   model, and against the package's model under ``torch.compile``; and, as the floor, one ordinary
   training step of the unconverted model on N images and a plain forward over the 2N batch.
3. **Pruned latency** (``latency``): ResNet-20 / ResNet-56 pruned to half the FLOPs (random
   scores, ``flops_target`` with the per-layer uniform ratio; kept widths as chosen and rounded up
   to multiples of 8 and 16) against the dense network, batch 1 and 64, next to the FLOPs ratio,
   run as built and with BatchNorm folded into the convs in channels_last.

Memory. CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before the call.
CPU: the peak resident set size above the resident size before the call (``VmHWM`` after
resetting it through ``/proc/self/clear_refs``, with glibc told to map every block above 64 KiB
on its own so freed tensors leave the resident set) and, for eager code, the bytes autograd
saves for the backward (unique storages, via saved-tensor hooks:
``scop_ext.resources.saved_for_backward``). Times are medians of 5 timed blocks after 3 warm-up
calls (``scop_ext.timing.time_ms``, what the latency policy times with too), with glibc keeping
freed blocks up to 32 MiB for reuse (see ``malloc_for_timing``).

    python benchmarks/speed.py                                   # every backend here, print
    python benchmarks/speed.py --write benchmarks/README.md      # and write the sections
    python benchmarks/speed.py --quick --parts ops,step          # short runs, some tables
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import math
import os
import re
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _baseline  # noqa: E402
import _report  # noqa: E402

import scop_ext  # noqa: E402
from scop_ext import ScopConv2d, convert, reference, scop_layers  # noqa: E402
from scop_ext.knockoff_stream import split_forward  # noqa: E402
from scop_ext.models import build_model, resnet20, resnet56  # noqa: E402
from scop_ext.prune import PruningSpace, apply_plan, count_flops, count_params, select  # noqa: E402
from scop_ext.prune.importance import RandomImportance  # noqa: E402
from scop_ext.resources import saved_for_backward  # noqa: E402
from scop_ext.timing import time_ms  # noqa: E402

CIFAR_SHAPES = [(16, 32), (32, 16), (64, 8)]
IMAGENET_SHAPES = [(64, 56), (128, 28), (256, 14), (512, 7)]
MODELS = {"resnet20": resnet20, "resnet56": resnet56}


# --------------------------------------------------------------------------- measuring


try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: leave malloc alone
    _LIBC = None


def malloc_for_timing() -> None:
    """Let glibc keep freed blocks up to 32 MiB for reuse (its dynamic mmap threshold's ceiling,
    fixed so it does not depend on what ran before) and not hand the heap's free top back to the
    system: timings then exclude the page faults of re-mapping every activation, which otherwise
    vary run to run by 2x (with a 64 MiB trim threshold a 2N = 256, 16@32 step, whose tensors
    are 16 MiB each, still flipped between 40 and 80 ms)."""
    if _LIBC is not None:
        _LIBC.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD
        _LIBC.mallopt(-1, 2**30)  # M_TRIM_THRESHOLD


def malloc_for_memory() -> None:
    """Map every block above 64 KiB on its own and return free memory to the system, so the
    resident set follows live tensors while a peak is measured."""
    if _LIBC is not None:
        _LIBC.mallopt(-3, 64 * 2**10)
        _LIBC.mallopt(-1, 128 * 2**10)
        _LIBC.malloc_trim(0)


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+)", f.read()).group(1))


class PeakMemory:
    """Peak memory above the level at entry, in bytes: CUDA allocator or CPU resident set."""

    def __init__(self, device: str):
        self.device = device
        self.cpu_ok = os.path.exists("/proc/self/clear_refs")

    def __call__(self, fn) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            return float(torch.cuda.max_memory_allocated() - before)
        if not self.cpu_ok or _LIBC is None:
            return math.nan
        malloc_for_memory()
        try:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM to the current resident size
            except OSError:
                self.cpu_ok = False
                return math.nan
            before = _proc_kib("VmRSS")
            fn()
            return float(_proc_kib("VmHWM") - before) * 1024
        finally:
            malloc_for_timing()


def saved_bytes(fn) -> float:
    """Bytes of the unique storages autograd saves for the backward while ``fn`` runs."""
    with saved_for_backward() as saved:
        fn()
    return float(sum(n for n, _ in saved))


def timed(fn, min_run_time: float, device: str) -> float:
    """Median milliseconds of ``fn`` (after 3 warm-up calls, which also compile)."""
    return time_ms(fn, device, min_run_time, warmup=3)


def _mib(b: float) -> str:
    return "–" if b is None or math.isnan(b) else f"{b / 2**20:.1f}"


def _ratio(a: float, b: float) -> str:
    return "–" if (a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0) else f"{a / b:.2f}"


# --------------------------------------------------------------------------- 1. operators


def op_implementations():
    compiled_ref = torch.compile(reference.dual_scaled_conv2d, dynamic=False)
    return {
        "scop": lambda x, w, beta, noise: scop_ext.dual_scaled_conv2d(x, w, None, beta, noise, 1, 1),
        "eager": lambda x, w, beta, noise: reference.dual_scaled_conv2d(x, w, None, beta, noise, 1, 1),
        "compiled": lambda x, w, beta, noise: compiled_ref(x, w, None, beta, noise, 1, 1),
        "conv": lambda x, w, beta, noise: F.conv2d(x, w, None, 1, 1),
    }


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
        rows.append(dict(family=family, c=c, px=px, n=n, fwd=fwd, fb=fb, mem=mem, saved=saved))
        log(f"  ops {device} {family} C={c} {px}px N={n}: fwd scop {fwd['scop']:.3f} ms "
            f"(eager {fwd['eager']:.3f}, compiled {fwd['compiled']:.3f}, conv {fwd['conv']:.3f}); "
            f"f+b scop {fb['scop']:.3f} ms (eager {fb['eager']:.3f})")
    return rows


def ops_table(rows) -> str:
    header = ["shape", "2N", "fwd ms: scop / eager / compiled / conv", "fwd scop ÷ conv", "fwd eager ÷ scop",
              "f+b ms: scop / eager / compiled / conv", "f+b eager ÷ scop", "f+b compiled ÷ scop",
              "peak MiB f+b: scop / eager / compiled / conv", "saved MiB: scop / eager / conv"]
    body = []
    for r in rows:
        f, b, m, s = r["fwd"], r["fb"], r["mem"], r["saved"]
        order = ("scop", "eager", "compiled", "conv")
        body.append([
            f"{r['family']} {r['c']}@{r['px']}", 2 * r["n"],
            " / ".join(f"{f[k]:.2f}" for k in order), _ratio(f["scop"], f["conv"]), _ratio(f["eager"], f["scop"]),
            " / ".join(f"{b[k]:.2f}" for k in order), _ratio(b["eager"], b["scop"]), _ratio(b["compiled"], b["scop"]),
            " / ".join(_mib(m[k]) for k in order), " / ".join(_mib(s[k]) for k in ("scop", "eager", "conv")),
        ])
    return _report.markdown_table(header, body)


# --------------------------------------------------------------------------- 2. stage-2 step


class PlainDualConv2d(nn.Module):
    """A SCOP-mode conv in plain PyTorch: ``reference.dual_scaled_conv2d`` with knockoff biases
    ``b = sqrt(gamma) z1 + R z2``, ``b~ = sqrt(gamma) z1 - R z2`` drawn with ``torch.randn``.

    Shares ``weight`` with the layer it is built from; ``beta`` is its own copy.
    Input: (2N, C_in, H, W); Output: (2N, C_out, H_out, W_out).
    """

    def __init__(self, layer: ScopConv2d) -> None:
        super().__init__()
        self.weight, self.bias = layer.weight, layer.bias
        self.beta = nn.Parameter(layer.beta.detach().clone())
        self.register_buffer("R", layer.knockoff_R.detach().clone())
        self.gamma = float(layer._gamma)
        self.stride, self.padding, self.dilation, self.groups = layer.stride, layer.padding, layer.dilation, layer.groups

    def forward(self, x):
        n, c = x.shape[0] // 2, self.R.shape[0]
        z = torch.randn(n, 2, c, dtype=x.dtype, device=x.device)
        shared = z[:, 0] * self.gamma**0.5
        rotated = z[:, 1] @ self.R.T
        noise = torch.stack([shared + rotated, shared - rotated], 1)
        return reference.dual_scaled_conv2d(x, self.weight, self.bias, self.beta, noise, self.stride, self.padding,
                                            self.dilation, self.groups)


# (model, image size, real images per step on the CPU, layout): the rows of the step table.
STEP_CASES = [
    ("resnet20", 32, 32, "NCHW"),
    ("resnet20", 32, 32, "channels_last"),
    ("resnet56", 32, 32, "NCHW"),
    ("torchvision:resnet18", 112, 8, "NCHW"),
]
FORMATS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}


def _stage2_models(name: str, device: str, bn: str, fmt: torch.memory_format):
    """(dense model, SCOP-converted copy with fitted biases, plain two-branch copy), BN in mode
    ``bn`` as ``learn_scales`` sets it ("batch": over the paired batch; "frozen": eval)."""
    torch.manual_seed(0)
    dense = build_model(name, 10, 3).to(device).to(memory_format=fmt)
    scop = convert(copy.deepcopy(dense))
    for layer in scop_layers(scop).values():
        layer.fit_knockoff_bias(torch.full((layer.in_channels,), 0.1))  # any s_in: timing does not depend on it
        layer.knockoff_bias = True
        layer.generator = None
    plain = copy.deepcopy(scop)
    for lname, layer in list(scop_layers(plain).items()):
        plain.set_submodule(lname, PlainDualConv2d(layer))
    for model in (scop, plain):
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.train(bn == "batch")
            if isinstance(m, (ScopConv2d, PlainDualConv2d)):
                m.beta.requires_grad_(True)
    return dense, scop.to(device), plain.to(device)


def _beta_step(model: nn.Module, forward, x2, y):
    betas = [m.beta for m in model.modules() if isinstance(m, (ScopConv2d, PlainDualConv2d))]
    opt = torch.optim.Adam(betas, lr=0.004, betas=(0.5, 0.9))
    n = y.shape[0]

    def step():
        logits = forward(x2)[:n]
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for b in betas:
                b.clamp_(0.0, 1.0)

    def fwd_only():
        return F.cross_entropy(forward(x2)[:n], y)

    return step, fwd_only


def _step_variants(name, device, bn, fmt, x2, y, compiled: bool) -> dict:
    """label -> (step, forward-only) for one model and BN mode; "scop" runs as learn_scales does."""
    dense, scop, plain = _stage2_models(name, device, bn, fmt)
    n = y.shape[0]
    scop_forward = (lambda x: split_forward(scop, x[:n], x[n:])) if bn == "frozen" else scop
    variants = {
        "scop": _beta_step(scop, scop_forward, x2, y),
        "plain eager": _beta_step(plain, plain, x2, y),
    }
    if compiled:
        variants["plain compiled"] = _beta_step(plain, torch.compile(plain, dynamic=False), x2, y)
        variants["scop compiled"] = _beta_step(scop, torch.compile(scop, dynamic=False), x2, y)
    dense.train()
    opt = torch.optim.SGD(dense.parameters(), lr=0.1, momentum=0.9)

    def ordinary():  # the floor: an ordinary training step on the N real images
        loss = F.cross_entropy(dense(x2[:n]), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def forward_2n():  # and a plain forward over the 2N images
        dense(x2)

    variants["ordinary step (N)"] = (ordinary, lambda: dense(x2[:n]))
    variants["forward (2N)"] = (forward_2n, None)
    return variants


def measure_step(device: str, min_run_time: float, batch: int | None, cases, compiled: list[str], repeats: int,
                 log) -> list[dict]:
    """Every variant of a case timed in turn, ``repeats`` rounds (A B C A B C ...), so load that
    comes and goes hits all of them; median and range over the rounds."""
    peak = PeakMemory(device)
    rows = []
    for name, px, cpu_batch, layout in cases:
        n = batch or (cpu_batch if device == "cpu" else 4 * cpu_batch)
        fmt = FORMATS[layout]
        for bn in ("batch", "frozen"):
            gen = torch.Generator().manual_seed(0)
            x2 = torch.randn(2 * n, 3, px, px, generator=gen).to(device).contiguous(memory_format=fmt)
            y = torch.randint(10, (n,), generator=gen).to(device)
            variants = _step_variants(name, device, bn, fmt, x2, y, name in compiled)
            t = time.time()
            for step, _ in variants.values():  # warm-up, compiles
                time_ms(step, device, 0.0, warmup=2)
            log(f"  step {device} {name} {px}px {layout} bn={bn}: warm-up {time.time() - t:.0f} s")
            samples = {label: [] for label in variants}
            for _ in range(repeats):
                for label, (step, _) in variants.items():
                    samples[label].append(time_ms(step, device, min_run_time, warmup=0))
            mems = {label: peak(step) for label, (step, _) in variants.items()}
            saved = {label: saved_bytes(fwd) if fwd is not None and "compiled" not in label else math.nan
                     for label, (_, fwd) in variants.items()}
            times = {label: sorted(v)[len(v) // 2] for label, v in samples.items()}
            spread = {label: (min(v), max(v)) for label, v in samples.items()}
            log("    " + ", ".join(f"{label} {times[label]:.1f} ms" for label in variants))
            rows.append(dict(model=name, px=px, layout=layout, bn=bn, n=n, times=times, spread=spread, mems=mems,
                             saved=saved))
    return rows


def step_table(rows) -> str:
    header = ["model", "px", "layout", "BN", "N + N", "step", "ms (median)", "range", "time ÷ plain eager",
              "time ÷ plain compiled", "time ÷ ordinary step (N)", "peak MiB", "memory ÷ plain eager",
              "saved for backward MiB"]
    body = []
    for r in rows:
        t, m, s = r["times"], r["mems"], r["saved"]
        for label in t:
            lo, hi = r["spread"][label]
            body.append([r["model"], r["px"], r["layout"], r["bn"], f"{r['n']} + {r['n']}", label, f"{t[label]:.1f}",
                         f"{lo:.1f}–{hi:.1f}", _ratio(t[label], t["plain eager"]),
                         _ratio(t[label], t["plain compiled"]) if "compiled" in label else "",
                         _ratio(t[label], t["ordinary step (N)"]), _mib(m[label]), _ratio(m[label], m["plain eager"]),
                         _mib(s[label])])
    return _report.markdown_table(header, body)


# --------------------------------------------------------------------------- 3. pruned latency


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
                     _ratio(p[1], d[1]), f"{d[64]:.1f} / {p[64]:.1f}", _ratio(p[64], d[64]),
                     f"{64e3 / d[64]:,.0f} / {64e3 / p[64]:,.0f}", f"**{p[64] / d[64] / r['flops_ratio']:.2f}**"])
    return _report.markdown_table(header, body)


# --------------------------------------------------------------------------- main


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default=None, help="comma-separated; default: cpu, plus cuda when available")
    parser.add_argument("--parts", default="ops,step,latency")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per timing")
    parser.add_argument("--step-batch", type=int, default=None,
                        help="N real images per stage-2 step (default: per model, see STEP_CASES; 4x that on CUDA)")
    parser.add_argument("--step-models", default=",".join(dict.fromkeys(c[0] for c in STEP_CASES)),
                        help="models of the step table (default: all of STEP_CASES)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds per step variant (default 3)")
    parser.add_argument("--compile-models", default=None,
                        help="models of the step table timed under torch.compile too (default: all; '' for none)")
    parser.add_argument("--quick", action="store_true", help="ResNet-20 only, short timings")
    parser.add_argument("--write", metavar="README", help="write speed-<part>-<device> sections into this file")
    args = parser.parse_args(argv)
    malloc_for_timing()
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # one compiled reference serves every shape and grad mode
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in devices and not (torch.cuda.is_available() and scop_ext.build_info()["cuda"]):
        print("cuda: skipped (no GPU here or no CUDA build of the operators)", file=sys.stderr)
        devices = [d for d in devices if d != "cuda"]
    parts = args.parts.split(",")
    min_run = 0.2 if args.quick else args.min_run_time
    models = ["resnet20"] if args.quick else ["resnet20", "resnet56"]

    def log(*a):
        print(*a, file=sys.stderr, flush=True)

    measured = []
    for device in devices:
        imagenet_n = 4 if device == "cpu" else 32
        for part in parts:
            load = _baseline.load_line()
            start = time.time()
            if part == "ops":
                rows = measure_ops(device, min_run, [64] if args.quick else [64, 128], imagenet_n if not args.quick else 2, log)
                text = ops_table(rows)
                title = f"### Operators ({device})"
                notes = (
                    "3x3 conv, stride 1, C_in = C_out, 2N images (N real + N knockoff), knockoff bias on. "
                    "*NHWC* rows: input and weight in channels_last for every implementation, bare conv included. "
                    "*fwd*: forward under no_grad; *f+b*: forward + backward of a sum, weight frozen, input and "
                    "beta requiring grad. *scop*: the fused operator; *eager*: `scop_ext.reference` (two branches "
                    "in plain PyTorch); *compiled*: `torch.compile` of that; *conv*: a bare conv over the 2N batch "
                    "(the floor). Ratios > 1 in the `eager ÷ scop` / `compiled ÷ scop` columns mean scop is faster. "
                    "*peak*: memory above the level before the forward+backward call; *saved*: activation bytes "
                    "autograd keeps for the backward (eager code only)."
                )
            elif part == "step":
                cases = [c for c in STEP_CASES if c[0] in args.step_models.split(",")]
                compiled = args.step_models if args.compile_models is None else args.compile_models
                rows = measure_step(device, min_run, args.step_batch, cases, compiled.split(","), args.repeats, log)
                text = step_table(rows)
                title = f"### Stage-2 training step, whole network ({device})"
                notes = (
                    "One stage-2 step (random data and weights; timing does not depend on them): forward of "
                    "N real + N knockoff images, cross entropy of the real half, backward to beta only (weights "
                    "frozen), Adam, clamp, with BatchNorm over the paired batch (*batch*, the authors' choice) or "
                    "frozen (*frozen*); every row is compared with the plain step in the same BN mode. *scop*: "
                    "`scop_ext.convert` run as `learn_scales` runs it: the paired batch through the fused operator "
                    "with BN *batch*; with BN *frozen*, `knockoff_stream.split_forward` (knockoff stream under "
                    "no_grad, then the real stream mixing in what it recorded). *plain eager*: the same network "
                    "with each conv replaced by a plain-PyTorch two-branch module (`reference.dual_scaled_conv2d`, "
                    "biases from `torch.randn`) over the paired batch; *plain compiled* / *scop compiled*: "
                    "`torch.compile` of those models over the paired batch (compile time excluded); *ordinary "
                    "step (N)*: the unconverted network trained normally (all weights, SGD) on the N real images; "
                    "*forward (2N)*: its forward over the 2N images without grad. *channels_last*: model and "
                    f"images in channels_last. Times: median over {args.repeats} interleaved rounds of "
                    f"{min_run:g} s each (every variant of a row in turn, then again), with the range over the "
                    "rounds; the machine is shared, so compare ratios within a row group. Targets (CPU): scop "
                    "with BN frozen ≤ 0.70 × plain eager in time and ≤ 0.60 × in peak memory; scop compiled ≤ "
                    "1.00 × plain compiled. *peak*: memory above the level before the step."
                )
            elif part == "latency":
                rows = measure_latency(device, min_run, models, log)
                text = latency_table(rows)
                text += ("\n\nHow one convolution's time follows its width (the last stage's shape; a kernel that "
                         "tracked FLOPs would give the second row):\n\n" + width_table(width_scan(device, min_run, log)))
                title = f"### Pruned network latency ({device})"
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
            else:
                raise SystemExit(f"unknown part {part!r}; expected ops, step, latency")
            seconds = time.time() - start
            print(f"{title}\n\n{text}\n")
            measured.append((part, device))
            if args.write:
                threads = f"{torch.get_num_threads()} torch threads" if device == "cpu" else "CUDA"
                body = (f"{title}\n\n`{_report.command_line()}` at {_report.git_revision()}; {_report.machine()}; "
                        f"{threads}; {load}, 1-min load {_baseline.load_now()} at the end; {seconds:.0f} s. Backends built: cpu={scop_ext.build_info()['cpu']}, "
                        f"cuda={scop_ext.build_info()['cuda']}; measured here: {', '.join(devices)}.\n\n"
                        f"{notes}\n\n{text}")
                _report.write_section(args.write, f"speed-{part}-{device}", body)
    log("measured: " + ", ".join(f"{p} on {d}" for p, d in measured))


if __name__ == "__main__":
    main()
