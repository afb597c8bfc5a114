"""Stage-2 step (``speed.py --parts step``): one SCOP training step of a whole ResNet-20 / ResNet-56 (every
conv converted, BN over the paired batch, Lemma 2 knockoff bias on, beta-only Adam step and
clamp, on [N real; N knockoff] images) as the package runs it, against the same step written
in plain PyTorch (each conv replaced by a module calling ``scop_ext.reference.dual_scaled_conv2d``
with biases drawn by ``torch.randn`` and a matmul), against ``torch.compile`` of that plain
model, and against the package's model under ``torch.compile``; and, as the floor, one ordinary
training step of the unconverted model on N images and a plain forward over the 2N batch.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _report  # noqa: E402
from _timing import PeakMemory, mib, ratio, saved_bytes  # noqa: E402

from scop_ext import ScopConv2d, convert, scop_layers
from scop_ext.ops import reference  # noqa: E402
from scop_ext.scales.batch_bn import batch_detached  # noqa: E402
from scop_ext.scales.split import split_forward  # noqa: E402
from scop_ext.models import build_model  # noqa: E402
from scop_ext.train.timing import time_ms  # noqa: E402


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
        self.gamma = float(layer.knockoff._gamma)
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


@torch.no_grad()
def _calibrate_batchnorm(model: nn.Module, px: int, device: str, fmt: torch.memory_format) -> None:
    """Running statistics of random images, as a pretrained network has its data's. With the
    initial ones (mean 0, variance 1) frozen BN lets the activations of random weights grow
    layer by layer (10^4 at ResNet-56's end), the softmax saturates and a few per cent of the
    gradients are subnormal floats, which the CPU computes many times slower: the frozen rows
    would time that, not the step."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches below
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        model(torch.randn(16, 3, px, px, generator=gen).to(device).contiguous(memory_format=fmt))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1


def _stage2_models(name: str, px: int, device: str, bn: str, fmt: torch.memory_format):
    """(dense model, SCOP-converted copy with fitted biases, plain two-branch copy), BN in mode
    ``bn`` as ``learn_scales`` sets it ("batch": over the paired batch; "frozen": eval)."""
    torch.manual_seed(0)
    dense = build_model(name, 10, 3).to(device).to(memory_format=fmt)
    _calibrate_batchnorm(dense, px, device, fmt)
    scop = convert(copy.deepcopy(dense))
    for layer in scop_layers(scop).values():
        layer.fit_knockoff_bias(torch.full((layer.in_channels,), 0.1))  # any s_in: timing does not depend on it
        layer.use_knockoff_bias = True
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


def _statistics_detached(model: nn.Module):
    """``model``'s forward as ``learn_scales(bn="batch_detached")`` runs it."""
    def forward(x2):
        with batch_detached():
            return model(x2)

    return forward


def _compiled(scop: nn.Module, bn: str, n: int):
    """``scop``'s stage-2 forward under ``torch.compile(fullgraph=True)``; with BN frozen the split
    streams trace into one graph, so inductor gets no knockoff-half backward."""
    if bn != "frozen":
        return torch.compile(scop, fullgraph=True, dynamic=False)
    split = torch.compile(split_forward, fullgraph=True, dynamic=False)
    return lambda x2: split(scop, x2[:n], x2[n:])


def _step_variants(name, device, bn, fmt, x2, y, compiled: bool) -> dict:
    """label -> (step, forward-only) for one model and BN mode; "scop" runs as learn_scales does."""
    dense, scop, plain = _stage2_models(name, x2.shape[-1], device, bn, fmt)
    n = y.shape[0]
    scop_forward = (lambda x: split_forward(scop, x[:n], x[n:])) if bn == "frozen" else scop
    variants = {
        "scop": _beta_step(scop, scop_forward, x2, y),
        "plain eager": _beta_step(plain, plain, x2, y),
    }
    if bn == "batch":  # the opt-in approximation, against the same exact plain step
        variants["scop batch_detached"] = _beta_step(scop, _statistics_detached(scop), x2, y)
    if compiled:
        variants["plain compiled"] = _beta_step(plain, torch.compile(plain, dynamic=False), x2, y)
        variants["scop compiled"] = _beta_step(scop, _compiled(scop, bn, n), x2, y)
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
                         f"{lo:.1f}–{hi:.1f}", ratio(t[label], t["plain eager"]),
                         ratio(t[label], t["plain compiled"]) if "compiled" in label else "",
                         ratio(t[label], t["ordinary step (N)"]), mib(m[label]), ratio(m[label], m["plain eager"]),
                         mib(s[label])])
    return _report.markdown_table(header, body)


