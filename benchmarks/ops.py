"""Speed of the fused dual-branch convolution against its baselines, as one table.

For each CIFAR ResNet layer shape (3x3 conv, C_in = C_out) and batch, four implementations of
the same forward (and forward+backward with the weight frozen, as in SCOP stage 2) are timed in
one run:

- ``scop``: ``scop_ext.dual_scaled_conv2d`` (one conv over 2N + one fused pass);
- ``eager``: ``scop_ext.reference.dual_scaled_conv2d`` (plain PyTorch, two branches);
- ``compiled``: ``torch.compile`` of that reference;
- ``conv``: a bare ``F.conv2d`` over the same 2N batch: the floor no mixing op can beat.

Columns are medians (ms) and ratios; "saved" is the activation memory autograd keeps for the
backward (unique storages, MiB), measured with saved-tensor hooks.

    python benchmarks/ops.py                       # print the table
    python benchmarks/ops.py --write benchmarks/README.md
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.utils import benchmark

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _report  # noqa: E402

import scop_ext  # noqa: E402
from scop_ext import reference  # noqa: E402

SHAPES = [(16, 32), (32, 16), (64, 8)]  # (channels, pixels) of the three CIFAR ResNet stages
BATCHES = [64, 128]


def _inputs(n, c, px, device, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2 * n, c, px, px, generator=gen, dtype=dtype).to(device)
    w = (torch.randn(c, c, 3, 3, generator=gen, dtype=dtype) / (9 * c) ** 0.5).to(device)
    beta = torch.rand(c, generator=gen, dtype=dtype).to(device)
    noise = torch.randn(n, 2, c, generator=gen, dtype=dtype).to(device)
    return x, w, beta, noise


def _implementations():
    compiled_ref = torch.compile(reference.dual_scaled_conv2d, dynamic=False)
    return {
        "scop": lambda x, w, beta, noise: scop_ext.dual_scaled_conv2d(x, w, None, beta, noise, 1, 1),
        "eager": lambda x, w, beta, noise: reference.dual_scaled_conv2d(x, w, None, beta, noise, 1, 1),
        "compiled": lambda x, w, beta, noise: compiled_ref(x, w, None, beta, noise, 1, 1),
        "conv": lambda x, w, beta, noise: F.conv2d(x, w, None, 1, 1),
    }


def _saved_bytes(fn, args) -> int:
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(storages.values())


def _time(stmt, min_run_time, sync):
    def run():
        stmt()
        sync()

    for _ in range(3):  # warm-up (and compilation)
        run()
    return benchmark.Timer(stmt="run()", globals={"run": run}).blocked_autorange(min_run_time=min_run_time).median * 1e3


def measure(device: str, dtype: torch.dtype, min_run_time: float, shapes, batches):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    impls = _implementations()
    rows = []
    for c, px in shapes:
        for n in batches:
            x, w, beta, noise = _inputs(n, c, px, device, dtype)
            fwd, fwdbwd, saved = {}, {}, {}
            for name, fn in impls.items():
                with torch.no_grad():
                    fwd[name] = _time(lambda: fn(x, w, beta, noise), min_run_time, sync)
                xg, bg = x.clone().requires_grad_(), beta.clone().requires_grad_()
                args = (xg, w, bg, noise)

                def step(fn=fn, args=args):
                    out = fn(*args)
                    out.backward(torch.ones_like(out))

                fwdbwd[name] = _time(step, min_run_time, sync)
                saved[name] = _saved_bytes(fn, args) / 2**20
            rows.append(dict(c=c, px=px, n=n, fwd=fwd, fwdbwd=fwdbwd, saved=saved))
            print(
                f"C={c:3d} {px:2d}px N={n:3d}  fwd scop {fwd['scop']:.3f} ms = {fwd['scop'] / fwd['conv']:.2f}x conv, "
                f"{fwd['eager'] / fwd['scop']:.2f}x faster than eager, {fwd['compiled'] / fwd['scop']:.2f}x than compiled | "
                f"fwd+bwd {fwdbwd['scop']:.3f} ms, {fwdbwd['eager'] / fwdbwd['scop']:.2f}x faster than eager",
                flush=True,
            )
    return rows


def table(rows) -> str:
    header = [
        "C", "px", "N",
        "fwd scop ms", "fwd ÷ conv", "fwd eager ÷ scop", "fwd compiled ÷ scop",
        "f+b scop ms", "f+b ÷ conv", "f+b eager ÷ scop", "f+b compiled ÷ scop",
        "saved MiB scop / eager / compiled",
    ]
    body = []
    for r in rows:
        f, b, s = r["fwd"], r["fwdbwd"], r["saved"]
        body.append([
            r["c"], r["px"], r["n"],
            f"{f['scop']:.3f}", f"{f['scop'] / f['conv']:.2f}", f"{f['eager'] / f['scop']:.2f}", f"{f['compiled'] / f['scop']:.2f}",
            f"{b['scop']:.3f}", f"{b['scop'] / b['conv']:.2f}", f"{b['eager'] / b['scop']:.2f}", f"{b['compiled'] / b['scop']:.2f}",
            f"{s['scop']:.1f} / {s['eager']:.1f} / {s['compiled']:.1f}",
        ])
    return _report.markdown_table(header, body)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per measurement")
    parser.add_argument("--quick", action="store_true", help="one batch size, shorter runs")
    parser.add_argument("--write", metavar="README", help="write the table into this markdown file")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    batches = BATCHES[:1] if args.quick else BATCHES
    min_run = 0.3 if args.quick else args.min_run_time
    rows = measure(args.device, dtype, min_run, SHAPES, batches)
    text = table(rows)
    print(text)
    if args.write:
        body = (
            f"## Fused dual-branch convolution ({args.device}, {args.dtype})\n\n"
            f"`{_report.command_line()}` at {_report.git_revision()}; {_report.machine()}.\n"
            f"Backends built: {scop_ext.build_info()}.\n\n"
            "3x3 conv, stride 1, C_in = C_out, 2N images (N real + N knockoff), knockoff bias on. "
            "fwd: forward under no_grad; f+b: forward + backward with the weight frozen and input and "
            "beta requiring grad. Ratios > 1 in the `eager ÷ scop` and `compiled ÷ scop` columns mean "
            "scop is faster; `÷ conv` is scop's time over a bare conv of the 2N batch (target ≤ 1.15 "
            "forward).\n\n" + text
        )
        _report.write_section(args.write, f"ops-{args.device}", body)


if __name__ == "__main__":
    main()
