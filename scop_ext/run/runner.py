"""The stage runner: a :class:`~scop_ext.run.pruner.ScopPruner`'s steps in :data:`STAGES` order,
each stage's result recorded in the run folder as it completes, and an interrupted run resumed
from its last complete stage.

    stage 1 (``knockoffs``)   fit_knockoffs
    stage 2 (``scales``)      convert -> learn_scales
    stage 3 (``select``)      select
    stage 4 (``prune``)       prune -> recalibrate_bn
            (``finetune``)    finetune
    the report (``report``)   evaluate -> report
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from ..export import load_model
from ..nn.scop_conv import convert
from ..train import checkpoint, distributed
from .folder import RunFolder, claim
from .lock import RunLock

__all__ = ["STAGES", "StageRunner"]

STAGES = ("knockoffs", "scales", "select", "prune", "finetune", "report")


class StageRunner:
    """Runs ``pruner``'s steps stage by stage in its ``out_dir``.

    Process 0 holds the folder's :class:`~scop_ext.run.lock.RunLock` for the whole run, so a
    second run into the same folder is refused (naming this one's pid) instead of mixing the two;
    a killed run's lock is free at once, for ``resume``. Without ``resume`` the folder must be
    empty or hold a run of these same settings: another's is never overwritten.
    """

    def __init__(self, pruner) -> None:
        self.pruner = pruner
        self.folder = RunFolder(pruner.out_dir)

    def run(self, resume: bool = False) -> dict[str, Any]:
        lock = RunLock(self.folder.root)
        try:
            if distributed.is_main():
                lock.acquire()
            return self._run(resume)
        finally:
            lock.release()

    def _prepare(self, resume: bool) -> set[str]:
        """Clean the folder (process 0), read an interrupted run's state: the stages it completed."""
        p, config = self.pruner, self.pruner.config.to_dict()
        if distributed.is_main():
            claim(self.folder.root, "prune")
            if not resume:
                self.folder.refuse_another_run(config)
            self.folder.clear(keep_progress=resume)
        else:
            os.makedirs(self.folder.root, exist_ok=True)
        state = self.folder.read_state(config) if resume else None
        if state:
            p.results.update(state["results"])
        if distributed.is_main():
            self.folder.write_config(config)
        distributed.barrier()  # the others start once process 0 has cleaned the folder
        return set(state["completed"]) if state else set()

    def _run(self, resume: bool) -> dict[str, Any]:
        p = self.pruner
        done = self._prepare(resume)
        start = time.time()
        for stage in STAGES:
            compute, load = getattr(self, f"_compute_{stage}"), getattr(self, f"_load_{stage}")
            if stage in done:
                load()
                p.completed.append(stage)
                p.log(f"[{stage}] loaded from {p.out_dir}")
                continue
            t = time.time()
            p.log(f"[{stage}] running")
            # Every computed stage starts from the same global random state whether or not the
            # run was resumed before it (augmentation and any unseeded draw use it).
            torch.manual_seed(p.config.seed * len(STAGES) + STAGES.index(stage))
            compute()  # its last step records the stage in the folder (ScopPruner._complete)
            p.log(f"[{stage}] done in {time.time() - t:.1f} s")
        p.results["seconds"] = p.results.get("seconds", 0.0) + (time.time() - start)
        return p.results

    # -------------------------------------------------------------- each stage: compute, load

    def _compute_knockoffs(self):
        self.pruner.fit_knockoffs()

    def _load_knockoffs(self):
        from ..knockoffs import load

        self.pruner.knockoffs = load(self.folder.path("knockoffs.pt"))

    def _compute_scales(self):
        self.pruner.convert()
        self.pruner.learn_scales()

    def _load_scales(self):
        p = self.pruner
        p._keep_dense()  # the model is still the unpruned one the run started from
        convert(p.model, skip=p.config.skip)
        p.model.load_state_dict(checkpoint.load(self.folder.path("scales.pt"), "scales")["model"])
        p.model.to(p.device)

    def _compute_select(self):
        self.pruner.select()

    def _load_select(self):
        self.pruner.plan = self.folder.read_json("plan.json")

    def _compute_prune(self):
        self.pruner.prune()
        self.pruner.recalibrate_bn()

    def _load_prune(self):
        self._load_model("pruned")

    def _compute_finetune(self):
        self.pruner.finetune()

    def _load_finetune(self):
        self._load_model("final")

    def _compute_report(self):
        self.pruner.evaluate()
        self.pruner.report()

    def _load_report(self):
        pass

    def _load_model(self, stem: str):
        self.pruner._keep_dense()
        self.pruner.model, _ = load_model(self.folder.path(stem), map_location=self.pruner.device)
