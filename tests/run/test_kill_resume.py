"""Crash safety of `scop prune`: SIGKILL at random points in every stage, resume, same result.

One run folder is killed again and again, at least ``KILLS_PER_STAGE`` times inside each stage,
and resumed with ``--resume`` every time; it must end with the same ``final.safetensors`` (every
tensor ``torch.equal``) and ``plan.json`` as an uninterrupted run with the same seed. After every
kill each file in the folder must be whole (only temporary files may be partial).

The first kill aimed at a stage lands at its very start, later ones at random points of its
uninterrupted duration. A resumed stage can be shorter than that (it continues from its progress
checkpoint), so a kill may come after the stage finished; the folder then goes back to the
latest copy in which that stage was still unfinished (one is taken after every kill), and the
next kill is drawn within the time the stage took from there. The random points are seeded, so
a failure replays.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scop_ext.train import checkpoint
from scop_ext.run import STAGES
from scop_ext.run.lock import LOCK_NAME

from tests.conftest import ENV, prune_args

KILLS_PER_STAGE = 10
KINDS = {"knockoffs.pt": "knockoff-generator", "scales.pt": "scales", "scales-progress.pt": "scales-progress",
         "finetune-progress.pt": "finetune-progress"}


class Run:
    """A `scop prune --resume` process whose output lines are collected, with arrival times, by a thread."""

    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen([sys.executable, "-m", "scop_ext.cli", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=ENV)
        self.lines: list[tuple[float, str]] = []
        self.done = threading.Event()
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self.changed:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self.changed.notify_all()
        with self.changed:
            self.done.set()
            self.changed.notify_all()

    def wait_line(self, text: str, timeout: float = 120) -> float | None:
        """Arrival time of the line ``text``; None if the process ended without printing it."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                hit = next((t for t, line in self.lines if line == text), None)
                if hit is not None or self.done.is_set():
                    return hit
                if not self.changed.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise AssertionError(f"no {text!r} within {timeout} s:\n" + self.output())

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.reader.join()

    def finish(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout=timeout)
        self.reader.join()
        return code

    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def stage_at_death(self) -> str | None:
        """The stage that had started and not finished when the process ended."""
        text = [line for _, line in self.lines]
        current = None
        for stage in STAGES:
            if f"[{stage}] running" in text:
                current = None if any(line.startswith(f"[{stage}] done") for line in text) else stage
        return current


def assert_files_whole(folder) -> int:
    """Every file but the temporaries a kill may leave must load completely; returns how many."""
    count = 0
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(checkpoint.TEMP_PREFIX):
            continue
        if name.endswith(".json"):
            with open(path) as f:
                json.load(f)
        elif name in KINDS:
            checkpoint.load(path, KINDS[name])
        elif name.endswith(".safetensors"):
            load_file(path)
        elif name.endswith(".png"):
            with open(path, "rb") as f:
                data = f.read()
            assert data.startswith(b"\x89PNG") and data[-8:-4] == b"IEND", f"{name} is cut short"
        elif name.endswith(".md"):
            with open(path) as f:
                assert f.read().endswith("\n"), f"{name} is cut short"
        elif name == LOCK_NAME:  # the killed run's pid (or nothing yet), free for the next run to take
            with open(path) as f:
                holder = f.read().strip()
            assert holder == "" or holder.isdigit(), f"{name} holds {holder!r}"
        else:
            raise AssertionError(f"unexpected file {name} in the run folder")
        count += 1
    return count


@pytest.mark.slow
def test_sigkill_in_every_stage_then_resume_gives_the_uninterrupted_result(baseline, tmp_path):
    start = time.monotonic()
    whole = Run(prune_args(baseline, tmp_path / "whole", "--resume"))
    assert whole.finish() == 0, whole.output()
    times = dict((line, t) for t, line in whole.lines)
    duration = {}
    for stage in STAGES:
        done = next(t for t, line in whole.lines if line.startswith(f"[{stage}] done"))
        duration[stage] = done - times[f"[{stage}] running"]

    rng = random.Random(20240606)
    out = tmp_path / "killed"
    kills = {stage: [] for stage in STAGES}  # where each kill landed, as a fraction of the uninterrupted stage
    unfinished: dict[str, Path] = {}  # stage -> latest copy of the folder in which it was not finished
    window: dict[str, float] = {}  # stage -> how long it ran when resumed from that copy
    rewinds = processes = files_checked = 0
    while (target := next((s for s in STAGES if len(kills[s]) < KILLS_PER_STAGE), None)) is not None:
        run = Run(prune_args(baseline, out, "--resume"))
        processes += 1
        began = run.wait_line(f"[{target}] running")
        assert began is not None, f"the run ended before {target}:\n{run.output()}"
        delay = rng.uniform(0, window.get(target, duration[target])) if kills[target] else 0.0
        time.sleep(max(0.0, began + delay - time.monotonic()))
        killed_at = time.monotonic()
        run.kill()
        assert run.proc.returncode == -9, f"the run failed by itself:\n{run.output()}"
        files_checked += assert_files_whole(out)
        stage = run.stage_at_death()
        if stage is not None:
            entered = next(t for t, line in run.lines if line == f"[{stage}] running")
            kills[stage].append((killed_at - entered) / duration[stage])
        copy = tmp_path / "copies" / str(processes)
        shutil.copytree(out, copy)
        completed = json.loads((out / "state.json").read_text())["completed"] if (out / "state.json").exists() else []
        for s in STAGES:
            if s not in completed:
                unfinished[s] = copy
                window.pop(s, None)  # how long the stage runs from this new copy is not known yet
        if target in completed and len(kills[target]) < KILLS_PER_STAGE:
            window[target] = killed_at - began  # it finished within this (its "done" line may be lost)
            shutil.rmtree(out)
            shutil.copytree(unfinished[target], out)
            rewinds += 1
        for old in set((tmp_path / "copies").iterdir()) - set(unfinished.values()):
            shutil.rmtree(old)
    final = Run(prune_args(baseline, out, "--resume"))
    assert final.finish() == 0, final.output()
    processes += 1

    a, b = load_file(str(tmp_path / "whole" / "final.safetensors")), load_file(str(out / "final.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert json.loads((out / "plan.json").read_text()) == json.loads((tmp_path / "whole" / "plan.json").read_text())
    assert json.loads((out / "state.json").read_text())["completed"] == list(STAGES)
    assert not [n for n in os.listdir(out) if n.startswith(checkpoint.TEMP_PREFIX)]
    summary = ", ".join(f"{s} {len(k)} (at {min(k):.2f}-{max(k):.2f} of {duration[s]:.2f} s)" for s, k in kills.items())
    print(f"\nkills survived per stage: {summary}; {processes} processes, {rewinds} rewinds, "
          f"{files_checked} file checks, {time.monotonic() - start:.0f} s")
