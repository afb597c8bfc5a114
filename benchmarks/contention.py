"""Stage 2 and fine-tuning on a shared CPU: one step's time with 0, 1 and 2 busy processes beside
it, for the ways OpenMP can wait.

A busy process here is a Python loop that never sleeps. OpenMP's worker threads spin for a
while before they sleep (libgomp's ``GOMP_SPINCOUNT``); when the core a partner thread waits on
is taken by another process, the spinning burns the time the partner needs. Each configuration
runs in a fresh process (the spin count is read once, when libgomp loads):

- ``default``: torch's threads (one per core) and libgomp's own spin count;
- ``passive``: the same threads, ``OMP_WAIT_POLICY=PASSIVE`` (waiting threads sleep at once);
- ``spin 10k``: ``GOMP_SPINCOUNT=10000``, a short spin before sleeping;
- ``1 thread``: ``torch.set_num_threads(1)``.

Steps: a stage-2 step of resnet20 (BN over the paired batch, 32 real images at 32x32 with their
32 knockoffs) and a fine-tuning step of resnet20 (64 images). Each cell is the median of the
per-call times of the step over ``--repeats`` blocks taken while the busy processes run.

    python benchmarks/contention.py --write benchmarks/README.md
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _report  # noqa: E402

CONFIGS = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin 10k": {"GOMP_SPINCOUNT": "10000"},
    "1 thread": {"SCOP_BENCH_THREADS": "1"},
}


def _busy(stop) -> None:
    while not stop.is_set():
        sum(range(10_000))


def _measure(repeats: int) -> dict:
    """Runs in the child process: median ms per step of each step kind."""
    import torch
    import torch.nn.functional as F

    from scop_ext.models import resnet20
    from scop_ext.nn import convert, scop_layers

    if os.environ.get("SCOP_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["SCOP_BENCH_THREADS"]))
    torch.manual_seed(0)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    scop = convert(resnet20()).eval()
    for m in scop.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.train()
    for layer in scop_layers(scop).values():
        layer.set_knockoff_bias(0.05 * torch.eye(layer.out_channels), 1e-3)
        for p in (layer.weight,):
            p.requires_grad_(False)
    betas = [layer.beta for layer in scop_layers(scop).values()]
    adam = torch.optim.Adam(betas, lr=0.004)
    plain = resnet20().train()
    sgd = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9)

    def stage2():
        loss = F.cross_entropy(scop(x)[:32], y[:32])
        adam.zero_grad()
        loss.backward()
        adam.step()

    def finetune():
        loss = F.cross_entropy(plain(x), y)
        sgd.zero_grad()
        loss.backward()
        sgd.step()

    out = {}
    for name, step in (("stage 2", stage2), ("fine-tuning", finetune)):
        for _ in range(3):
            step()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            step()
            times.append((time.perf_counter() - t) * 1e3)
        out[name] = statistics.median(times)
    return {**out, "threads": torch.get_num_threads()}


def run_config(env: dict, busy: int, repeats: int) -> dict:
    stop = multiprocessing.Event()
    hogs = [multiprocessing.Process(target=_busy, args=(stop,), daemon=True) for _ in range(busy)]
    for h in hogs:
        h.start()
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", str(repeats)], capture_output=True, text=True,
                              env={**os.environ, **env}, timeout=1800)
    finally:
        stop.set()
        for h in hogs:
            h.join()
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--busy", default="0,1,2", help="numbers of busy processes beside the measured one")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=2, help="the configurations are measured in turns this often")
    parser.add_argument("--write", metavar="README")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(_measure(args.child)))
        return
    load = _report.machine()
    cells: dict = {}
    for _ in range(args.rounds):  # configurations interleaved, so a busy spell falls on all of them
        for busy in map(int, args.busy.split(",")):
            for name, env in CONFIGS.items():
                r = run_config(env, busy, args.repeats)
                for step in ("stage 2", "fine-tuning"):
                    cells.setdefault((step, busy, name), []).append(r[step])
                print(f"{busy} busy, {name}: {r}", file=sys.stderr, flush=True)
    rows = []
    for step in ("stage 2", "fine-tuning"):
        for busy in map(int, args.busy.split(",")):
            base = statistics.median(cells[(step, 0, "default")])
            row = [step, busy]
            for name in CONFIGS:
                ms = cells[(step, busy, name)]
                row.append(f"{statistics.median(ms):.0f} ({min(ms):.0f}-{max(ms):.0f}); {statistics.median(ms) / base:.2f}x")
            rows.append(row)
    table = _report.markdown_table(["step", "busy processes", *CONFIGS], rows)
    _report.publish("Shared CPUs: OpenMP waiting under contention", "contention", load,
                    ["Milliseconds per step, median over rounds (range), and the ratio to `default` with no busy "
                     "process. A busy process is a Python loop that never sleeps.", table], args.write)


if __name__ == "__main__":
    main()
