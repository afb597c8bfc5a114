"""Accuracy at equal FLOPs: does SCOP pick better filters than magnitude criteria?

For each seed one baseline is trained (or read from ``--cache``); every method then prunes a
copy of that same network to 30 / 50 / 70% fewer FLOPs. Reported per method and level, over the
seeds: test top-1 right after pruning (``raw``), after the BatchNorm statistics are re-estimated
on training data (``bn``) and after a fixed fine-tuning budget (``finetuned``: the epoch best on
a held-out 10% of the training split, scored on the test split, which chooses nothing), and each
seed's difference from scop's default, paired by baseline.

Methods:

- ``scop``: ``PruneConfig``'s defaults (Gaussian knockoffs, the Lemma 2 bias, BN over the
  paired batch, importance ``2 beta - 1``, ``flops_target`` with one uniform ratio per layer);
- ``scop-authors``: ``preset: authors`` (no knockoff bias, stem and shortcuts unwrapped,
  ``|gamma| (2 beta - 1)``, block-final convs scattered back to full width), at the same FLOPs;
- ``l1``, ``bn_scale``, ``random``: our criteria through the same selection and surgery as scop;
- ``tp-magnitude``, ``tp-bn_scale``, ``tp-lamp``, ``tp-fpgm``, ``tp-taylor``: Torch-Pruning's own
  ``BasePruner`` with its importance of that name (its defaults; Taylor on the gradients of 8
  training batches), its ``pruning_ratio`` bisected until the FLOPs reduction is within a point of
  the level (its own grouping and normalisation). Each prunes one uniform ratio per layer except
  LAMP, which ranks globally: LAMP only rescales each layer's magnitudes, so per layer it would
  remove exactly what ``tp-magnitude`` removes.

Every (method, seed, level) result is cached under ``--cache`` as soon as it exists, and every
SCOP stage 2 too, so a stopped run continues where it was (rerun the same command). Wall time is
printed for every part.

    python benchmarks/accuracy.py --dataset fashion-mnist --cache runs/bench-cache --jobs 2 \\
        --write benchmarks/README.md --json benchmarks/results/accuracy-fashion-mnist.json
    python benchmarks/accuracy.py --dataset fashion-mnist --quick       # CI's smoke check, minutes
    python benchmarks/accuracy.py --cache runs/bench-cache               # the bundled digits

Nothing is downloaded: Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package (or
``--data-root``), CIFAR-10 from a local copy (``--dataset cifar10 --data-root DIR``).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import multiprocessing
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _baseline  # noqa: E402
import _report  # noqa: E402

from scop_ext.prune import count_flops, make_importance, make_policy  # noqa: E402
from scop_ext.run.config import PruneConfig  # noqa: E402
from scop_ext.run import ScopPruner  # noqa: E402

# name: PruneConfig values (our methods) or ("tp", importance) for Torch-Pruning's pruner
METHODS = {
    "scop": {},
    "scop-authors": {"preset": "authors"},
    "l1": {"importance": "l1"},
    "bn_scale": {"importance": "bn_scale"},
    "random": {"importance": "random"},
    "tp-magnitude": ("tp", "magnitude"),
    "tp-bn_scale": ("tp", "bn_scale"),
    "tp-lamp": ("tp", "lamp"),  # global ranking: LAMP's scores only differ from magnitude's across layers
    "tp-fpgm": ("tp", "fpgm"),
    "tp-taylor": ("tp", "taylor"),
}
LEVELS = (0.3, 0.5, 0.7)
STAGES = ("raw", "bn", "finetuned")


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- Torch-Pruning


def _tp_importance(name: str):
    import torch_pruning as tp

    return {"magnitude": tp.importance.MagnitudeImportance, "bn_scale": tp.importance.BNScaleImportance,
            "lamp": tp.importance.LAMPImportance, "fpgm": tp.importance.FPGMImportance,
            "taylor": tp.importance.TaylorImportance}[name]()


def tp_pruned(model, example, name: str, ratio: float, grad_batches=()):
    """A copy of ``model`` pruned by Torch-Pruning's ``BasePruner`` with importance ``name`` at
    ``pruning_ratio=ratio`` (the classifier is left alone). Taylor reads the gradients of the loss
    on ``grad_batches``, accumulated on the copy first."""
    import torch_pruning as tp

    m = copy.deepcopy(model)
    if name == "taylor":
        m.zero_grad()
        for x, y in grad_batches:
            F.cross_entropy(m(x), y).backward()
    fc = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    tp.pruner.BasePruner(m, example, importance=_tp_importance(name), pruning_ratio=ratio, ignored_layers=fc,
                         global_pruning=name == "lamp").step()
    m.zero_grad(set_to_none=True)
    return m


def tp_prune(model, example, name: str, level: float, grad_batches=(), tolerance: float = 0.01):
    """``(copy pruned to the FLOPs level, achieved reduction)``: the pruner's ratio bisected; the
    closest found when no ratio lands within ``tolerance``."""
    base = count_flops(model, example)
    lo, hi, best = 0.0, 0.95, None
    for _ in range(30):
        mid = (lo + hi) / 2
        m = tp_pruned(model, example, name, mid, grad_batches)
        achieved = 1 - count_flops(m, example) / base
        if best is None or abs(achieved - level) < abs(best[1] - level):
            best = (m, achieved)
        if abs(achieved - level) <= tolerance:
            break
        lo, hi = (mid, hi) if achieved < level else (lo, mid)
    return best


# --------------------------------------------------------------------------- one (method, seed)


def _config(task: dict, method: str, seed: int, level: float) -> PruneConfig:
    values = {"model": task["model"], "dataset": task["dataset"], "data_root": task["root"],
              "batch_size": task["batch_size"], "scales_epochs": task["scales_epochs"],
              "finetune_epochs": task["finetune_epochs"], "finetune_lr": task["finetune_lr"], "bn_batches": 50,
              "device": task["device"], "seed": seed, "latency": False, "policy": "flops_target",
              "flops_reduction": level, **task.get("scop", {})}
    spec = METHODS[method]
    values.update(spec if isinstance(spec, dict) else {"importance": "l1"})
    return PruneConfig.from_dict(values)


def _signature(task: dict, method: str) -> str:
    keys = ("model", "dataset", "subset", "train_epochs", "batch_size", "scales_epochs", "finetune_epochs",
            "finetune_lr", "scop")
    text = json.dumps([method, METHODS[method], {k: task.get(k) for k in keys}], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _row_path(task: dict, method: str, seed: int, level: float) -> str:
    return os.path.join(task["cache"], "accuracy", f"{task['dataset']}-{task['model']}",
                        f"{method}-s{seed}-l{level}-{_signature(task, method)}.json")


def _write_json(path: str, value) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(value, f)
    os.replace(path + ".tmp", path)


def _scored(task: dict, method: str, seed: int, base, data, tmp: str):
    """The model whose scores select: for SCOP, ``base`` after stage 2 (cached); else ``base``."""
    spec = METHODS[method]
    if not isinstance(spec, dict) or spec.get("importance", "scop") != "scop":
        return base
    from safetensors.torch import load_file, save_file
    from scop_ext.nn import convert

    cfg = _config(task, method, seed, 0.5)
    path = os.path.join(task["cache"], "accuracy", f"{task['dataset']}-{task['model']}",
                        f"scales-{method}-s{seed}-{_signature(task, method)}.safetensors")
    model = copy.deepcopy(base)
    if os.path.exists(path):
        convert(model, skip=cfg.skip)
        model.load_state_dict(load_file(path))
        return model
    start = time.time()
    pruner = _pruner(cfg, model, data, os.path.join(tmp, "scales"))
    pruner.fit_knockoffs()
    pruner.convert()
    pruner.learn_scales()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in pruner.model.state_dict().items()}, path + ".tmp")
    os.replace(path + ".tmp", path)
    log(f"  {method} seed {seed}: knockoffs + stage 2 in {time.time() - start:.0f} s")
    return pruner.model


def _pruner(cfg: PruneConfig, model, data, out: str) -> ScopPruner:
    importance = make_importance(cfg.importance, **cfg.importance_params())
    policy = make_policy(cfg.policy, **cfg.policy_params())
    return ScopPruner(model, data.train[0][0][None], importance, policy, data=data, config=cfg, out_dir=out,
                      progress=False, log=lambda *a, **k: None)


def run_unit(task: dict, method: str, seed: int) -> None:
    """Every level of one method on one seed's baseline; each row is cached when done."""
    torch.set_num_threads(task["threads"])
    todo = [lv for lv in task["levels"] if not os.path.exists(_row_path(task, method, seed, lv))]
    if not todo:
        return
    data = _baseline.splits(task["dataset"], task["root"], subset=task["subset"])
    base = _baseline.baseline(task["model"], task["dataset"], seed, task["train_epochs"], root=task["root"],
                              cache=task["cache"], device=task["device"], batch_size=task["batch_size"],
                              subset=task["subset"], log=log)
    example = data.train[0][0][None].to(task["device"])
    base_flops = count_flops(base, example)
    with tempfile.TemporaryDirectory() as tmp:
        scored = _scored(task, method, seed, base, data, tmp)
        for level in todo:
            start = time.time()
            cfg = _config(task, method, seed, level)
            spec = METHODS[method]
            if isinstance(spec, tuple):
                grads = _grad_batches(data, task, seed) if spec[1] == "taylor" else ()
                model, _ = tp_prune(base, example, spec[1], level, grads)
                pruner = _pruner(cfg, model, data, os.path.join(tmp, f"l{level}"))
            else:
                pruner = _pruner(cfg, copy.deepcopy(scored), data, os.path.join(tmp, f"l{level}"))
                pruner.select()
                pruner.prune()
            row = _finish(pruner, base_flops, example, data.test, task["device"])
            row["seconds"] = time.time() - start
            _write_json(_row_path(task, method, seed, level), row)
            log(f"  {method} seed {seed} {level:.0%}: raw {100 * row['raw']:.1f} bn {100 * row['bn']:.1f} "
                f"finetuned {100 * row['finetuned']:.2f} (FLOPs -{100 * row['flops_reduction']:.1f}%) "
                f"in {row['seconds']:.0f} s")


