"""SCOP's levers, judged on a validation split: which stage-2 settings, importance and ranking
pick the filters a network can best lose?

Each stage-2 variant (epochs, learning rate, knockoff generator and block size, the Lemma 2
bias, the BatchNorm mode) runs once per seed on that seed's baseline; its betas are cached after
1, 2 and 4 epochs (one run, resumed). Every snapshot is then scored several ways (``2 beta -
1``; ``|gamma| (2 beta - 1)``; beta times the filter's L1 norm over its layer's largest; the mean
of the filter's rank by beta and by L1 within its layer), selected with ``flops_target`` by one
uniform ratio per layer or by one global ranking, pruned, its BatchNorm statistics re-estimated,
and scored on the held-out 10% of the training split. The test split is never used here: these
figures choose scop's defaults, and the accuracy benchmark then reports on the test split.
L1 and BN-scale magnitude run through the same selection as references.

    python benchmarks/tune_scop.py --cache runs/bench-cache --seeds 1 --write benchmarks/README.md \\
        --json benchmarks/results/tune-fashion-mnist.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _baseline  # noqa: E402
import _report  # noqa: E402

from scop_ext.nn import convert, scop_layers  # noqa: E402
from scop_ext.prune import PruningSpace, apply_plan, make_importance, make_policy  # noqa: E402
from scop_ext.run import PruneConfig, ScopPruner  # noqa: E402
from scop_ext.scales import fit_knockoff_biases, learn_scales, pair_dataset  # noqa: E402
from scop_ext.train import evaluate, make_loader, recalibrate_bn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

# name: PruneConfig values of the stage-2 run
VARIANTS = {
    "default": {},
    "no Lemma 2 bias": {"knockoff_bias": False},
    "lr 0.001": {"scales_lr": 0.001},
    "block 1": {"knockoff_options": {"block": 1}},
    "block 4": {"knockoff_options": {"block": 4}},
    "bn frozen": {"bn": "frozen"},
    "bn batch_detached": {"bn": "batch_detached"},
    "block 7": {"knockoff_options": {"block": 7}},
}
SNAPSHOTS = (1, 2, 4)
LEVELS = (0.5, 0.7)


def _layer_norm(scores: dict) -> dict:
    return {n: s / s.abs().max().clamp_min(1e-12) for n, s in scores.items()}


def _ranks(s: torch.Tensor) -> torch.Tensor:
    return s.argsort().argsort().float() / max(len(s) - 1, 1)


def scorers() -> dict:
    """name: model -> {conv: scores}."""
    scop, gamma, l1 = make_importance("scop"), make_importance("scop", multiply_bn_gamma=True), make_importance("l1")

    def beta_l1(model):
        beta = {n: (s + 1) / 2 for n, s in scop(model).items()}
        return {n: beta[n] * w for n, w in _layer_norm(l1(model)).items() if n in beta}

    def rank_mix(model):
        s, w = scop(model), l1(model)
        return {n: (_ranks(s[n]) + _ranks(w[n])) / 2 for n in s}

    return {"2β−1": scop, "|γ|(2β−1)": gamma, "β·L1": beta_l1, "rank(β)+rank(L1)": rank_mix}


def stage2(task: dict, seed: int, variant: str, base, data) -> dict[int, dict]:
    """``{epochs: state_dict of the converted model}`` after each of SNAPSHOTS, cached."""
    from safetensors.torch import load_file, save_file

    folder = os.path.join(task["cache"], "tune", f"{task['dataset']}-{task['model']}", f"s{seed}",
                          variant.replace(" ", "_"))
    paths = {e: os.path.join(folder, f"beta-e{e}.safetensors") for e in SNAPSHOTS}
    if all(os.path.exists(p) for p in paths.values()):
        return {e: load_file(p) for e, p in paths.items()}
    os.makedirs(folder, exist_ok=True)
    cfg = PruneConfig.from_dict({"model": task["model"], "dataset": task["dataset"], "data_root": task["root"],
                                 "batch_size": task["batch_size"], "device": task["device"], "seed": seed,
                                 "latency": False, **VARIANTS[variant]})
    pruner = ScopPruner(copy.deepcopy(base), data.train[0][0][None], make_importance("scop"),
                        make_policy("uniform", ratio=0.5), data=data, config=cfg, out_dir=folder, progress=False)
    start = time.time()
    pruner.fit_knockoffs()
    pruner.convert()
    pairs = pair_dataset(data.train, pruner.knockoffs.sample, seed=seed)
    if cfg.knockoff_bias:
        fit_knockoff_biases(pruner.model, DataLoader(pairs, batch_size=cfg.batch_size), cfg.device, gamma=cfg.bias_gamma)
    loader = make_loader(pairs, cfg.batch_size, shuffle=True, seed=seed)
    out = {}
    for epochs in SNAPSHOTS:  # one run: each call resumes the last one's progress file (epochs may grow)
        if not os.path.exists(paths[epochs]):
            learn_scales(pruner.model, loader, cfg.device, epochs=epochs, lr=cfg.scales_lr,
                         adam_betas=tuple(cfg.scales_betas), use_knockoff_bias=cfg.knockoff_bias, bn=cfg.bn, seed=seed,
                         checkpoint_path=os.path.join(folder, "scales-progress.pt"), settings={"variant": variant},
                         progress=False)
            save_file({k: v.detach().contiguous().cpu() for k, v in pruner.model.state_dict().items()}, paths[epochs])
        out[epochs] = load_file(paths[epochs])
    _baseline.log_line(f"  stage 2 {variant!r} seed {seed}: {time.time() - start:.0f} s")
    return out


def val_top1(scored, scores: dict, level: float, search: str, data, task: dict) -> float:
    """Validation top-1 of ``scored`` pruned by ``scores`` to ``level`` fewer FLOPs, after BN recalibration."""
    example = data.train[0][0][None]
    space = PruningSpace(scored, example)
    normalize = None if search == "uniform" else "max"
    plan = make_policy("flops_target", reduction=level, search=search, normalize=normalize)(space, scores)
    model = apply_plan(copy.deepcopy(scored), example, plan)
    recalibrate_bn(model, make_loader(data.train, task["batch_size"], shuffle=True, seed=0), task["device"], batches=50)
    return evaluate(model, make_loader(data.val, 512, shuffle=False, evaluation=True), task["device"])["top1"]


def run_seed(task: dict, seed: int) -> list[dict]:
    data = _baseline.splits(task["dataset"], task["root"], subset=task["subset"])
    base = _baseline.baseline(task["model"], task["dataset"], seed, task["train_epochs"], root=task["root"],
                              cache=task["cache"], device=task["device"], batch_size=task["batch_size"],
                              subset=task["subset"], log=_baseline.log_line)
    rows = []
    for level in task["levels"]:
        for search in ("uniform", "global_ranking"):
            for name in ("l1", "bn_scale"):
                rows.append({"seed": seed, "variant": "magnitude", "epochs": 0, "score": name, "search": search,
                             "level": level, "top1": val_top1(base, make_importance(name)(base), level, search, data, task)})
    for variant in task["variants"]:
        for epochs, state in stage2(task, seed, variant, base, data).items():
            scored = convert(copy.deepcopy(base), skip=PruneConfig.from_dict(VARIANTS[variant]).skip)
            scored.load_state_dict(state)
            for name, score in scorers().items():
                scores = score(scored)
                for level in task["levels"]:
                    for search in ("uniform", "global_ranking"):
                        rows.append({"seed": seed, "variant": variant, "epochs": epochs, "score": name,
                                     "search": search, "level": level,
                                     "top1": val_top1(scored, scores, level, search, data, task)})
            spread = float(torch.cat([(2 * l.beta.detach() - 1).abs() for l in scop_layers(scored).values()]).quantile(0.9))
            _baseline.log_line(f"  {variant!r} e{epochs}: spread {spread:.3f}, best "
                               + ", ".join(f"{lv:.0%} {100 * max(r['top1'] for r in rows if r['variant'] == variant and r['epochs'] == epochs and r['level'] == lv):.2f}"
                                           for lv in task["levels"]))
    return rows


def table(rows: list[dict], level: float) -> str:
    """One row per (variant, epochs, score), columns uniform / global, mean over seeds."""
    keys = sorted({(r["variant"], r["epochs"], r["score"]) for r in rows if r["level"] == level},
                  key=lambda k: (k[0] != "magnitude", k[0], k[1], k[2]))
    body = []
    for variant, epochs, score in keys:
        cells = []
        for search in ("uniform", "global_ranking"):
            sel = [r["top1"] for r in rows if (r["variant"], r["epochs"], r["score"], r["search"], r["level"])
                   == (variant, epochs, score, search, level)]
            cells.append(_baseline.pm(sel, 100, 2))
        body.append([variant, epochs or "–", score, *cells])
    return _report.markdown_table(["stage 2", "epochs", "score", "uniform per layer", "global ranking"], body)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion-mnist", choices=sorted(_baseline.RECIPES))
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--seeds", default="1", help="comma-separated baseline seeds")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--subset", type=int, default=None)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--write", metavar="README")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    recipe = _baseline.RECIPES[args.dataset]
    task = dict(recipe, dataset=args.dataset, root=args.data_root, device=args.device, cache=args.cache,
                subset=args.subset, levels=LEVELS, variants=[v for v in args.variants.split(",") if v])
    load, start = _baseline.load_line(), time.time()
    rows = [row for seed in map(int, args.seeds.split(",")) for row in run_seed(task, seed)]
    minutes = (time.time() - start) / 60
    text = "\n\n".join(f"**{100 * lv:.0f}% fewer FLOPs**: validation top-1 % after BN recalibration\n\n{table(rows, lv)}"
                       for lv in LEVELS)
    print(text)
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=0)
    if args.write:
        head = (f"## SCOP's levers on {args.dataset} (validation split)\n\n`{_report.command_line()}` at "
                f"{_report.git_revision()}; {_report.machine()}; {load}; {minutes:.1f} min.\n\n"
                f"{task['model']}, baseline seed(s) {args.seeds}. Stage 2: Adam (0.5, 0.9), batch {task['batch_size']}, "
                "Gaussian knockoffs unless the variant says otherwise; betas after 1, 2 and 4 epochs of one run. "
                "Selection: `flops_target`, uniform per layer or one global ranking (scores over each layer's "
                "largest), within a point of the level. No fine-tuning: BN statistics re-estimated on 50 training "
                "batches, top-1 on the held-out 10% of the training split (6,000 images).\n\n")
        _report.write_section(args.write, f"tune-{args.dataset}", head + text)


if __name__ == "__main__":
    main()