def selected_cases(args) -> list[tuple]:
    """The STEP_CASES that speed.py's ``--step-models`` and ``--step-layouts`` pick."""
    return [c for c in STEP_CASES if c[0] in args.step_models.split(",") and c[3] in args.step_layouts.split(",")]


def section_suffix(args) -> str:
    """"" for the whole table; else the picked rows, so runs split to fit a time budget each
    write their own README section (``speed-step-cpu-resnet56-NCHW``)."""
    cases = selected_cases(args)
    if cases == STEP_CASES:
        return ""
    return "".join(f"-{name.replace('torchvision:', 'tv-')}-{layout}" for name, _, _, layout in cases)


def section(device: str, args, min_run: float, log) -> tuple[str, str, str]:
    """(title, table, notes) of the stage-2 step table on ``device``; ``args``: speed.py's options."""
    cases = selected_cases(args)
    compiled = args.step_models if args.compile_models is None else args.compile_models
    rows = measure_step(device, min_run, args.step_batch, cases, compiled.split(","), args.repeats, log)
    notes = (
        "One stage-2 step (random data and weights, BatchNorm statistics calibrated on random "
        "images as a trained network's are on its data, so frozen BN keeps activations and gradients "
        "in range: with the initial statistics a few per cent of the gradients were subnormal floats, "
        "which the CPU computes many times slower): forward of "
        "N real + N knockoff images, cross entropy of the real half, backward to beta only (weights "
        "frozen), Adam, clamp, with BatchNorm over the paired batch (*batch*, the authors' choice) or "
        "frozen (*frozen*); every row is compared with the plain step in the same BN mode. *scop*: "
        "`scop_ext.convert` run as `learn_scales` runs it: the paired batch through the fused operator "
        "with BN *batch*; with BN *frozen*, `knockoff_stream.split_forward` (knockoff stream under "
        "no_grad, then the real stream mixing in what it recorded); *scop batch_detached*: BN *batch* run as "
        "`bn: batch_detached` runs it (the same forward, the statistics constant in the backward, which "
        "skips the knockoff half; an approximation, compared with the exact plain step). *plain eager*: the same network "
        "with each conv replaced by a plain-PyTorch two-branch module (`reference.dual_scaled_conv2d`, "
        "biases from `torch.randn`) over the paired batch; *plain compiled*: "
        "`torch.compile` of that model over the paired batch; *scop compiled*: `torch.compile(fullgraph=True)` "
        "of the converted model over the paired batch with BN *batch*, of `split_forward` with BN *frozen* "
        "(compile time excluded); *ordinary "
        "step (N)*: the unconverted network trained normally (all weights, SGD) on the N real images; "
        "*forward (2N)*: its forward over the 2N images without grad. *channels_last*: model and "
        f"images in channels_last. Times: median over {args.repeats} interleaved rounds of "
        f"{min_run:g} s each (every variant of a row in turn, then again), with the range over the "
        "rounds; the machine is shared, so compare ratios within a row group. Targets (CPU): scop "
        "with BN frozen ≤ 0.70 × plain eager in time and ≤ 0.60 × in peak memory; scop compiled ≤ "
        "1.00 × plain compiled. *peak*: memory above the level before the step."
    )
    picked = ", ".join(dict.fromkeys(f"{name} {layout}" for name, _, _, layout in cases))
    title = f"### Stage-2 training step, whole network ({device})" + (f": {picked}" if section_suffix(args) else "")
    return title, step_table(rows), notes
