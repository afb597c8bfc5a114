"""Latency target: is the pruned network as fast as asked, and what does that cost in accuracy?

0. **The model's error** (``error``): predicted ÷ measured latency ratio (pruned ÷ dense) of
   networks at random widths (every group its own fraction around a random overall one).
1. **Measured against target** (``targets``): resnet20, resnet56 and torchvision's resnet18 at
   32x32 (reduced resolution) with random scores (which channels go does not change the time),
   pruned by ``latency_target`` to 30 / 50 / 70% less latency, at batch 64 and batch 1, run as
   built (eager, NCHW) and with BatchNorm folded into the convs in channels_last. Per row: how
   long the latency model took to measure (cold cache) and to solve, the predicted and the
   measured latency ratio (pruned ÷ dense, timed in turns, median and range of the repeats) and
   the model's error at the plan (predicted ÷ measured latency, both relative to dense).
2. **Accuracy at equal measured latency** (``accuracy``): ``resnet_digits`` on the bundled digits,
   SCOP scores (Gaussian knockoffs, Lemma 2 bias) pruned by ``latency_target``; then, at the
   latency that plan measured, ``flops_target`` on the same scores (its FLOPs reduction bisected
   until the measured latency ratio matches) and torch-pruning's ``MagnitudePruner`` (L1, its
   ratio bisected the same way). Top-1 raw, after BN recalibration and after fine-tuning, over seeds.

Times are single-thread (``--threads``), the fastest of 5 blocks per timing (other processes only
add time), the blocks of the networks compared taken in turns (a busy spell of seconds falls on
both); the load average is printed beside the figures. ``--models`` / ``--batches`` /
``--modes`` pick part of the grid, so a long table is measured in several shorter runs: each run's
rows are kept in ``<cache>/latency-<part>-rows.json`` (a rerun replaces its own rows) and the
section shows every row with the run it came from.

    python benchmarks/latency.py --cache runs/bench-cache                     # print
    python benchmarks/latency.py --parts targets --models resnet20 --cache runs/bench-cache --write benchmarks/README.md
    python benchmarks/latency.py --quick                                      # smoke run
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import random
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _baseline  # noqa: E402
import _report  # noqa: E402
import accuracy  # noqa: E402

from scop_ext.models import build_model  # noqa: E402
from scop_ext.prune import LatencyModel, PruningSpace, RandomImportance, apply_plan, count_flops, select
from scop_ext.train.timing import measure_latencies  # noqa: E402

MODES = {"eager": ("eager, NCHW", dict(memory_format="contiguous", fold_bn=False)),
         "deploy": ("BN folded + channels_last", dict(memory_format="channels_last", fold_bn=True))}
TARGETS = (0.3, 0.5, 0.7)
MODELS = ("resnet20", "resnet56", "torchvision:resnet18")
QUICK_CASES = [("resnet20", 64, "eager"), ("resnet20", 1, "deploy")]


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def timed_ratio(dense, pruned, x, batch: int, repeats: int, **how) -> list[float]:
    """Pruned ÷ dense latency, ``repeats`` times (5 blocks each, the two networks' blocks in turns)."""
    return [p / d for d, p in (measure_latencies([dense, pruned], x, batch, "cpu", **how) for _ in range(repeats))]


# --------------------------------------------------------------------------- 1. measured against target


def latency_model(name: str, batch: int, mode: str, cache: str):
    """Dense network, example input, pruning space and latency model (and its build seconds)."""
    torch.manual_seed(0)
    dense = build_model(name, 10, 3).eval()
    x = torch.randn(1, 3, 32, 32)
    space = PruningSpace(dense, x)
    t = time.time()
    lat = LatencyModel(dense, x, space.groups, batch=batch, progress=False, **MODES[mode][1],
                       cache=os.path.join(cache, f"latency-{name.replace(':', '-')}-{mode}-b{batch}.json"))
    return dense, x, space, lat, time.time() - t


def target_rows(cases, targets, cache: str, repeats: int) -> list[dict]:
    rows = []
    for name, batch, mode in cases:
        dense, x, space, lat, build = latency_model(name, batch, mode, cache)
        scores = RandomImportance(seed=0)(dense)
        how = MODES[mode][1]
        for target in targets:
            t = time.time()
            try:
                plan = select(space, scores, "latency_target", latency_model=lat, latency_reduction=target)
            except ValueError as exc:  # beyond what the groups allow at this batch: say so in the table
                rows.append(dict(model=name, batch=batch, mode=mode, target=target, out_of_reach=str(exc)))
                log(f"  {name} b{batch} {mode} -{target:.0%}: {exc}")
                continue
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


def random_widths(sizes, rng: random.Random) -> list[int]:
    """Every group at its own fraction within 0.15 of a random overall fraction in [0.3, 1]."""
    f = rng.uniform(0.3, 1.0)
    return [max(1, min(s, round(s * rng.uniform(f - 0.15, f + 0.15)))) for s in sizes]


def error_rows(cases, plans: int, cache: str, repeats: int) -> list[dict]:
    rows = []
    for name, batch, mode in cases:
        dense, x, space, lat, build = latency_model(name, batch, mode, cache)
        rng, errors = random.Random(0), []
        for _ in range(plans):
            widths = random_widths(lat.sizes, rng)
            plan = {c: [g.index[c][k] for k in range(w, g.size) if k in g.index[c]]
                    for g, w in zip(space.groups, widths) if w < g.size for c in g.convs}
            pruned = apply_plan(copy.deepcopy(dense), x, plan).eval()
            measured = statistics.median(timed_ratio(dense, pruned, x, batch, repeats, **MODES[mode][1]))
            errors.append(lat.predict(widths) / lat.dense_ms / measured)
        rows.append(dict(model=name, batch=batch, mode=mode, errors=errors, build=build, points=lat._table.measured))
        log(f"  {name} b{batch} {mode}: model error " + " ".join(f"{e:.3f}" for e in errors))
    return rows


def error_table(rows) -> str:
    header = ["model", "batch", "run as", "plans", "model error (pred ÷ meas): median (range)",
              "median \|error − 1\|", "build s (points)", "run"]
    body = [[r["model"], r["batch"], MODES[r["mode"]][0], len(r["errors"]),
             f"{statistics.median(r['errors']):.3f} ({min(r['errors']):.3f}–{max(r['errors']):.3f})",
             f"**{statistics.median(abs(e - 1) for e in r['errors']):.3f}**", f"{r['build']:.0f} ({r['points']})",
             r["run"]] for r in rows]
    return _report.markdown_table(header, body)


def target_table(rows) -> str:
    header = ["model", "batch", "run as", "target ratio", "measured ratio: median (range)", "measured ÷ target",
              "predicted ratio", "model error (pred ÷ meas)", "FLOPs ratio", "measure + solve s (points)", "run"]
    body = []
    for r in rows:
        if "out_of_reach" in r:
            body.append([r["model"], r["batch"], MODES[r["mode"]][0], f"{1 - r['target']:.2f}",
                         "out of reach: " + r["out_of_reach"].split(":")[1].split("(")[0].strip(), *["–"] * 5,
                         r["run"]])
            continue
        m, goal = statistics.median(r["measured"]), 1 - r["target"]
        body.append([r["model"], r["batch"], MODES[r["mode"]][0], f"{goal:.2f}",
                     f"{m:.3f} ({min(r['measured']):.3f}–{max(r['measured']):.3f})", f"**{m / goal:.3f}**",
                     f"{r['predicted']:.3f}", f"{r['predicted'] / m:.3f}", f"{r['flops']:.3f}",
                     f"{r['build']:.0f} + {r['solve']:.0f} ({r['points']})", r["run"]])
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
    """Per seed and latency reduction: latency_target, flops_target and Torch-Pruning's magnitude
    pruner at the same measured latency, scored as the accuracy benchmark scores (raw, after BN
    recalibration, after fine-tuning). SCOP's stage 2 is the accuracy benchmark's, from its cache."""
    rows = []
    data = _baseline.splits(task["dataset"], task["root"], subset=task["subset"])
    x = data.train[0][0][None]
    for seed in task["seeds"]:
        base = _baseline.baseline(task["model"], task["dataset"], seed, task["train_epochs"], root=task["root"],
                                  cache=task["cache"], batch_size=task["batch_size"], subset=task["subset"], log=log)
        base_flops = count_flops(base, x)
        ratio_of = lambda m: statistics.median(timed_ratio(base, m.eval(), x, 64, repeats))  # noqa: E731
        with tempfile.TemporaryDirectory() as tmp:
            scored = accuracy._scored(task, "scop", seed, base, data, tmp)
            for target in targets:
                rows += _at_target(task, seed, target, base, scored, data, x, base_flops, ratio_of, tmp)
    return rows


def _at_target(task, seed, target, base, scored, data, x, base_flops, ratio_of, tmp) -> list[dict]:
    cfg = accuracy._config(task, "scop", seed, 0.5)
    lat_cfg = dataclasses.replace(cfg, policy="latency_target", latency_reduction=target, latency_cache=task["cache"])
    lt = accuracy._pruner(lat_cfg, copy.deepcopy(scored), data, os.path.join(tmp, f"latency-{target}"))
    try:
        lt.select()
    except ValueError as exc:  # this seed's network cannot get that fast: a gap in the table
        log(f"  seed {seed} -{target:.0%}: {exc}")
        return [dict(seed=seed, target=target, out_of_reach=True)]
    lt.prune()
    goal = ratio_of(lt.model)
    measured = {"latency_target": goal}

    def flops_at(f):
        p = accuracy._pruner(dataclasses.replace(cfg, flops_reduction=f), copy.deepcopy(scored), data,
                             os.path.join(tmp, f"flops-{target}-{f}"))
        p.select()
        return p.prune()

    ft_model, measured["flops_target"] = _bisect(flops_at, ratio_of, goal, 0.0, 0.95, 7)
    tp_model, measured["tp-magnitude"] = _bisect(lambda r: accuracy.tp_pruned(base, x, "magnitude", r), ratio_of, goal,
                                                 0.0, 0.95, 7)
    rows = []
    for method, model in (("latency_target", lt.model), ("flops_target", ft_model), ("tp-magnitude", tp_model)):
        p = accuracy._pruner(cfg, model, data, os.path.join(tmp, f"finish-{method}-{target}"))
        row = accuracy._finish(p, base_flops, x, data.test, task["device"])
        row.update(method=method, seed=seed, target=target, ratio=measured[method])
        rows.append(row)
        log(f"  seed {seed} -{target:.0%} {method}: latency x{measured[method]:.3f}, "
            f"top-1 {100 * row['raw']:.1f} / {100 * row['bn']:.1f} / {100 * row['finetuned']:.1f}")
    return rows


def accuracy_table(rows, targets, model: str) -> str:
    pm = _baseline.pm
    parts = []
    for target in targets:
        body = []
        missing = sum(1 for r in rows if r.get("out_of_reach") and r["target"] == target)
        for method in ("latency_target", "flops_target", "tp-magnitude"):
            sel = [r for r in rows if r.get("method") == method and r["target"] == target]
            body.append([method, pm((r["ratio"] for r in sel), 1, 3), pm((r["flops_reduction"] for r in sel), 100, 1) + "%",
                         pm((r["raw"] for r in sel), 100, 1), pm((r["bn"] for r in sel), 100, 1),
                         f"**{pm((r['finetuned'] for r in sel), 100, 2)}**"])
        gap = f" ({missing} seed(s) left out: the target was out of reach)" if missing else ""
        parts.append(f"**{model}, latency_target at {100 * target:.0f}% less latency (batch 64, eager)**{gap}\n\n"
                     + _report.markdown_table(["method", "measured latency ratio", "FLOPs ↓", "top-1 raw",
                                               "+ BN recalibration", "+ fine-tuning"], body))
    return "\n\n".join(parts)


# --------------------------------------------------------------------------- main


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="error,targets,accuracy")
    parser.add_argument("--models", default=",".join(MODELS), help="models of the error and targets parts")
    parser.add_argument("--batches", default="64,1", help="batches of the targets part (error: 64 only)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"of {list(MODES)}")
    parser.add_argument("--plans", type=int, default=8, help="random-width networks per case in the error part")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--accuracy-targets", default="0.5", help="latency reductions for the accuracy table")
    parser.add_argument("--dataset", default="digits", choices=["digits", "fashion-mnist"], help="of the accuracy part")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--train-epochs", type=int, help="default: the dataset's recipe (benchmarks/_baseline.py)")
    parser.add_argument("--scales-epochs", type=int)
    parser.add_argument("--finetune-epochs", type=int)
    parser.add_argument("--repeats", type=int, default=5, help="dense/pruned timings (5 blocks each, in turns) per ratio")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", help="folder for baselines, latency tables and rows (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="two cases, one target, one seed, short runs")
    parser.add_argument("--write", metavar="README", help="write the tables into this file's `latency-error` / "
                        "`latency-targets` / `latency-accuracy` sections")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models, modes = args.models.split(","), args.modes.split(",")
    cases = [(m, int(b), mode) for m in models for b in args.batches.split(",") for mode in modes]
    targets, acc_targets = TARGETS, tuple(float(t) for t in args.accuracy_targets.split(","))
    if args.quick:
        cases, targets, args.seeds, args.train_epochs, args.scales_epochs, args.finetune_epochs, args.plans = \
            QUICK_CASES, (0.5,), 1, 3, 2, 2, 2
    parts = args.parts.split(",")
    with tempfile.TemporaryDirectory() as scratch:
        cache = args.cache or scratch
        if "error" in parts:
            run, t = _run_start(), time.time()
            rows = error_rows([c for c in cases if c[1] == 64] or cases, args.plans, cache, args.repeats)
            rows, runs = _merge(cache, "error", rows, _run_end(run, t), ("model", "batch", "mode"))
            _emit(args.write, "latency-error", ["### The latency model's error", "", _runs_text(runs), "",
                                                error_table(rows), "", ERROR_READING])
        if "targets" in parts:
            run, t = _run_start(), time.time()
            rows = target_rows(cases, targets, cache, args.repeats)
            rows, runs = _merge(cache, "targets", rows, _run_end(run, t), ("model", "batch", "mode", "target"))
            body = ["## Latency target", "", "### Measured against target", "", _runs_text(runs), "",
                    target_table(rows), "", READING]
            _emit(args.write, "latency-targets", body)
        if "accuracy" in parts:
            load, t = _baseline.load_line(), time.time()
            recipe = _baseline.RECIPES[args.dataset]
            task = dict(recipe, dataset=args.dataset, root=args.data_root, cache=cache, device="cpu", subset=None,
                        seeds=list(range(args.seeds)))
            for key in ("train_epochs", "scales_epochs", "finetune_epochs"):
                task[key] = getattr(args, key) if getattr(args, key) is not None else task[key]
            rows = accuracy_rows(task, acc_targets, args.repeats)
            body = [f"### Accuracy at equal measured latency: {args.dataset}", "", f"`{_report.command_line()}` at "
                    f"{_report.git_revision()}; {_report.machine()}; {load}; {(time.time() - t) / 60:.1f} min, load "
                    f"average at the end {_baseline.load_now()}.", "", accuracy_table(rows, acc_targets, task["model"]),
                    "", f"{args.seeds} seeds (mean ± std); baseline {task['train_epochs']} epochs, SCOP stage 2 "
                    f"{task['scales_epochs']} epochs with scop's default settings (the accuracy benchmark's, from its "
                    f"cache), BN recalibration on ≤ 50 batches, {task['finetune_epochs']} fine-tuning epochs at lr "
                    f"{task['finetune_lr']}, as in the accuracy section. The latency ratios are measured like the table "
                    "above (batch 64, eager); flops_target and Torch-Pruning's magnitude pruner are bisected to within "
                    "3% of latency_target's measured ratio (or the closest of 7 steps)."]
            _emit(args.write, "latency-accuracy" + ("" if args.dataset == "digits" else f"-{args.dataset}"), body)


def _run_start() -> dict:
    return dict(command=_report.command_line(), revision=_report.git_revision(), machine=_report.machine(),
                load=_baseline.load_line())


def _run_end(run: dict, started: float) -> dict:
    return {**run, "minutes": (time.time() - started) / 60, "load_end": _baseline.load_now()}


def _merge(cache: str, part: str, rows: list[dict], run: dict, key: tuple[str, ...]) -> tuple[list[dict], list[dict]]:
    """This run's rows joined to those earlier runs left in ``<cache>/latency-<part>-rows.json``
    (a row of the same ``key`` is replaced); every row names its run by number."""
    path = os.path.join(cache, f"latency-{part}-rows.json")
    stored = json.load(open(path)) if os.path.exists(path) else {"runs": [], "rows": []}
    ours = {tuple(r[k] for k in key) for r in rows}
    kept = [r for r in stored["rows"] if tuple(r[k] for k in key) not in ours]
    runs = stored["runs"] + [run]
    merged = kept + [{**r, "run": len(runs)} for r in rows]
    used = sorted({r["run"] for r in merged})
    renumber = {old: new for new, old in enumerate(used, 1)}
    merged = [{**r, "run": renumber[r["run"]]} for r in merged]
    runs = [runs[old - 1] for old in used]
    order = {m: i for i, m in enumerate(MODELS)}
    merged.sort(key=lambda r: (order.get(r["model"], 99), -r["batch"], r["mode"], -r.get("target", 0)))
    os.makedirs(cache, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"runs": runs, "rows": merged}, f, indent=1)
    return merged, runs


