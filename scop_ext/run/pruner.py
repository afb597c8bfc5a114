"""The whole SCOP run as one object with plain steps (stages 1-4 of the method).

:class:`ScopPruner` holds the model, its importance criterion and selection policy, the data and
the settings. Each step can be called on its own; :meth:`ScopPruner.run` has the stage runner
(:mod:`.runner`) call them in order, writing every stage's result atomically into ``out_dir`` so
that an interrupted run resumes from its last complete stage.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..data import Splits, load_splits
from ..export import save_model
from ..models import data_config
from ..nn.scop_conv import convert as convert_layers
from ..nn.scop_conv import restore, scop_layers
from ..prune.flops import count_flops, count_params
from ..prune.importance import make_importance
from ..prune.select import Plan, cuts, make_policy
from ..prune.space import PruningSpace
from ..prune.surgery import apply_plan, channel_widths
from ..scales.learn import MIN_SPREAD, fit_knockoff_biases, learn_scales
from ..scales.pairs import PairedDataset, pair_dataset
from ..train import checkpoint, distributed, resources
from ..train.training import (
    amp_dtype,
    default_amp,
    evaluate,
    fit,
    make_loader,
    recalibrate_bn,
)
from .config import PruneConfig
from .folder import RunFolder
from .presets import PRESETS
from .report import (
    latency_models,
    latency_section,
    measure_after,
    time_before_after,
    write_report,
)
from .runner import STAGES, StageRunner
from .trained_model import check_conv_names, load_trained, model_sizes

__all__ = ["ScopPruner", "STAGES"]

logger = logging.getLogger(__name__)



Importance = Callable[[nn.Module], Mapping[str, Tensor]]
Policy = Callable[..., Plan]  # (space, scores, **measured) -> plan


class ScopPruner:
    """One SCOP run: from a trained model to a smaller, fine-tuned one.

    Built, like Torch-Pruning's pruners, from the objects it works with; :meth:`from_config`
    builds them from a :class:`PruneConfig`.

    Args:
        model: the trained network.
        example_input: one input, (1, C, H, W): traced for the channel groups, FLOPs and memory.
        importance: stage 3's criterion, ``importance(model) -> {conv name: (C_out,) scores}``
            (:mod:`scop_ext.prune.importance`).
        policy: stage 3's policy, ``policy(space, scores) -> {conv name: [channels to remove]}``
            (:func:`scop_ext.prune.make_policy`); ``latency_target`` is also given the
            ``latency_model`` measured on ``model`` when it runs.
        data: what the run trains on, picks the fine-tuning epoch with and reports on
            (:func:`scop_ext.data.load_splits`): everything trained (knockoffs, scales, BN
            statistics, weights) sees ``data.train``; the test split only reports.
        config: the settings of every stage (its ``importance`` and ``policy`` keys are recorded;
            the objects above are what runs).
        out_dir: where every stage writes its result (``state.json`` lists the completed stages).

    Example::

        >>> pruner = ScopPruner.from_config(PruneConfig(weights="runs/base/model"), "runs/prune")
        >>> results = pruner.run()          # or call the steps one by one:
        >>> pruner.fit_knockoffs(); pruner.convert(); pruner.learn_scales(); ...
    """

    def __init__(self, model: nn.Module, example_input: Tensor, importance: Importance, policy: Policy, *,
                 data: Splits, config: PruneConfig, out_dir: str | os.PathLike, progress: bool = True, log=None):
        config.validate()
        self.config, self.out_dir, self.progress = config, os.fspath(out_dir), progress
        self.folder = RunFolder(self.out_dir)
        self.log = (log or logger.info) if distributed.is_main() else (lambda *a, **k: None)
        self.device = config.resolved_device()
        self.importance, self.policy, self.info = importance, policy, data.info
        self.train_set, self.train_aug, self.val_set, self.test_set = data.train, data.train_aug, data.val, data.test
        self.model = model.to(self.device)
        self.example = example_input
        what = f"the model ({config.weights})" if config.weights else "the model"
        self.num_classes, self.in_channels = model_sizes(self.model, example_input.to(self.device), data.info, what)
        # A preset's own patterns are written for every architecture (CIFAR's shortcut.0 and
        # torchvision's downsample.0), so only the names a user chose must match this model.
        generic = PRESETS.get(config.preset, {}).get("skip", []) if config.preset else []
        check_conv_names(self.model, "skip", [p for p in config.skip if p not in generic])
        check_conv_names(self.model, "ignored_layers", config.ignored_layers)
        self.knockoffs = None
        self._dense: nn.Module | None = None  # the unpruned network, timed beside the pruned one
        self.plan: dict[str, list[int]] | None = None
        self.results: dict[str, Any] = {"config": config.to_dict(), "notes": []}
        self.completed: list[str] = []  # the stages whose results are in out_dir (STAGES names)
        self._claimed = False

    @classmethod
    def from_config(cls, config: PruneConfig, out_dir: str | os.PathLike, model: nn.Module | None = None,
                    progress: bool = True, log=None) -> ScopPruner:
        """The run ``config`` describes: its data, its criterion and policy, and ``model`` (built
        from ``config.model`` / ``config.weights`` if None). Image folders are prepared the way
        the model's pretrained weights expect (:func:`scop_ext.models.data_config`)."""
        config.validate()
        normalization = data_config(config.model) if config.dataset == "imagefolder" else None
        data = load_splits(config.dataset, config.data_root, image_size=config.image_size,
                           val_fraction=config.val_fraction, normalization=normalization)
        if model is None:
            if not config.weights:
                logger.warning("no weights given: %s is pruned from its random initialisation; SCOP prunes a "
                               "trained network (set weights)", config.model)
            model = load_trained(config.model, data.info, config.weights)
        return cls(model, data.train[0][0][None], make_importance(config.importance, **config.importance_params()),
                   make_policy(config.policy, **config.policy_params()), data=data, config=config, out_dir=out_dir,
                   progress=progress, log=log)

    # ------------------------------------------------------------------ bookkeeping

    def _path(self, name: str) -> str:
        """Where the run's file ``name`` goes; the first call claims out_dir for this run (a folder of
        another command or of another config is refused before anything is written)."""
        if not self._claimed and distributed.is_main():
            self.folder.claim(self.config.to_dict())
            self._claimed = True
        return self.folder.path(name)

    def _loader(self, dataset, *, shuffle: bool, evaluation: bool = False, batch_size: int | None = None,
                sharded: bool = True):
        return make_loader(dataset, batch_size or self.config.batch_size, shuffle=shuffle, seed=self.config.seed,
                           evaluation=evaluation, sharded=sharded)

    def _metrics(self, model: nn.Module) -> dict[str, Any]:
        model.eval()
        m = evaluate(model, self._loader(self.test_set, shuffle=False, evaluation=True, batch_size=256), self.device)
        return {"params": count_params(model), "flops": count_flops(model, self.example.to(self.device)), **m}

    def _complete(self, stage: str) -> None:
        """Record in out_dir that ``stage`` is done, with the results so far: called by the step
        that finishes it, so a run made of single steps is a run that ``scop report`` reads and
        ``run(resume=True)`` continues, as one made by :meth:`run`."""
        if stage not in self.completed:
            self.completed.append(stage)
        if distributed.is_main():
            self._path("state.json")
            self.folder.write_state([s for s in STAGES if s in self.completed], self.results)
        distributed.barrier()

    def _keep_dense(self) -> None:
        """Keep a plain copy of the unpruned network, for the report's latency, timed beside the
        pruned one. Call it while ``model`` is still unpruned (converted or not)."""
        if self._dense is None:
            self._dense = restore(copy.deepcopy(self.model)).eval()

    # ------------------------------------------------------------------ the steps

    def fit_knockoffs(self):
        """Stage 1: fit the knockoff generator on the (unaugmented) training images.

        A KnockoffGAN trains on the config's device and checkpoints into ``knockoffs-progress.pt``
        in out_dir, so a killed stage 1 resumes. Under torchrun every process fits on the whole
        training set in the same order (none waits idle for another, which could outlast the
        process group's timeout), then all take process 0's state, so they sample the same
        knockoffs even where CUDA kernels are not deterministic.
        """
        from ..knockoffs import KnockoffGAN, make_generator

        torch.manual_seed(self.config.seed)
        if self.config.knockoffs_file:
            return self._use_knockoffs(self.config.knockoffs_file)
        gen = make_generator(self.config.knockoffs, **self.config.knockoff_options)
        loader = self._loader(self.train_set, shuffle=True, sharded=False)
        if isinstance(gen, KnockoffGAN):
            # Every process resumes from and writes the same file (each write a rename, so it is
            # always whole): none starts behind the others.
            gen.fit(loader, device=self.device, checkpoint=self._path("knockoffs-progress.pt"), resume=True,
                    progress=self.progress and distributed.is_main())
        else:
            gen.fit(loader)
        gen.to("cpu")  # sampled where the copy a resumed run loads from knockoffs.pt is
        distributed.broadcast_(gen.state_dict().values())
        self.knockoffs = gen
        if distributed.is_main():
            gen.save(self._path("knockoffs.pt"))
        self._complete("knockoffs")
        return gen

    def _use_knockoffs(self, path: str):
        """Stage 1 from a generator ``scop knockoffs fit`` wrote: checked against this data's
        images, and copied into out_dir so a resumed run uses the same one."""
        from ..knockoffs import load

        gen = load(path)
        shape = tuple(self.example.shape[1:])
        try:
            with torch.no_grad():
                gen.sample(self.example.cpu())
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"knockoffs_file {path}: does not fit the dataset's {shape} images "
                             f"({str(exc).splitlines()[0]})") from None
        self.knockoffs = gen
        if distributed.is_main():
            gen.save(self._path("knockoffs.pt"))
        self._complete("knockoffs")
        return gen

    def convert(self) -> dict[str, nn.Module]:
        """Stage 2, first step: wrap the convolutions (all but ``config.skip``) as ScopConv2d in SCOP mode."""
        self._keep_dense()
        self.results.setdefault("before", self._metrics(self.model))
        self.results.setdefault("widths_before", channel_widths(self.model))
        convert_layers(self.model, skip=self.config.skip)
        return scop_layers(self.model)

    def _pairs(self):
        sample = self.knockoffs.sample
        if self.config.pair_cache:
            return pair_dataset(self.train_set, sample, seed=self.config.seed)
        return PairedDataset(self.train_set, sample, seed=self.config.seed)

    def _require_memory(self, what: str, *, paired: bool, optimizer_slots: int, host_cache: int = 0,
                        amp: bool = False) -> None:
        """Stop with a ResourceError before ``what`` starts if one process's batch would not fit
        (:func:`scop_ext.resources.require_step`); stage 2 (``paired``) trains the scales only."""
        trainable = {name for name, p in self.model.named_parameters() if p.requires_grad}
        if paired:
            trainable = {f"{name}.beta" for name in scop_layers(self.model)}
        note = resources.require_step(self.model, self.example, self.config.batch_size, self.device, what,
                                      paired=paired, trainable=trainable.__contains__, optimizer_slots=optimizer_slots,
                                      host_cache=host_cache, activation_dtype=amp_dtype(self.device) if amp else None)
        if note:
            self.results["notes"].append(note)

    def learn_scales(self):
        """Stage 2: Lemma 2 bias fit, then beta trained with the weights frozen."""
        cfg = self.config
        cache = 2 * len(self.train_set) * self.example.nbytes if cfg.pair_cache else 0  # x and x~ of every image
        self._require_memory("stage 2 (learn_scales)", paired=True, optimizer_slots=2, host_cache=cache)
        pairs = self._pairs()
        if cfg.knockoff_bias:
            # every process measures s on the same images, so all hold the same Lemma 2 factors
            # the global batch: the same images calibrate s whatever the number of processes
            calibration = DataLoader(pairs, batch_size=cfg.batch_size * distributed.world_size(), shuffle=False)
            report = fit_knockoff_biases(self.model, calibration, self.device, gamma=cfg.bias_gamma)
            self.results["lemma2"] = {name: {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in r.items()}
                                      for name, r in report.items()}
        if cfg.bn != "frozen" and distributed.world_size() > 1:
            self.results["notes"].append(
                f"stage 2 ran on {distributed.world_size()} processes with bn={cfg.bn}: BatchNorm normalised each "
                "process's part of the batch (it is not synchronised), so beta depends on the number of processes; "
                "bn=frozen does not")
        history = learn_scales(
            self.model, self._loader(pairs, shuffle=True), self.device, epochs=cfg.scales_epochs, lr=cfg.scales_lr,
            adam_betas=tuple(cfg.scales_betas), use_knockoff_bias=cfg.knockoff_bias, bn=cfg.bn, seed=cfg.seed,
            checkpoint_path=self._path("scales-progress.pt"), settings=cfg.to_dict(), progress=self.progress,
            metrics_path=self._path("metrics.jsonl"),
        )
        self.results["scales_history"] = history.as_dict()
        if history.spread < MIN_SPREAD:
            self.results["notes"].append(f"beta barely left 0.5 in stage 2 (90% of the filters have |2 beta - 1| < "
                                         f"{history.spread:.3f}): selection was close to random; raise scales_epochs")
        self.results["betas"] = {n: l.beta.detach().cpu().tolist() for n, l in scop_layers(self.model).items()}
        if distributed.is_main():
            checkpoint.save(self._path("scales.pt"), "scales", {"model": self.model.state_dict()})
        self._complete("scales")
        return history

    def select(self) -> dict[str, list[int]]:
        """Stage 3: score every filter and choose what to remove."""
        cfg = self.config
        scores = self.importance(self.model)
        space = PruningSpace(self.model, self.example.to(self.device), ignored_layers=cfg.ignored_layers,
                             block_width=cfg.block_width)
        measured = {}  # latency_target's model is measured on this model, so it joins the policy here
        if cfg.policy == "latency_target":
            latency = latency_models(self.model, self.example.to(self.device), space.groups, cfg.latency_batch,
                                     cfg.latency_cache or self.out_dir, device=self.device, progress=self.progress,
                                     log=self.log, **cfg.latency_settings())
            measured["latency_model"] = latency[cfg.latency_batch]
        self.plan = self.policy(space, scores, **measured)
        if cfg.policy == "latency_target":  # timings differ between processes: all take process 0's plan
            self.plan = distributed.gather_objects(self.plan)[0]
            self.results["latency"] = latency_section(latency, self.plan, **cfg.latency_settings())
        self.results["importance"] = {n: s.detach().cpu().tolist() for n, s in scores.items()}
        self.results["removed"] = self.plan
        self.results["cuts"] = cuts(space, scores, self.plan)
        self.results["predicted_flops_reduction"] = space.reduction(self.plan)
        if distributed.is_main():
            checkpoint.write_json(self._path("plan.json"), self.plan)
        self._complete("select")
        return self.plan

    def prune(self) -> nn.Module:
        """Stage 4, physical pruning: remove the planned filters; the model becomes plain nn.Conv2d layers."""
        if self.plan is None:
            raise RuntimeError("prune() needs a plan: call select() first")
        apply_plan(self.model, self.example.to(self.device), self.plan, block_width=self.config.block_width)
        self.results["widths_after"] = channel_widths(self.model)
        return self.model

    def recalibrate_bn(self) -> int:
        """Stage 4, after pruning: re-estimate BN statistics of the pruned network on training data.

        Under torchrun every process runs the same whole batches, so all hold the same statistics.
        """
        used = recalibrate_bn(self.model, self._loader(self.train_set, shuffle=True, sharded=False), self.device,
                              batches=self.config.bn_batches)
        self.results["after_prune"] = self._metrics(self.model)
        if distributed.is_main():
            self._save_model("pruned")
        self._complete("prune")
        return used

    def finetune(self):
        """Stage 4, fine-tuning: train all weights; the best epoch on the held-out validation part is kept
        (the last epoch with ``val_fraction = 0``)."""
        cfg = self.config
        if cfg.finetune_epochs > 0:
            amp = default_amp(self.device) if cfg.amp is None else cfg.amp
            self._require_memory("fine-tuning", paired=False, optimizer_slots=1, amp=amp)
            val = self._loader(self.val_set, shuffle=False, evaluation=True, batch_size=256) if self.val_set else None
            result = fit(self.model, self._loader(self.train_aug, shuffle=True), val,
                         epochs=cfg.finetune_epochs, lr=cfg.finetune_lr, device=self.device,
                         weight_decay=cfg.weight_decay, amp=amp, stage="finetune",
                         checkpoint_path=self._path("finetune-progress.pt"), settings=cfg.to_dict(),
                         progress=self.progress, metrics_path=self._path("metrics.jsonl"))
            self.results["finetune_history"] = result.history
        if distributed.is_main():
            self._save_model("final")
        self._complete("finetune")
        return self.model

    def evaluate(self) -> dict[str, Any]:
        """Test metrics of the pruned network; with ``config.latency`` its latency and the dense
        network's, timed in turns (batch 1 and 64) so a busy spell falls on both."""
        self.results["after"] = self._metrics(self.model)
        if self.config.latency and distributed.is_main() and self._dense is not None:
            timed = time_before_after(self._dense, self.model, self.example, self.device)
            for which in ("before", "after"):
                self.results.setdefault(which, {}).update(timed[which])
            self.results["latency_conditions"] = timed["conditions"]
        if self.results.get("latency") and distributed.is_main():
            measure_after(self.results["latency"], self.model, self.example, self.device)
        return self.results["after"]

    def report(self) -> dict[str, str]:
        """Write report.md, report.json and the plots into out_dir."""
        before, after = self.results.get("before", {}), self.results.get("after", {})
        if before.get("flops") and after.get("flops"):
            self.results["flops_reduction"] = 1 - after["flops"] / before["flops"]
        paths = write_report(self.out_dir, self.results) if distributed.is_main() else {}
        self._complete("report")
        return paths

    def _save_model(self, stem: str) -> None:
        save_model(self.model, self._path(stem), model_name=self.config.model, num_classes=self.num_classes,
                   in_channels=self.in_channels)

    # ------------------------------------------------------------------ the whole run

    def run(self, resume: bool = False) -> dict[str, Any]:
        """All steps in order, each stage's result written to ``out_dir`` as it completes; with
        ``resume`` the stages an interrupted run completed are loaded instead of rerun
        (:class:`~scop_ext.run.runner.StageRunner`, which also holds the folder's lock)."""
        return StageRunner(self).run(resume)
