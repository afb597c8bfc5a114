"""Stage 2 under torchrun: how much does unsynchronised BatchNorm change beta?

With ``bn: batch`` each process normalises over its own part of the paired batch (torch's
SyncBatchNorm runs on GPUs only), so beta depends on the number of processes; with ``bn: frozen``
it does not. This runs `scop prune` on the bundled digits with one process and with two
(``torchrun --nproc_per_node 2``, gloo, the same global batch and the same fitted knockoffs,
`--knockoffs`) for each BN mode and seed, and
compares the learned betas: Spearman's rank correlation over all filters, and the share of the
filters a 50% uniform plan removes that both runs remove.

    python benchmarks/ddp_bn.py --cache runs/bench-cache --write benchmarks/README.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _baseline  # noqa: E402
import _report  # noqa: E402

MODES = ("batch", "batch_detached", "frozen")


def _prune(out: str, weights: str, knockoffs: str, bn: str, seed: int, processes: int, epochs: int, batch: int) -> dict:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
                 str(29500 + seed * 10 + MODES.index(bn))] if processes > 1 else [sys.executable])
    args = ["-m", "scop_ext", "prune", "--weights", weights, "--knockoffs", knockoffs, "--scales-epochs", str(epochs),
            "--finetune-epochs", "0",
            "--policy", "uniform", "--ratio", "0.5", "--batch-size", str(batch // processes), "--no-latency",
            # 1,280 training images, 20 whole global batches of 64: a short last batch would be kept by
            # one process and dropped by two (ShardedBatchSampler), a difference that is not BN's
            "--set", "val_fraction=0.0497",
            "--set", f"bn={bn}", "--seed", str(seed), "--quiet", "--device", "cpu", "--out", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(launcher + args, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    with open(os.path.join(out, "state.json")) as f:
        results = json.load(f)["results"]
    return {"betas": torch.cat([torch.tensor(b) for b in results["betas"].values()]), "removed": results["removed"]}


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def _overlap(p: dict, q: dict) -> float:
    both = sum(len(set(p[k]) & set(q.get(k, []))) for k in p)
    return both / max(sum(len(v) for v in p.values()), 1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--scales-epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64, help="global batch (each of 2 processes takes half)")
    parser.add_argument("--cache", help="folder of the digits baselines (shared with the other scripts)")
    parser.add_argument("--write", metavar="README")
    args = parser.parse_args(argv)
    load, rows = _baseline.load_line(), []
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or tmp
        for seed in range(args.seeds):
            base = _baseline.baseline("resnet_digits", "digits", seed, 15, cache=cache, log=_baseline.log_line)
            stem = os.path.join(tmp, f"base{seed}", "model")
            from scop_ext.export import save_model

            save_model(base, stem, model_name="resnet_digits", num_classes=10, in_channels=1)
            knockoffs = os.path.join(tmp, f"kn{seed}")  # one fit for both runs: only the BN differs
            subprocess.run([sys.executable, "-m", "scop_ext", "knockoffs", "fit", "--seed", str(seed), "--out", knockoffs],
                           check=True, capture_output=True)
            for bn in MODES:
                runs = [_prune(os.path.join(tmp, f"s{seed}-{bn}-{p}"), stem, os.path.join(knockoffs, "knockoffs.pt"), bn,
                               seed, p, args.scales_epochs, args.batch) for p in (1, 2)]
                rows.append({"seed": seed, "bn": bn, "spearman": _spearman(runs[0]["betas"], runs[1]["betas"]),
                             "overlap": _overlap(runs[0]["removed"], runs[1]["removed"]),
                             "max_diff": float((runs[0]["betas"] - runs[1]["betas"]).abs().max())})
                _baseline.log_line(f"  seed {seed} bn={bn}: {rows[-1]}")
    body = [[bn, _baseline.pm([r["spearman"] for r in rows if r["bn"] == bn], 1, 3),
             _baseline.pm([r["overlap"] for r in rows if r["bn"] == bn], 1, 3),
             _baseline.pm([r["max_diff"] for r in rows if r["bn"] == bn], 1, 4)] for bn in MODES]
    table = _report.markdown_table(["stage-2 BN", "Spearman of beta, 1 vs 2 processes",
                                    "removed by both (50% uniform plan)", "largest |beta difference|"], body)
    _report.publish("Stage 2 under torchrun: unsynchronised BatchNorm", "ddp-bn", f"{_report.machine()}; {load}",
                    [f"resnet_digits on digits, {args.seeds} seeds (mean ± std), {args.scales_epochs} stage-2 epochs, "
                     f"global batch {args.batch}: one process against two (gloo, each {args.batch // 2} real images "
                     "and their knockoffs).", table], args.write)


if __name__ == "__main__":
    main()
