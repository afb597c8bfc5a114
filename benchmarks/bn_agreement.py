"""How far each approximate stage-2 BatchNorm mode moves beta from the exact ``bn: batch`` beta.

For every seed: the cached `resnet_digits` baseline of ``_baseline.py`` (the one planted.py and
accuracy.py use), Gaussian knockoffs and Lemma 2 biases as ``scop prune`` fits them, then stage 2
once per BN mode from that same start (same knockoffs, biases, seeded batch order and bias
draws). Each mode's beta is compared with ``batch``'s: Spearman rank correlation per layer (its
mean and minimum over the layers) and over all filters pooled, and the share of filters on the
same side of a 50% cut in their layer (what a uniform-ratio plan at 50% would decide alike).

    python benchmarks/bn_agreement.py --seeds 3 --cache /tmp/s2cache
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

import torch
from scipy.stats import spearmanr

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _baseline  # noqa: E402
import _report  # noqa: E402

from scop_ext.run.config import PruneConfig  # noqa: E402
from scop_ext.run import ScopPruner  # noqa: E402
from scop_ext.scales import BN_MODES  # noqa: E402


def learned_betas(base, seed: int, bn: str, epochs: int, bias: bool) -> tuple[dict[str, torch.Tensor], float]:
    """({conv: beta}, stage-2 seconds) of one ``scop prune``-style stage 2 on ``base``."""
    cfg = PruneConfig(model="resnet_digits", dataset="digits", scales_epochs=epochs, knockoff_bias=bias, bn=bn,
                      seed=seed, latency=False, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        pruner = ScopPruner.from_config(cfg, tmp, model=copy.deepcopy(base), progress=False, log=lambda *a, **k: None)
        pruner.fit_knockoffs()
        pruner.convert()
        start = time.time()
        pruner.learn_scales()
        seconds = time.time() - start
    return {name: torch.tensor(b) for name, b in pruner.results["betas"].items()}, seconds


def agreement(betas: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> dict:
    per_layer = [float(spearmanr(betas[n].numpy(), exact[n].numpy()).statistic) for n in exact]
    pooled = float(spearmanr(torch.cat(list(betas.values())).numpy(), torch.cat(list(exact.values())).numpy()).statistic)
    same = total = 0
    for n in exact:
        k = exact[n].numel() // 2  # the lowest half of each layer is removed
        removed, removed_exact = set(betas[n].argsort()[:k].tolist()), set(exact[n].argsort()[:k].tolist())
        same += exact[n].numel() - 2 * len(removed - removed_exact)
        total += exact[n].numel()
    return {"mean": sum(per_layer) / len(per_layer), "min": min(per_layer), "pooled": pooled, "cut": same / total}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    parser.add_argument("--train-epochs", type=int, default=15, help="baseline epochs (as planted.py / accuracy.py)")
    parser.add_argument("--scales-epochs", type=int, default=10, help="SCOP stage-2 epochs (as planted.py)")
    parser.add_argument("--modes", default=",".join(m for m in BN_MODES if m != "batch"),
                        help="modes compared with batch, comma-separated")
    parser.add_argument("--cache", help="folder for trained baselines, shared with planted.py / accuracy.py")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: these models are tiny)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    modes = args.modes.split(",")
    load, start = _baseline.load_line(), time.time()
    rows, seconds = [], {m: [] for m in ["batch", *modes]}
    for seed in range(args.seeds):
        base = _baseline.baseline("resnet_digits", "digits", seed, args.train_epochs, cache=args.cache,
                                  log=lambda *a: print(*a, file=sys.stderr))
        for bias in (True, False):
            exact, t = learned_betas(base, seed, "batch", args.scales_epochs, bias)
            seconds["batch"].append(t)
            for mode in modes:
                betas, t = learned_betas(base, seed, mode, args.scales_epochs, bias)
                seconds[mode].append(t)
                rows.append({"mode": mode, "bias": bias, **agreement(betas, exact)})
                print(f"  seed {seed} bias={bias} {mode}: {rows[-1]}", file=sys.stderr, flush=True)
    pm = _baseline.pm
    header = ["BN mode", "Lemma 2 bias", "Spearman per layer: mean", "per layer: min", "pooled",
              "same side of a 50% cut per layer"]
    body = [[f"`{mode}`", "on" if bias else "off", *(pm(r[k] for r in rows if r["mode"] == mode and r["bias"] == bias)
                                                    for k in ("mean", "min", "pooled", "cut"))]
            for mode in modes for bias in (True, False)]
    times = ", ".join(f"`{m}` {pm(v, 1, 1)} s" for m, v in seconds.items())
    print(f"`{_report.command_line()}` at {_report.git_revision()}; {_report.machine()}; {load}, 1-min load "
          f"{_baseline.load_now()} at the end; {time.time() - start:.0f} s.\n")
    print(f"β of each mode against `batch`'s from the same start, {args.seeds} seeds (mean ± std), "
          f"{args.scales_epochs} stage-2 epochs; stage-2 time per run: {times}.\n")
    print(_report.markdown_table(header, body))


if __name__ == "__main__":
    main()
