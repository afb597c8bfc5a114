"""Latency target: is the pruned network as fast as asked, and what does that cost in accuracy?

1. **Measured against target** (``targets``): resnet20, resnet56 and torchvision's resnet18 at
   32x32 (reduced resolution) with random scores (which channels go does not change the time),
   pruned by ``latency_target`` to 30 / 50 / 70% less latency, at batch 64 and batch 1, run as
   built (eager, NCHW) and with BatchNorm folded into the convs in channels_last. Per row: how
   long the latency model took to measure (cold cache) and to solve, the predicted and the
   measured latency ratio (pruned ÷ dense, timed in turns, median and range of the pairs) and
   the model's error at the plan (predicted ÷ measured latency, both relative to dense).
2. **Accuracy at equal measured latency** (``accuracy``): ``resnet_digits`` on the bundled digits,
   SCOP scores (Gaussian knockoffs, Lemma 2 bias) pruned by ``latency_target``; then, at the
   latency that plan measured, ``flops_target`` on the same scores (its FLOPs reduction bisected
   until the measured latency ratio matches) and torch-pruning's ``MagnitudePruner`` (L1, its
   ratio bisected the same way). Top-1 raw, after BN recalibration and after fine-tuning, over seeds.

Times are single-thread (``--threads``), the fastest of 5 blocks per timing (other processes only
add time); the load average is printed beside the figures.

    python benchmarks/latency.py --cache runs/bench-cache                     # print
    python benchmarks/latency.py --cache runs/bench-cache --write benchmarks/README.md
    python benchmarks/latency.py --quick                                      # smoke run
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _baseline  # noqa: E402
import _report  # noqa: E402
from accuracy import _config, _finish, _generator, tp_pruned  # noqa: E402

from scop_ext.models import build_model, example_input  # noqa: E402
from scop_ext.pipeline import ScopPruner  # noqa: E402
from scop_ext.prune import (  # noqa: E402
    LatencyModel, PruningSpace, RandomImportance, apply_plan, count_flops, select,
)
from scop_ext.timing import measure_latency  # noqa: E402

MODES = {"eager": ("eager, NCHW", dict(memory_format="contiguous", fold_bn=False)),
         "deploy": ("BN folded + channels_last", dict(memory_format="channels_last", fold_bn=True))}
TARGETS = (0.3, 0.5, 0.7)
# (model, batch, mode): the grid trimmed to what a shared 2-core machine runs in minutes.
CASES = [("resnet20", 64, "eager"), ("resnet20", 64, "deploy"), ("resnet20", 1, "eager"), ("resnet56", 64, "eager"),
         ("torchvision:resnet18", 64, "eager")]
QUICK_CASES = [("resnet20", 64, "eager"), ("resnet20", 1, "deploy")]


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def timed_ratio(dense, pruned, x, batch: int, repeats: int, **how) -> list[float]:
    """Pruned ÷ dense latency, timed in turns ``repeats`` times (one ratio per pair)."""
    return [measure_latency(pruned, x, batch, "cpu", min_run_time=0.25, **how)
            / measure_latency(dense, x, batch, "cpu", min_run_time=0.25, **how) for _ in range(repeats)]


# --------------------------------------------------------------------------- 1. measured against target


def target_rows(cases, targets, cache: str, repeats: int) -> list[dict]:
    rows = []
    for name, batch, mode in cases:
        torch.manual_seed(0)
        dense = build_model(name, 10, 3).eval()
        x = torch.randn(1, 3, 32, 32)
        space = PruningSpace(dense, x)
        scores = RandomImportance(seed=0)(dense)
        how = MODES[mode][1]
        tag = name.replace(":", "-")
        t = time.time()
        lat = LatencyModel(dense, x, space.groups, batch=batch, progress=False, **how,
                           cache=os.path.join(cache, f"latency-{tag}-{mode}-b{batch}.json"))
        build = time.time() - t
        for target in targets:
            t = time.time()
            plan = select(space, scores, "latency_target", latency_model=lat, latency_reduction=target)
            solve = time.time() - t
            pruned = apply_plan(copy.deepcopy(dense), x, plan).eval()
            ratios = timed_ratio(dense, pruned, x, batch, repeats, **how)
            predicted = lat.predict_plan(plan) / lat.dense_ms
            rows.append(dict(model=name, batch=batch, mode=mode, target=target, build=build, solve=solve,
                             points=lat._table.measured, predicted=predicted, measured=ratios,
                             flops=count_flops(pruned, x) / count_flops(dense, x)))
            log(f"  {name} b{batch} {mode} -{target:.0%}: predicted x{predicted:.3f}, measured "
                f"x{statistics.median(ratios):.3f} ({solve:.0f} s)")
    return rows


def target_table(rows) -> str:
    header = ["model", "batch", "run as", "target ratio", "measured ratio: median (range)", "measured ÷ target",
              "predicted ratio", "model error (pred ÷ meas)", "FLOPs ratio", "measure + solve s (points)"]
    body = []
    for r in rows:
        m, goal = statistics.median(r["measured"]), 1 - r["target"]
        body.append([r["model"], r["batch"], MODES[r["mode"]][0], f"{goal:.2f}",
                     f"{m:.3f} ({min(r['measured']):.3f}–{max(r['measured']):.3f})", f"**{m / goal:.3f}**",
                     f"{r['predicted']:.3f}", f"{r['predicted'] / m:.3f}", f"{r['flops']:.3f}",
                     f"{r['build']:.0f} + {r['solve']:.0f} ({r['points']})"])
    return _report.markdown_table(header, body)


# --------------------------------------------------------------------------- 2. accuracy at equal latency


def _bisect(prune_at, ratio_of, goal: float, lo: float, hi: float, steps: int):
    """The pruned model whose measured latency ratio is closest to ``goal`` over a bisection of
    ``prune_at``'s argument (a larger argument prunes more)."""
    best = None
    for _ in range(steps):
        mid = (lo + hi) / 2
        model = prune_at(mid)
        r = ratio_of(model)
        if best is None or abs(r - goal) < abs(best[1] - goal):
            best = (model, r)
        if abs(r / goal - 1) <= 0.03:
            break
        lo, hi = (mid, hi) if r > goal else (lo, mid)
    return best


