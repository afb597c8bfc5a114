"""What each ``block_width`` costs and saves at one uniform rate: FLOPs, params and CPU latency.

The authors' preset (stem and shortcut convs left whole, one rate per layer) on a CIFAR ResNet,
with ``block_width`` prune, keep and scatter beside the dense network. Scores do not matter for
the counts (a uniform rate removes the same number of filters whichever they are) and random
weights time like trained ones. Latency is the median of ``--rounds`` rounds, variants
interleaved within each round (dense, prune, keep, scatter, dense, ...); ratios to dense are
taken within a round, then their median and range reported.

    python benchmarks/block_width.py                                  # print the table
    python benchmarks/block_width.py --write benchmarks/README.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _baseline  # noqa: E402
import _report  # noqa: E402

from scop_ext import models  # noqa: E402
from scop_ext.run.config import PruneConfig  # noqa: E402
from scop_ext.run.dry_run import pruned_copy, stand_in_scores  # noqa: E402
from scop_ext.prune import count_flops, count_params  # noqa: E402
from scop_ext.prune.latency import measure_latency  # noqa: E402

MODES = ("prune", "keep", "scatter")


def variants(model_name: str, ratio: float) -> dict[str, torch.nn.Module]:
    """The dense model and its pruned copies, one per block width, under the authors' preset."""
    torch.manual_seed(0)
    dense = models.build_model(model_name, 10, 3).eval()
    x = models.example_input(model_name, 3)
    result = {"dense": dense}
    for mode in MODES:
        config = PruneConfig.from_dict({"preset": "authors", "ratio": ratio, "block_width": mode})
        result[mode] = pruned_copy(dense, x, config, stand_in_scores("random", dense, config))[0].eval()
    return result


def timings(nets: dict[str, torch.nn.Module], x: torch.Tensor, batch: int, rounds: int) -> dict[str, list[float]]:
    ms = {name: [] for name in nets}
    for _ in range(rounds):
        for name, net in nets.items():  # interleaved: load changes hit every variant alike
            ms[name].append(measure_latency(net, x, batch, "cpu", min_run_time=0.3))
    return ms


def section(model_name: str, ratio: float, batches: list[int], rounds: int) -> str:
    nets = variants(model_name, ratio)
    x = models.example_input(model_name, 3)
    f0, p0 = count_flops(nets["dense"], x), count_params(nets["dense"])
    rows = {name: [name if name == "dense" else f"`{name}`", f"{100 * (1 - count_flops(net, x) / f0):.1f}%",
                   f"{100 * (1 - count_params(net) / p0):.1f}%"] for name, net in nets.items()}
    for batch in batches:
        ms = timings(nets, x, batch, rounds)
        for name in nets:
            ratios = [a / d for a, d in zip(ms[name], ms["dense"])]
            rows[name] += [f"{statistics.median(ms[name]):.2f} ({min(ms[name]):.2f}–{max(ms[name]):.2f})",
                           f"{statistics.median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f})"]
    header = ["block_width", "FLOPs ↓", "params ↓"]
    for batch in batches:
        header += [f"ms, batch {batch}: median (range)", f"÷ dense, batch {batch}"]
    return _report.markdown_table(header, list(rows.values()))


def flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            line = next(line for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return "CPU flags unknown"
    have = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in line.split()]
    return "CPU flags: " + (", ".join(have) or "none of avx2/avx512f/avx512_bf16/amx_tile")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--ratio", type=float, default=0.45)
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", help="README to write the block_width section of")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = _baseline.load_line()
    table = section(args.model, args.ratio, args.batch, args.rounds)
    body = "\n\n".join([
        "## Block widths: what pruning, keeping or scattering the residual channels buys",
        f"`{_report.command_line()}` at {_report.git_revision()}; {_report.machine()}; {flags()}; {start}, "
        f"{_baseline.load_now()} at the end.",
        f"`{args.model}` under `preset: authors` at rate {args.ratio} (stem and shortcut convs whole), one "
        f"image at 32×32 for FLOPs/params; forward latency in eval mode, fp32, {args.rounds} interleaved rounds.",
        table,
    ])
    print(body)
    if args.write:
        _report.write_section(args.write, "block_width", body)


if __name__ == "__main__":
    main()