def _grad_batches(data, task: dict, seed: int, count: int = 8):
    loader = _baseline.make_loader(data.train, task["batch_size"], shuffle=True, seed=seed)
    batches = []
    for x, y in loader:
        batches.append((x.to(task["device"]), y.to(task["device"])))
        if len(batches) == count:
            break
    return batches


def _finish(pruner: ScopPruner, base_flops: int, example, test, device) -> dict:
    """Raw, BN-recalibrated and fine-tuned test top-1 of ``pruner.model`` (already pruned)."""
    raw = _baseline.evaluate_top1(pruner.model, test, device)
    pruner.recalibrate_bn()
    bn = pruner.results["after_prune"]["top1"]
    pruner.finetune()  # keeps the epoch best on the held-out part of the training split
    finetuned = pruner.evaluate()["top1"]
    return {"raw": raw, "bn": bn, "finetuned": finetuned,
            "flops_reduction": 1 - count_flops(pruner.model, example) / base_flops}


def _unit(job) -> None:
    run_unit(*job)


# --------------------------------------------------------------------------- results


def collect(task: dict) -> dict:
    """``{level: {method: {stage: [per seed], "flops_reduction": [...]}}}`` of the cached rows."""
    out = {}
    for level in task["levels"]:
        for method in task["methods"]:
            rows = [_read(_row_path(task, method, s, level)) for s in task["seeds"]]
            if all(rows):
                out.setdefault(str(level), {})[method] = {k: [r[k] for r in rows] for k in (*STAGES, "flops_reduction")}
    return out


