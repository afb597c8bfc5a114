"""The whole SCOP run as one object with plain steps (DESIGN.md §1, stages 1-4).

    fit_knockoffs -> convert -> learn_scales -> select -> prune -> recalibrate_bn -> finetune
    -> evaluate -> report

:class:`ScopPruner` holds the model, data and configuration; each step can be called on its own,
and :meth:`ScopPruner.run` calls them in order, writing every stage's result atomically into
``out_dir`` so an interrupted run resumes from its last complete stage.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import json
import math
import os
import time
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from .. import checkpoint
from ..data import holdout, load_dataset
from ..layers import convert as convert_layers
from ..layers import scop_layers
from ..models import build_model
from ..runlock import RunLock
from . import distributed, resources
from .export import load_model, read_arch, save_model
from .flops import count_flops, count_params
from .importance import make_importance
from .report import measure_latency, write_report
from .scales import PairedDataset, fit_knockoff_biases, learn_scales, pair_dataset
from .select import PruningSpace, cuts, select
from .surgery import apply_plan, channel_widths
from .train import amp_dtype, default_amp, evaluate, fit, make_loader, recalibrate_bn

__all__ = ["PruneConfig", "ScopPruner", "STAGES"]

STAGES = ("knockoffs", "scales", "select", "prune", "finetune", "report")


@dataclass
class PruneConfig:
    """Every setting of a run; plain values only, so it round-trips through JSON and YAML.

    Stage 2 defaults are the authors' (Adam 0.004, betas (0.5, 0.9), beta from 0.5); fine-tuning
    is SGD Nesterov with momentum 0.9, weight decay 1e-4 and a cosine schedule.
    """

    model: str = "resnet_digits"
    weights: str | None = None  # trained baseline: .safetensors / state_dict file, or a save_model stem
    dataset: str = "digits"
    data_root: str | None = None
    image_size: int = 224  # imagefolder only
    batch_size: int = 64
    val_fraction: float = 0.1  # of the training split, held out to pick the best fine-tuning epoch
    # stage 1
    knockoffs: str = "gaussian"
    knockoff_options: dict = field(default_factory=dict)
    pair_cache: bool = True  # draw one knockoff per image up front (False: on the fly, for big data)
    # stage 2
    skip: list = field(default_factory=list)  # conv names/patterns left unwrapped
    scales_epochs: int = 20
    scales_lr: float = 0.004
    scales_betas: tuple = (0.5, 0.9)
    knockoff_bias: bool = True
    bias_gamma: float | None = None
    bn: str = "batch"
    # stage 3
    importance: str = "scop"
    multiply_bn_gamma: bool = False
    policy: str = "flops_target"
    ratio: float = 0.5  # uniform / global_ranking
    normalize: str = "auto"  # global_ranking: "max", "none", or "auto" (by criterion, see ranking_normalize)
    flops_reduction: float = 0.5  # flops_target
    fdr_q: float = 0.1  # fdr
    fdr_scope: str = "layer"
    min_channels: int = 1
    round_to: int = 1
    ignored_layers: list = field(default_factory=list)
    keep_block_width: bool = False
    # stage 4
    bn_batches: int = 50
    finetune_epochs: int = 10
    finetune_lr: float = 0.01
    weight_decay: float = 1e-4
    amp: bool | None = None
    # run
    device: str = "cpu"
    seed: int = 0
    latency: bool = True

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PruneConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in set(values) - known)  # YAML keys need not be strings
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        cfg = cls(**values)
        cfg.validate()
        return cfg

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> PruneConfig:
        """Read a YAML or JSON config (by extension; YAML also reads JSON)."""
        return cls.from_dict(cls.file_values(path))

    @classmethod
    def file_values(cls, path: str | os.PathLike) -> dict[str, Any]:
        """The keys a YAML or JSON config file sets, checked as :meth:`from_file` checks them; keys
        it leaves out are absent (not filled with defaults), so a caller can tell them apart."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise ValueError(f"{path}: cannot read config ({exc.strerror})") from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: malformed config (not UTF-8 text: byte {exc.start})") from None
        try:
            if path.endswith(".json"):
                values = checkpoint.load_json(text)
            else:
                values = checkpoint.load_yaml(text)
        except Exception as exc:  # the parsers' own error types vary; one clear line either way
            raise ValueError(f"{path}: malformed config ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: a config must be a mapping of keys to values, got {type(values).__name__}")
        try:
            cls.from_dict(values)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None
        return values

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["scales_betas"] = list(self.scales_betas)
        return d

    def validate(self) -> None:
        """Raise ValueError naming the first key whose value has the wrong type or is out of range.

        Everything is checked here, before any work: a typo found at stage 3 would cost stage 2.
        """
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _has_type(value, hints[f.name]):
                raise ValueError(f"{f.name} must be {_type_name(hints[f.name])}, got {type(value).__name__} {value!r}")
            where = _nonfinite(value, f.name)
            if where:  # inf passes "> 0" and NaN fails every range test silently: refuse both by name
                raise ValueError(f"{where} must be a finite number, got {value!r}")
        from ..knockoffs.base import _REGISTRY as knockoff_kinds
        from .importance import _CRITERIA

        checks = [
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (0.0 <= self.val_fraction < 1.0, "val_fraction must be in [0, 1)"),
            (self.scales_epochs >= 1, "scales_epochs must be >= 1"),
            (self.finetune_epochs >= 0, "finetune_epochs must be >= 0"),
            (self.bn in ("batch", "frozen"), "bn must be 'batch' or 'frozen'"),
            (self.policy in ("uniform", "global_ranking", "flops_target", "fdr"),
             "policy must be one of uniform, global_ranking, flops_target, fdr"),
            (0.0 <= self.ratio < 1.0, "ratio must be in [0, 1)"),
            (self.normalize in ("auto", "max", "none"), "normalize must be 'auto', 'max' or 'none'"),
            (0.0 <= self.flops_reduction < 1.0, "flops_reduction must be in [0, 1)"),
            (0.0 < self.fdr_q < 1.0, "fdr_q must be in (0, 1)"),
            (self.min_channels >= 1 and self.round_to >= 1, "min_channels and round_to must be >= 1"),
            (len(self.scales_betas) == 2 and all(_has_type(b, float) and 0.0 <= b < 1.0 for b in self.scales_betas),
             "scales_betas must be a pair of numbers in [0, 1)"),
            (self.scales_lr > 0 and self.finetune_lr > 0, "scales_lr and finetune_lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.bias_gamma is None or self.bias_gamma > 0, "bias_gamma must be > 0 (or null for the default)"),
            (self.bn_batches >= 1 and self.image_size >= 1, "bn_batches and image_size must be >= 1"),
            (self.fdr_scope in ("layer", "global"), "fdr_scope must be 'layer' or 'global'"),
            (self.importance in _CRITERIA, f"importance must be one of {', '.join(sorted(_CRITERIA))}"),
            (self.knockoffs in knockoff_kinds, f"knockoffs must be one of {', '.join(sorted(knockoff_kinds))}"),
            (all(isinstance(v, str) for v in [*self.skip, *self.ignored_layers, *self.knockoff_options]),
             "skip, ignored_layers and the keys of knockoff_options must be strings"),
            (_is_device(self.device), f"device must be a device name such as cpu or cuda:0, got {self.device!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        from ..knockoffs import make_generator

        try:  # the generator's own constructor is the list of what it takes and accepts
            make_generator(self.knockoffs, **self.knockoff_options)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"knockoff_options: {exc}") from None

    def ranking_normalize(self) -> str | None:
        """The ``normalize`` of :func:`~scop_ext.prune.select.global_ranking`.

        ``"auto"`` ranks SCOP's ``2 beta - 1`` raw, since it is on one scale in [-1, 1] in every
        layer, and divides by each group's largest score for every other criterion (and for SCOP
        times |gamma|), whose scale differs from layer to layer.
        """
        if self.normalize != "auto":
            return None if self.normalize == "none" else "max"
        return None if self.importance == "scop" and not self.multiply_bn_gamma else "max"

    def policy_params(self) -> dict[str, Any]:
        common = {"min_channels": self.min_channels, "round_to": self.round_to}
        specific = {
            "uniform": {"ratio": self.ratio},
            "global_ranking": {"ratio": self.ratio, "normalize": self.ranking_normalize()},
            "flops_target": {"reduction": self.flops_reduction},
            "fdr": {"q": self.fdr_q, "scope": self.fdr_scope},
        }[self.policy]
        return {**common, **specific}


def _has_type(value, hint) -> bool:
    if isinstance(hint, types.UnionType):
        return any(_has_type(value, h) for h in typing.get_args(hint))
    hint = typing.get_origin(hint) or hint
    if hint is type(None):
        return value is None
    if isinstance(value, bool):  # bool is an int subclass, but "batch_size: true" is a mistake
        return hint is bool
    if hint is float:
        return isinstance(value, (int, float))
    if hint is tuple:  # JSON and YAML have lists only
        return isinstance(value, (tuple, list))
    return isinstance(value, hint)


def _type_name(hint) -> str:
    if isinstance(hint, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    hint = typing.get_origin(hint) or hint
    return {type(None): "null", int: "an integer", float: "a number", bool: "true or false", str: "a string",
            dict: "a mapping", list: "a list", tuple: "a list"}[hint]


def _nonfinite(value, key: str) -> str | None:
    """The key (``scales_betas[1]``, ``knockoff_options.lr``) of the first NaN/Inf in ``value``."""
    if isinstance(value, float) and not math.isfinite(value):
        return key
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for k, v in items:
        found = _nonfinite(v, f"{key}.{k}" if isinstance(value, dict) else f"{key}[{k}]")
        if found:
            return found
    return None


def _is_device(name: str) -> bool:
    try:
        torch.device(name)
    except RuntimeError:
        return False
    return True


def _load_weights(model_name: str, info, weights: str | None) -> tuple[nn.Module, dict]:
    """The trained model and what it was built for: ``(model, {"num_classes", "in_channels"})``.

    A ``save_model`` stem (the output of ``scop train``) describes its own architecture; a config
    naming another model is refused rather than recorded beside weights it cannot reload.
    """
    if weights and os.path.isfile(str(weights) + ".json"):
        arch = read_arch(weights)
        if arch["model"] != model_name:
            raise ValueError(f"weights {weights}: is a {arch['model']!r} model ({weights}.json), but model is "
                             f"{model_name!r}; set model to {arch['model']!r}")
        model, arch = load_model(weights)
        return model, {"num_classes": arch["num_classes"], "in_channels": arch["in_channels"]}
    model = build_model(model_name, info.num_classes, info.in_channels, weights=weights)
    return model, {"num_classes": info.num_classes, "in_channels": info.in_channels}


def _first_conv_channels(model: nn.Module) -> int | None:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return None if conv is None else conv.in_channels


def _check_names(model: nn.Module, key: str, patterns: list[str]) -> None:
    """Every name or pattern in ``patterns`` must match a convolution of ``model`` (a typo would
    otherwise be ignored silently and the layer wrapped or pruned after all)."""
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in convs):
            near = difflib.get_close_matches(pattern, convs, n=3, cutoff=0.3) or convs[:3]
            raise ValueError(f"{key}: {pattern!r} names no convolution of the model; nearest: {', '.join(near)}")


class ScopPruner:
    """One SCOP run: from a trained model to a smaller, fine-tuned one.

    Args:
        config: a :class:`PruneConfig`.
        out_dir: where every stage writes its result (``state.json`` lists the completed stages).
        model: the trained network; built from ``config.model`` / ``config.weights`` if None.

    Example::

        >>> pruner = ScopPruner(PruneConfig(weights="runs/base/model"), "runs/prune")
        >>> results = pruner.run()          # or call the steps one by one:
        >>> pruner.fit_knockoffs(); pruner.convert(); pruner.learn_scales(); ...
    """

    def __init__(self, config: PruneConfig, out_dir: str | os.PathLike, model: nn.Module | None = None,
                 progress: bool = True, log=print):
        config.validate()
        self.config, self.out_dir, self.progress = config, os.fspath(out_dir), progress
        self.log = log if distributed.is_main() else (lambda *a, **k: None)
        self.device = torch.device(config.device)
        train_plain, self.info = load_dataset(config.dataset, config.data_root, "train",
                                                 image_size=config.image_size, augment=False)
        train_aug, _ = load_dataset(config.dataset, config.data_root, "train", image_size=config.image_size)
        self.test_set, _ = load_dataset(config.dataset, config.data_root, "test", image_size=config.image_size)
        # Everything trained (knockoffs, scales, BN statistics, weights) sees the training part;
        # the held-out part picks the fine-tuning epoch; the test split only reports.
        fit_idx, val_idx = holdout(len(train_plain), config.val_fraction)
        self.train_set, self.train_aug = Subset(train_plain, fit_idx), Subset(train_aug, fit_idx)
        self.val_set = Subset(train_plain, val_idx) if val_idx else None
        if model is None:
            self.model, built = _load_weights(config.model, self.info, config.weights)
        else:
            self.model, built = model, {"num_classes": self.info.num_classes, "in_channels": _first_conv_channels(model)}
        self.num_classes, self.in_channels = built["num_classes"], built["in_channels"]
        self._check_model_fits_data()
        _check_names(self.model, "skip", config.skip)
        _check_names(self.model, "ignored_layers", config.ignored_layers)
        self.model.to(self.device)
        self.example = self.train_set[0][0][None]
        self.knockoffs = None
        self.plan: dict[str, list[int]] | None = None
        self.results: dict[str, Any] = {"config": config.to_dict(), "notes": []}
        self.completed: list[str] = []

    def _check_model_fits_data(self) -> None:
        what = f"the model ({self.config.weights})" if self.config.weights else "the model"
        if self.in_channels is not None and self.in_channels != self.info.in_channels:
            raise ValueError(f"dataset {self.config.dataset!r} has {self.info.in_channels}-channel images, but {what} "
                             f"takes {self.in_channels} channels")
        if self.info.num_classes > self.num_classes:
            raise ValueError(f"dataset {self.config.dataset!r} has {self.info.num_classes} classes, but {what} has "
                             f"{self.num_classes} outputs")

    # ------------------------------------------------------------------ bookkeeping

    def _path(self, name: str) -> str:
        return os.path.join(self.out_dir, name)

    def _loader(self, dataset, *, shuffle: bool, evaluation: bool = False, batch_size: int | None = None,
                sharded: bool = True):
        return make_loader(dataset, batch_size or self.config.batch_size, shuffle=shuffle, seed=self.config.seed,
                           evaluation=evaluation, sharded=sharded)

    def _finish(self, stage: str) -> None:
        self.completed.append(stage)
        if distributed.is_main():
            checkpoint.write_json(self._path("state.json"), {"completed": self.completed, "results": self.results})
        distributed.barrier()

    def _metrics(self, model: nn.Module) -> dict[str, Any]:
        model.eval()
        m = evaluate(model, self._loader(self.test_set, shuffle=False, evaluation=True, batch_size=256), self.device)
        example = self.example.to(self.device)
        metrics = {"params": count_params(model), "flops": count_flops(model, example), **m}
        if self.config.latency and distributed.is_main():
            metrics["latency_ms_b1"] = measure_latency(model, example, 1, self.device)
            metrics["latency_ms_b64"] = measure_latency(model, example, 64, self.device)
        return metrics

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
        return gen

    def convert(self) -> dict[str, nn.Module]:
        """Wrap the convolutions (all but ``config.skip``) as ScopConv2d in SCOP mode."""
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
        """Stop with a ResourceError before ``what`` starts if its batch would not fit (see resources.py).

        Under torchrun each process holds batch_size images (the global batch is batch_size x
        world), so the check is of what every process needs on its own device.
        """
        trainable = {name for name, p in self.model.named_parameters() if p.requires_grad}
        if paired:  # stage 2 trains the scales only
            trainable = {f"{name}.beta" for name in scop_layers(self.model)}
        try:
            estimate = resources.estimate_step(self.model, self.example, paired=paired, trainable=trainable.__contains__,
                                               optimizer_slots=optimizer_slots,
                                               activation_dtype=amp_dtype(self.device) if amp else None)
        except (NotImplementedError, RuntimeError) as exc:  # a model the meta device cannot run
            self.results["notes"].append(f"{what}: memory use not predicted ({type(exc).__name__}: {str(exc).splitlines()[0]})")
            return
        if host_cache and self.device.type != "cpu":
            resources.require(resources.MemoryEstimate(0, {"pair cache": host_cache}), 0, "cpu", what)
        elif host_cache:
            estimate.fixed["pair cache"] = host_cache
        resources.require(estimate, self.config.batch_size, self.device, what)

    def learn_scales(self):
        """Stage 2: Lemma 2 bias fit, then beta trained with the weights frozen."""
        cfg = self.config
        cache = 2 * len(self.train_set) * self.example.nbytes if cfg.pair_cache else 0  # x and x~ of every image
        self._require_memory("stage 2 (learn_scales)", paired=True, optimizer_slots=2, host_cache=cache)
        pairs = self._pairs()
        if cfg.knockoff_bias:
            # every process measures s on the same images, so all hold the same Lemma 2 factors
            calibration = DataLoader(pairs, batch_size=cfg.batch_size, shuffle=False)
            report = fit_knockoff_biases(self.model, calibration, self.device, gamma=cfg.bias_gamma)
            self.results["lemma2"] = {name: {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in r.items()}
                                      for name, r in report.items()}
        if cfg.bn == "batch" and distributed.world_size() > 1:
            self.results["notes"].append(
                f"stage 2 ran on {distributed.world_size()} processes with bn=batch: BatchNorm normalised each "
                "process's part of the batch (it is not synchronised), so beta depends on the number of processes; "
                "bn=frozen does not")
        history = learn_scales(
            self.model, self._loader(pairs, shuffle=True), self.device, epochs=cfg.scales_epochs, lr=cfg.scales_lr,
            betas=tuple(cfg.scales_betas), knockoff_bias=cfg.knockoff_bias, bn=cfg.bn, seed=cfg.seed,
            checkpoint_path=self._path("scales-progress.pt"), settings=cfg.to_dict(), progress=self.progress,
        )
        self.results["scales_history"] = history.as_dict()
        self.results["betas"] = {n: l.beta.detach().cpu().tolist() for n, l in scop_layers(self.model).items()}
        if distributed.is_main():
            checkpoint.save(self._path("scales.pt"), "scales", {"model": self.model.state_dict()})
        return history

    def select(self) -> dict[str, list[int]]:
        """Stage 3: score every filter and choose what to remove."""
        cfg = self.config
        kw = {"multiply_bn_gamma": cfg.multiply_bn_gamma} if cfg.importance == "scop" else {}
        if cfg.importance == "random":
            kw = {"seed": cfg.seed}
        scores = make_importance(cfg.importance, **kw)(self.model)
        space = PruningSpace(self.model, self.example.to(self.device), ignored_layers=cfg.ignored_layers,
                             keep_block_width=cfg.keep_block_width)
        self.plan = select(space, scores, cfg.policy, **cfg.policy_params())
        self.results["importance"] = {n: s.detach().cpu().tolist() for n, s in scores.items()}
        self.results["removed"] = self.plan
        self.results["cuts"] = cuts(space, scores, self.plan)
        self.results["predicted_flops_reduction"] = space.reduction(self.plan)
        if distributed.is_main():
            checkpoint.write_json(self._path("plan.json"), self.plan)
        return self.plan

    def prune(self) -> nn.Module:
        """Stage 4a: remove the planned filters physically; the model becomes plain nn.Conv2d layers."""
        if self.plan is None:
            raise RuntimeError("prune() needs a plan: call select() first")
        apply_plan(self.model, self.example.to(self.device), self.plan, keep_block_width=self.config.keep_block_width)
        self.results["widths_after"] = channel_widths(self.model)
        return self.model

    def recalibrate_bn(self) -> int:
        """Stage 4b: re-estimate BN statistics of the pruned network on training data.

        Under torchrun every process runs the same whole batches, so all hold the same statistics.
        """
        used = recalibrate_bn(self.model, self._loader(self.train_set, shuffle=True, sharded=False), self.device,
                              batches=self.config.bn_batches)
        self.results["after_prune"] = self._metrics(self.model)
        if distributed.is_main():
            self._save_model("pruned")
        return used

    def finetune(self):
        """Stage 4c: fine-tune all weights; the best epoch on the held-out validation part is kept
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
                         progress=self.progress)
            self.results["finetune_history"] = result.history
        if distributed.is_main():
            self._save_model("final")
        return self.model

    def evaluate(self) -> dict[str, Any]:
        self.results["after"] = self._metrics(self.model)
        return self.results["after"]

    def report(self) -> dict[str, str]:
        """Write report.md, report.json and the plots into out_dir."""
        before, after = self.results.get("before", {}), self.results.get("after", {})
        if before.get("flops") and after.get("flops"):
            self.results["flops_reduction"] = 1 - after["flops"] / before["flops"]
        paths = write_report(self.out_dir, self.results) if distributed.is_main() else {}
        return paths

    def _save_model(self, stem: str) -> None:
        save_model(self.model, self._path(stem), model_name=self.config.model, num_classes=self.num_classes,
                   in_channels=self.in_channels or self.info.in_channels)

    # ------------------------------------------------------------------ the whole run

    def run(self, resume: bool = False) -> dict[str, Any]:
        """All steps in order; with ``resume`` completed stages are loaded from out_dir instead of rerun.

        Process 0 holds out_dir's :class:`~scop_ext.runlock.RunLock` for the whole run, so a
        second run into the same folder is refused (naming this one's pid) instead of mixing
        the two; the lock of a killed run is free at once, for ``resume``.
        """
        lock = RunLock(self.out_dir)
        try:
            if distributed.is_main():
                lock.acquire()
            return self._run(resume)
        finally:
            lock.release()

    def _run(self, resume: bool) -> dict[str, Any]:
        if distributed.is_main():
            for name in os.listdir(self.out_dir):  # left by writes a kill interrupted (checkpoint.atomic_write_bytes)
                if name.startswith(checkpoint.TEMP_PREFIX):
                    os.unlink(self._path(name))
        state = self._resume_state() if resume else None
        done = set(state["completed"]) if state else set()
        if state:
            self.results.update(state["results"])
        if not resume and distributed.is_main():
            # Not resuming means starting over, but only over a run of these same settings: the
            # work of another is never deleted. With --resume progress files stay, even before
            # state.json exists (a kill in stage 1), and each is refused if it belongs to another config.
            progress = sorted(name for name in os.listdir(self.out_dir) if name.endswith("-progress.pt"))
            self._refuse_another_run(progress)
            for name in progress:
                os.unlink(self._path(name))
        if distributed.is_main():
            checkpoint.write_json(self._path("config.json"), self.config.to_dict())
        distributed.barrier()  # the others start once process 0 has cleaned the folder
        start = time.time()
        steps = {
            "knockoffs": (self.fit_knockoffs, self._load_knockoffs),
            "scales": (self._stage_scales, self._load_scales),
            "select": (self.select, self._load_plan),
            "prune": (self._stage_prune, lambda: self._load_model_stage("pruned")),
            "finetune": (self.finetune, lambda: self._load_model_stage("final")),
            "report": (self._stage_report, lambda: None),
        }
        for stage in STAGES:
            compute, load = steps[stage]
            if stage in done:
                load()
                self.completed.append(stage)
                self.log(f"[{stage}] loaded from {self.out_dir}")
                continue
            t = time.time()
            self.log(f"[{stage}] running")
            # Every computed stage starts from the same global random state whether or not the
            # run was resumed before it (augmentation and any unseeded draw use it).
            torch.manual_seed(self.config.seed * len(STAGES) + STAGES.index(stage))
            compute()
            self._finish(stage)
            self.log(f"[{stage}] done in {time.time() - t:.1f} s")
        self.results["seconds"] = self.results.get("seconds", 0.0) + (time.time() - start)
        return self.results

    def _stage_scales(self):
        self.convert()
        return self.learn_scales()

    def _stage_prune(self):
        self.prune()
        self.recalibrate_bn()

    def _stage_report(self):
        self.evaluate()
        self.report()

    def _refuse_another_run(self, progress: list[str]) -> None:
        """ValueError when out_dir holds the files of a run with other settings (or of another
        command), which starting over would overwrite."""
        config_path = self._path("config.json")
        if os.path.exists(config_path):
            saved = _read_json(config_path, dict)
            ours = self.config.to_dict()
            if saved != ours:
                differ = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k))
                detail = ", ".join(f"{k}: {json.dumps(saved.get(k))} there, {json.dumps(ours.get(k))} now" for k in differ)
                raise ValueError(f"{self.out_dir}: holds a run of other settings ({detail}), which is never overwritten; "
                                 "rerun with its settings and --resume, or give another --out")
        elif progress or os.path.exists(self._path("state.json")):
            found = progress or ["state.json"]
            raise ValueError(f"{self.out_dir}: holds {', '.join(found)} but no config.json, so not a run this one can "
                             "start over; give another --out, or delete them")

    def _resume_state(self) -> dict | None:
        path = self._path("state.json")
        if not os.path.exists(path):
            return None
        state = _read_json(path, dict)
        saved = _read_json(self._path("config.json"), dict)
        completed, results = state.get("completed"), state.get("results")
        if not (isinstance(completed, list) and set(completed) <= set(STAGES) and isinstance(results, dict)):
            raise checkpoint.CheckpointError(f"{path}: cannot resume: not a scop run state (expected "
                                             f"{{\"completed\": [stages of {', '.join(STAGES)}], \"results\": {{...}}}})")
        if saved != self.config.to_dict():
            changed = sorted(k for k in set(saved) | set(self.config.to_dict()) if saved.get(k) != self.config.to_dict().get(k))
            raise ValueError(f"{self.out_dir}: cannot resume: the config differs from the interrupted run's in {changed}")
        return state

    def _load_knockoffs(self):
        from ..knockoffs import load

        self.knockoffs = load(self._path("knockoffs.pt"))

    def _load_scales(self):
        convert_layers(self.model, skip=self.config.skip)
        self.model.load_state_dict(checkpoint.load(self._path("scales.pt"), "scales")["model"])
        self.model.to(self.device)

    def _load_plan(self):
        self.plan = _read_json(self._path("plan.json"), dict)

    def _load_model_stage(self, stem: str):
        self.model, _ = load_model(self._path(stem), map_location=self.device)


def _read_json(path: str, kind: type):
    """The JSON value in ``path``, which must be a ``kind``; CheckpointError naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise checkpoint.CheckpointError(f"{path}: run file unreadable ({exc})") from None
    if not isinstance(value, kind):
        raise checkpoint.CheckpointError(f"{path}: run file holds a {type(value).__name__}, expected a "
                                         f"{'mapping' if kind is dict else kind.__name__}")
    return value
