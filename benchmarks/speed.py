"""How fast is SCOP, and is the pruned network's saving real? Three tables per backend, one run.

1. **Operators** (``ops``, ``speed_ops.py``): the fused dual-branch convolution against the
   plain-PyTorch reference (eager and compiled) and a bare conv, at CIFAR and ImageNet ResNet
   layer shapes.
2. **Stage-2 step** (``step``, ``speed_step.py``): one SCOP training step of a whole network as the
   package runs it, against the same step in plain PyTorch (eager and compiled), with an ordinary
   training step and a plain forward as the floor.
3. **Pruned latency** (``latency``, ``speed_latency.py``): ResNets pruned to half the FLOPs against
   the dense network, batch 1 and 64, next to the FLOPs ratio.

Each module's docstring says what it measures; ``_timing.py`` how time and memory are measured.

    python benchmarks/speed.py                                   # every backend here, print
    python benchmarks/speed.py --write benchmarks/README.md      # and write the sections
    python benchmarks/speed.py --quick --parts ops,step          # short runs, some tables
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _baseline  # noqa: E402
import _report  # noqa: E402
import speed_latency  # noqa: E402
import speed_ops  # noqa: E402
import speed_step  # noqa: E402
from _timing import malloc_for_timing  # noqa: E402

import scop_ext  # noqa: E402

PARTS = {"ops": speed_ops.section, "step": speed_step.section, "latency": speed_latency.section}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default=None, help="comma-separated; default: cpu, plus cuda when available")
    parser.add_argument("--parts", default="ops,step,latency")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per timing")
    parser.add_argument("--step-batch", type=int, default=None,
                        help="N real images per stage-2 step (default: per model, see speed_step.STEP_CASES; 4x that on CUDA)")
    parser.add_argument("--step-models", default=",".join(dict.fromkeys(c[0] for c in speed_step.STEP_CASES)),
                        help="models of the step table (default: all of speed_step.STEP_CASES)")
    parser.add_argument("--step-layouts", default="NCHW,channels_last",
                        help="layouts of the step table's rows (default: both); a subset of rows writes its own section")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds per step variant (default 3)")
    parser.add_argument("--compile-models", default=None,
                        help="models of the step table timed under torch.compile too (default: all; '' for none)")
    parser.add_argument("--quick", action="store_true", help="ResNet-20 only, short timings")
    parser.add_argument("--write", metavar="README", help="write speed-<part>-<device> sections into this file")
    args = parser.parse_args(argv)
    malloc_for_timing()
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # one compiled reference serves every shape and grad mode
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in devices and not (torch.cuda.is_available() and scop_ext.build_info()["cuda"]):
        print("cuda: skipped (no GPU here or no CUDA build of the operators)", file=sys.stderr)
        devices = [d for d in devices if d != "cuda"]
    parts = args.parts.split(",")
    min_run = 0.2 if args.quick else args.min_run_time

    def log(*a):
        print(*a, file=sys.stderr, flush=True)

    measured = []
    for device in devices:
        for part in parts:
            load = _baseline.load_line()
            start = time.time()
            if part not in PARTS:
                raise SystemExit(f"unknown part {part!r}; expected ops, step, latency")
            title, text, notes = PARTS[part](device, args, min_run, log)
            seconds = time.time() - start
            print(f"{title}\n\n{text}\n")
            measured.append((part, device))
            if args.write:
                threads = f"{torch.get_num_threads()} torch threads" if device == "cpu" else "CUDA"
                body = (f"{title}\n\n`{_report.command_line()}` at {_report.git_revision()}; {_report.machine()}; "
                        f"{threads}; {load}, 1-min load {_baseline.load_now()} at the end; {seconds:.0f} s. Backends built: cpu={scop_ext.build_info()['cpu']}, "
                        f"cuda={scop_ext.build_info()['cuda']}; measured here: {', '.join(devices)}.\n\n"
                        f"{notes}\n\n{text}")
                suffix = speed_step.section_suffix(args) if part == "step" else ""
                _report.write_section(args.write, f"speed-{part}-{device}{suffix}", body)
    log("measured: " + ", ".join(f"{p} on {d}" for p, d in measured))


if __name__ == "__main__":
    main()