def _read(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def tables(results: dict, task: dict, base_acc: list[float]) -> str:
    pm = _baseline.pm
    parts = []
    for level, methods in results.items():
        ref = methods.get("scop")
        header = ["method", "FLOPs ↓", "raw", "+ BN recalibration", "+ fine-tuning",
                  "Δ vs scop: raw / BN / fine-tuned (per seed)"]
        body = []
        for method, r in methods.items():
            diffs = "–" if ref is None or method == "scop" else " / ".join(
                pm([a - b for a, b in zip(r[k], ref[k])], 100, 2) for k in STAGES)
            body.append([method, pm(r["flops_reduction"], 100, 1) + "%", pm(r["raw"], 100, 1), pm(r["bn"], 100, 2),
                         f"**{pm(r['finetuned'], 100, 2)}**", diffs])
        parts.append(f"**{task['model']} on {task['dataset']}, {100 * float(level):.0f}% fewer FLOPs** (test top-1 %, "
                     f"mean ± std over {len(task['seeds'])} seeds; baseline {pm(base_acc, 100, 2)}%)\n\n"
                     + _report.markdown_table(header, body))
    return "\n\n".join(parts)


def _baselines(task: dict) -> list[float]:
    """Train (or read) every seed's baseline, one after another, before the units share them."""
    data = _baseline.splits(task["dataset"], task["root"], subset=task["subset"])
    accs = []
    for seed in task["seeds"]:
        start = time.time()
        base = _baseline.baseline(task["model"], task["dataset"], seed, task["train_epochs"], root=task["root"],
                                  cache=task["cache"], device=task["device"], batch_size=task["batch_size"],
                                  subset=task["subset"], log=log)
        accs.append(_baseline.evaluate_top1(base, data.test, task["device"]))
        log(f"  baseline seed {seed}: test top-1 {100 * accs[-1]:.2f}% ({time.time() - start:.0f} s)")
    return accs


def run(task: dict, jobs: int) -> tuple[dict, list[float]]:
    start = time.time()
    base_acc = _baselines(task)
    log(f"baselines: {time.time() - start:.0f} s")
    work = [(task, method, seed) for method in task["methods"] for seed in task["seeds"]]
    start = time.time()
    if jobs > 1:
        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            for _ in pool.imap_unordered(_unit, work):
                pass
    else:
        for job in work:
            _unit(job)
    log(f"methods: {time.time() - start:.0f} s")
    return collect(task), base_acc


def _task(args) -> dict:
    recipe = _baseline.RECIPES[args.dataset]
    task = dict(recipe, dataset=args.dataset, root=args.data_root, device=args.device, threads=args.threads,
                seeds=list(range(args.seeds)), levels=[float(x) for x in args.levels.split(",")], subset=args.subset,
                methods=[m for m in (args.methods.split(",") if args.methods else METHODS)])
    for key in ("model", "train_epochs", "scales_epochs", "finetune_epochs"):
        if getattr(args, key) is not None:
            task[key] = getattr(args, key)
    unknown = sorted(set(task["methods"]) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; known: {', '.join(METHODS)}")
    if args.quick:
        task.update(seeds=[0], levels=[0.5], subset=task["subset"] or 1500, train_epochs=2, scales_epochs=1,
                    finetune_epochs=1)
    return task


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", choices=sorted(_baseline.RECIPES))
    parser.add_argument("--data-root", default=None, help="local data folder (default: the dataset's own)")
    parser.add_argument("--model", help="network (default: the dataset's recipe in benchmarks/_baseline.py)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--levels", default=",".join(str(x) for x in LEVELS), help="FLOPs reductions")
    parser.add_argument("--methods", help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--train-epochs", type=int)
    parser.add_argument("--scales-epochs", type=int)
    parser.add_argument("--finetune-epochs", type=int)
    parser.add_argument("--subset", type=int, help="training images to use (default: all)")
    parser.add_argument("--cache", help="folder for baselines, stage-2 results and rows (default: a temporary one)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes, each running whole (method, seed) units")
    parser.add_argument("--quick", action="store_true", help="one seed, one level, 1,500 images, 1-2 epochs: a smoke test")
    parser.add_argument("--write", metavar="README", help="write the tables into this file's accuracy section")
    parser.add_argument("--json", metavar="PATH", help="write {level: {method: {raw, bn, finetuned, flops_reduction}}}")
    args = parser.parse_args(argv)
    task = _task(args)
    load, start = _baseline.load_line(), time.time()
    with tempfile.TemporaryDirectory() as scratch:
        task["cache"] = args.cache or scratch
        results, base_acc = run(task, args.jobs)
    minutes = (time.time() - start) / 60
    text = tables(results, task, base_acc)
    print(text)
    log(f"{minutes:.1f} min in all")
    if args.json:
        _write_json(args.json, results)
    if args.write:
        _write_readme(args, task, text, load, minutes)


def _write_readme(args, task: dict, text: str, load: str, minutes: float) -> None:
    lines = [
        f"## Accuracy at equal FLOPs: {task['dataset']}",
        "",
        f"`{_report.command_line()}` at {_report.git_revision()}; {_report.machine()}; {args.jobs} process(es) × "
        f"{args.threads} torch thread(s); {load}; {minutes:.1f} min in this run (cached rows are not rerun).",
        "",
        f"{task['model']}, {len(task['seeds'])} seeds. Baseline: {task['train_epochs']} epochs (SGD Nesterov, lr 0.1, "
        f"cosine, wd 5e-4, batch {task['batch_size']}, on 90% of the training split; last epoch), shared by every "
        f"method of its seed. SCOP stage 2: {task['scales_epochs']} epochs. Selection: `flops_target` (one uniform "
        f"ratio per layer) within 1 point of the level. After pruning: BN statistics re-estimated on ≤ 50 training "
        f"batches, then {task['finetune_epochs']} fine-tuning epochs (SGD Nesterov, lr {task['finetune_lr']}, cosine, "
        f"wd 1e-4); the epoch best on the held-out 10% is kept and its test top-1 reported. Δ: each seed's "
        f"top-1 minus scop's on the same baseline, mean ± std (points).",
        "",
        text,
    ]
    _report.write_section(args.write, f"accuracy-{task['dataset']}", "\n".join(lines))


if __name__ == "__main__":
    main()