def accuracy_rows(task: dict, targets, repeats: int) -> list[dict]:
    rows = []
    for seed in task["seeds"]:
        base = _baseline.baseline(task["model"], task["dataset"], seed, task["train_epochs"], cache=task["cache"],
                                  log=log)
        x = example_input(task["model"], 1)
        base_flops = count_flops(base, x)
        ratio_of = lambda m: statistics.median(timed_ratio(base, m.eval(), x, 64, repeats))  # noqa: E731
        with tempfile.TemporaryDirectory() as tmp:
            scorer = ScopPruner(_config(task, seed, "scop", "gaussian", True), os.path.join(tmp, "s"),
                                model=copy.deepcopy(base), progress=False, log=lambda *a: None)
            scorer.knockoffs = _generator(task, "gaussian", seed, scorer.train_set)
            scorer.convert()
            scorer.learn_scales()
            for target in targets:
                def pruner(cfg, model, name):
                    return ScopPruner(cfg, os.path.join(tmp, f"{name}-{target}"), model=model, progress=False,
                                      log=lambda *a: None)

                cfg = _config(task, seed, "scop", "gaussian", True, target)
                lat_cfg = dataclasses.replace(cfg, policy="latency_target", latency_reduction=target,
                                              latency_cache=task["cache"])
                lt = pruner(lat_cfg, copy.deepcopy(scorer.model), "latency")
                lt.select()
                lt.prune()
                goal = ratio_of(lt.model)
                measured = {"latency_target": goal}

                def flops_at(f):
                    p = pruner(dataclasses.replace(cfg, flops_reduction=f), copy.deepcopy(scorer.model), "flops")
                    p.select()
                    return p.prune()

                ft_model, measured["flops_target"] = _bisect(flops_at, ratio_of, goal, 0.0, 0.95, 7)
                tp_model, measured["MagnitudePruner"] = _bisect(lambda r: tp_pruned(base, x, r),
                                                                ratio_of, goal, 0.0, 0.95, 7)
                for method, model in (("latency_target", lt.model), ("flops_target", ft_model),
                                      ("MagnitudePruner", tp_model)):
                    p = pruner(cfg, model, f"finish-{method}")
                    row = _finish(p, base_flops, x, p.test_set)
                    row.update(method=method, seed=seed, target=target, ratio=measured[method])
                    rows.append(row)
                    log(f"  seed {seed} -{target:.0%} {method}: latency x{measured[method]:.3f}, "
                        f"top-1 {100 * row['raw']:.1f} / {100 * row['recal']:.1f} / {100 * row['final']:.1f}")
    return rows