def _runs_text(runs: list[dict]) -> str:
    return "\n".join(f"Run {i}: `{r['command']}` at {r['revision']}; {r['machine']}; {r['load']}; "
                     f"{r['minutes']:.1f} min, load average at the end {r['load_end']}.  " for i, r in enumerate(runs, 1))


def _emit(readme: str | None, section: str, lines: list[str]) -> None:
    text = "\n".join(lines)
    print(text + "\n")
    if readme:
        _report.write_section(readme, section, text)


ERROR_READING = ("Each plan keeps every group at its own fraction (within 0.15) of a random overall fraction in "
                 "[0.3, 1]; *model error*: the latency model's predicted ratio (pruned ÷ dense) ÷ the measured one, "
                 "timed as in the targets table (median of the repeats). *build*: seconds to measure the "
                 "latency model (cold cache unless an earlier part filled it); *points*: table entries measured.")


READING = ("*ratio*: latency of the pruned network ÷ the dense one: each network's fastest of 5 blocks, "
           "the blocks of the two in turns, repeated (median and range of the repeats); the target ratio is 1 − the reduction asked for. *predicted*: the "
           "latency model's ratio for the plan; *model error*: predicted ÷ measured ratio. *measure + solve*: "
           "seconds to build the latency model (dense network and table; cold cache) and to solve and calibrate "
           "one target; *points*: distinct (conv shape, C_in, C_out) timings in the table so far. Random scores: "
           "the widths, not the channels, set the time.")


if __name__ == "__main__":
    main()