def accuracy_table(rows, targets) -> str:
    pm = _baseline.pm
    parts = []
    for target in targets:
        body = []
        for method in ("latency_target", "flops_target", "MagnitudePruner"):
            sel = [r for r in rows if r["method"] == method and r["target"] == target]
            body.append([method, pm((r["ratio"] for r in sel), 1, 3), pm((r["reduction"] for r in sel), 100, 1) + "%",
                         pm((r["raw"] for r in sel), 100, 1), pm((r["recal"] for r in sel), 100, 1),
                         f"**{pm((r['final'] for r in sel), 100, 2)}**"])
        parts.append(f"**resnet_digits, latency_target at {100 * target:.0f}% less latency (batch 64, eager)**\n\n"
                     + _report.markdown_table(["method", "measured latency ratio", "FLOPs ↓", "top-1 raw",
                                               "+ BN recalibration", "+ fine-tuning"], body))
    return "\n\n".join(parts)


# --------------------------------------------------------------------------- main


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="targets,accuracy")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--accuracy-targets", default="0.5", help="latency reductions for the accuracy table")
    parser.add_argument("--train-epochs", type=int, default=15)
    parser.add_argument("--scales-epochs", type=int, default=10)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5, help="dense/pruned timing pairs per ratio")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", help="folder for baselines and latency tables (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="two cases, one target, one seed, short runs")
    parser.add_argument("--write", metavar="README",
                        help="write the tables into this file's `latency-targets` / `latency-accuracy` sections")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases, targets, acc_targets = CASES, TARGETS, tuple(float(t) for t in args.accuracy_targets.split(","))
    if args.quick:
        cases, targets, args.seeds, args.train_epochs, args.scales_epochs, args.finetune_epochs = \
            QUICK_CASES, (0.5,), 1, 3, 2, 2
    parts = args.parts.split(",")
    with tempfile.TemporaryDirectory() as scratch:
        cache = args.cache or scratch
        if "targets" in parts:
            load, t = _baseline.load_line(), time.time()
            rows = target_rows(cases, targets, cache, args.repeats)
            body = ["## Latency target", "", f"`{_report.command_line()}` at {_report.git_revision()}; "
                    f"{_report.machine()}; {load}; {(time.time() - t) / 60:.1f} min, load average at the end "
                    f"{_baseline.load_now()}.", "", "### Measured against target", "", target_table(rows), "", READING]
            _emit(args.write, "latency-targets", body)
        if "accuracy" in parts:
            load, t = _baseline.load_line(), time.time()
            task = dict(model="resnet_digits", dataset="digits", root=None, cache=cache, device="cpu", batch_size=64,
                        seeds=list(range(args.seeds)), train_epochs=args.train_epochs,
                        scales_epochs=args.scales_epochs, finetune_epochs=args.finetune_epochs, finetune_lr=0.02)
            rows = accuracy_rows(task, acc_targets, args.repeats)
            body = ["### Accuracy at equal measured latency", "", f"`{_report.command_line()}` at "
                    f"{_report.git_revision()}; {_report.machine()}; {load}; {(time.time() - t) / 60:.1f} min, load "
                    f"average at the end {_baseline.load_now()}.", "", accuracy_table(rows, acc_targets), "",
                    f"{args.seeds} seeds (mean ± std); baseline {args.train_epochs} epochs, SCOP stage 2 "
                    f"{args.scales_epochs} epochs (Gaussian knockoffs, Lemma 2 bias), BN recalibration on ≤ 50 "
                    f"batches, {args.finetune_epochs} fine-tuning epochs, as in the accuracy section. The latency "
                    "ratios are measured like the table above (batch 64, eager); flops_target and the "
                    "MagnitudePruner are bisected to within 3% of latency_target's measured ratio (or the closest "
                    "of 7 steps)."]
            _emit(args.write, "latency-accuracy", body)


def _emit(readme: str | None, section: str, lines: list[str]) -> None:
    text = "\n".join(lines)
    print(text + "\n")
    if readme:
        _report.write_section(readme, section, text)


READING = ("*ratio*: latency of the pruned network ÷ the dense one, both timed the same way in turns "
           "(the range is over the pairs); the target ratio is 1 − the reduction asked for. *predicted*: the "
           "latency model's ratio for the plan; *model error*: predicted ÷ measured ratio. *measure + solve*: "
           "seconds to build the latency model (dense network and table; cold cache) and to solve and calibrate "
           "one target; *points*: distinct (conv shape, C_in, C_out) timings in the table so far. Random scores: "
           "the widths, not the channels, set the time.")


if __name__ == "__main__":
    main()
