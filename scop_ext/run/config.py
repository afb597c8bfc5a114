"""The settings of one SCOP run (:class:`PruneConfig`), with the type and range checks a YAML or
JSON config file gets before any work starts."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data import MAX_IMAGE_SIZE
from .presets import PRESETS, with_preset

__all__ = ["PruneConfig", "load_json", "load_yaml"]


@dataclass
class PruneConfig:
    """Every setting of a run; plain values only, so it round-trips through JSON and YAML.

    Stage 2 defaults are the authors' (Adam 0.004, betas (0.5, 0.9), beta from 0.5); fine-tuning
    is SGD Nesterov with momentum 0.9, weight decay 1e-4 and a cosine schedule. ``preset``
    (:mod:`~scop_ext.presets`, e.g. ``"authors"``) fills the keys a dict or file leaves out
    when read by :meth:`from_dict` / :meth:`from_file`, the one way to apply it: the
    constructor refuses ``preset``, since it cannot tell a key left out from one given at its
    default value.
    """

    preset: str | None = None
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
    knockoffs_file: str | None = None  # a generator `scop knockoffs fit` wrote: used instead of fitting one
    pair_cache: bool = True  # draw one knockoff per image up front (False: on the fly, for big data)
    # stage 2
    skip: list = field(default_factory=list)  # conv names/patterns left unwrapped
    scales_epochs: int = 20
    scales_lr: float = 0.004
    scales_betas: tuple = (0.5, 0.9)
    knockoff_bias: bool = True
    bias_gamma: float | None = None
    bn: str = "batch"  # stage-2 BatchNorm: batch (exact), batch_detached (statistics constant in the backward) or frozen
    # stage 3
    importance: str = "scop"
    multiply_bn_gamma: bool = False
    policy: str = "flops_target"
    ratio: float = 0.5  # uniform / global_ranking
    normalize: str = "auto"  # global_ranking: "max", "none", or "auto" (by criterion, see ranking_normalize)
    flops_reduction: float = 0.5  # flops_target
    latency_reduction: float = 0.5  # latency_target: share of the dense network's predicted latency removed
    latency_ms: float | None = None  # latency_target: an absolute budget at latency_batch instead (ms)
    latency_batch: int = 64  # the latency model's batch (besides batch 1 in the report)
    latency_dtype: str = "float32"  # float32, bfloat16 or float16
    latency_memory_format: str = "contiguous"  # or channels_last
    latency_fold_bn: bool = False  # time the network with BatchNorm folded into the convs
    latency_cache: str | None = None  # folder of measured latency tables (default: the run's out_dir)
    fdr_q: float = 0.1  # fdr
    fdr_scope: str = "layer"
    min_channels: int = 1
    round_to: int = 1
    ignored_layers: list = field(default_factory=list)
    block_width: str = "prune"  # residual widths: prune, keep, or scatter (the authors' scheme)
    # stage 4
    bn_batches: int = 50
    finetune_epochs: int = 10
    finetune_lr: float = 0.01
    weight_decay: float = 1e-4
    amp: bool | None = None
    # run
    device: str = "auto"  # auto: cuda when available, else cpu (as the CLI chooses)
    seed: int = 0
    latency: bool = True

    def __post_init__(self) -> None:
        if self.preset is not None:
            raise ValueError(f"preset: PruneConfig(preset={self.preset!r}) cannot fill in the preset's settings "
                             "(a constructor cannot tell a key left out from one given at its default); use "
                             f"PruneConfig.from_dict({{'preset': {self.preset!r}, ...}})")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PruneConfig:
        """The config of ``values``, its ``preset`` filling the keys it leaves out."""
        if "keep_block_width" in values:
            raise ValueError("keep_block_width was replaced by block_width: keep (what keep_block_width=true did), "
                             "scatter (the authors' scheme) or prune (the default)")
        values = with_preset(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in set(values) - known)  # YAML keys need not be strings
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        cfg = cls(**{k: v for k, v in values.items() if k != "preset"})
        cfg.preset = values.get("preset")  # already applied above
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
                values = load_json(text)
            else:
                values = load_yaml(text)
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
        from ..knockoffs import generator_kinds, make_generator
        from ..prune.groups import BLOCK_WIDTHS
        from ..prune.importance import criterion_names
        from ..prune.select import policy_names
        from ..scales.learn import BN_MODES
        from ..train.timing import DTYPES, MEMORY_FORMATS

        checks = [
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (0.0 <= self.val_fraction < 1.0, "val_fraction must be in [0, 1)"),
            (self.scales_epochs >= 1, "scales_epochs must be >= 1"),
            (self.finetune_epochs >= 0, "finetune_epochs must be >= 0"),
            (self.bn in BN_MODES, f"bn must be one of {', '.join(BN_MODES)}"),
            (self.policy in policy_names(), f"policy must be one of {', '.join(policy_names())}"),
            (0.0 <= self.ratio < 1.0, "ratio must be in [0, 1)"),
            (self.normalize in ("auto", "max", "none"), "normalize must be 'auto', 'max' or 'none'"),
            (0.0 <= self.flops_reduction < 1.0, "flops_reduction must be in [0, 1)"),
            (0.0 < self.latency_reduction < 1.0, "latency_reduction must be in (0, 1)"),
            (self.latency_ms is None or self.latency_ms > 0, "latency_ms must be > 0 (or null to use latency_reduction)"),
            (self.latency_batch >= 1, "latency_batch must be >= 1"),
            (self.latency_dtype in DTYPES, f"latency_dtype must be one of {', '.join(DTYPES)}"),
            (self.latency_memory_format in MEMORY_FORMATS,
             f"latency_memory_format must be one of {', '.join(MEMORY_FORMATS)}"),
            (0.0 < self.fdr_q < 1.0, "fdr_q must be in (0, 1)"),
            (self.min_channels >= 1 and self.round_to >= 1, "min_channels and round_to must be >= 1"),
            (len(self.scales_betas) == 2 and all(_has_type(b, float) and 0.0 <= b < 1.0 for b in self.scales_betas),
             "scales_betas must be a pair of numbers in [0, 1)"),
            (self.scales_lr > 0 and self.finetune_lr > 0, "scales_lr and finetune_lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.bias_gamma is None or self.bias_gamma > 0, "bias_gamma must be > 0 (or null for the default)"),
            (self.bn_batches >= 1, "bn_batches must be >= 1"),
            (1 <= self.image_size <= MAX_IMAGE_SIZE, f"image_size must be in 1..{MAX_IMAGE_SIZE}, got {self.image_size}"),
            (self.block_width in BLOCK_WIDTHS, f"block_width must be one of {', '.join(BLOCK_WIDTHS)}"),
            (self.preset is None or self.preset in PRESETS, f"preset must be one of {', '.join(sorted(PRESETS))} (or null)"),
            (self.fdr_scope in ("layer", "global"), "fdr_scope must be 'layer' or 'global'"),
            (self.importance in criterion_names(), f"importance must be one of {', '.join(criterion_names())}"),
            (self.knockoffs in generator_kinds(), f"knockoffs must be one of {', '.join(generator_kinds())}"),
            (all(isinstance(v, str) for v in [*self.skip, *self.ignored_layers, *self.knockoff_options]),
             "skip, ignored_layers and the keys of knockoff_options must be strings"),
            (self.device == "auto" or _is_device(self.device),
             f"device must be auto or a device name such as cpu or cuda:0, got {self.device!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        try:  # the generator's own constructor is the list of what it takes and accepts
            make_generator(self.knockoffs, **self.knockoff_options)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"knockoff_options: {exc}") from None

    def resolved_device(self) -> torch.device:
        """``device`` with ``auto`` resolved: CUDA when it is available, else the CPU."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def ranking_normalize(self) -> str | None:
        """The ``normalize`` of :func:`~scop_ext.prune.select.global_ranking`.

        ``"auto"`` ranks SCOP's ``2 beta - 1`` raw, since it is on one scale in [-1, 1] in every
        layer, and divides by each group's largest score for every other criterion (and for SCOP
        times |gamma|), whose scale differs from layer to layer.
        """
        if self.normalize != "auto":
            return None if self.normalize == "none" else "max"
        return None if self.importance == "scop" and not self.multiply_bn_gamma else "max"

    def latency_settings(self) -> dict[str, Any]:
        """How the network is timed for ``latency_target`` (keywords of the latency model)."""
        return {"dtype": self.latency_dtype, "memory_format": self.latency_memory_format, "fold_bn": self.latency_fold_bn}

    def importance_params(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~scop_ext.prune.importance.make_importance` for ``importance``."""
        return {"scop": {"multiply_bn_gamma": self.multiply_bn_gamma}, "random": {"seed": self.seed}}.get(self.importance, {})

    def policy_params(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~scop_ext.prune.select.make_policy` for ``policy``."""
        common = {"min_channels": self.min_channels, "round_to": self.round_to}
        specific = {
            "uniform": {"ratio": self.ratio},
            "global_ranking": {"ratio": self.ratio, "normalize": self.ranking_normalize()},
            "flops_target": {"reduction": self.flops_reduction},
            "latency_target": {"normalize": self.ranking_normalize(),
                               **({"latency_reduction": self.latency_reduction} if self.latency_ms is None
                                  else {"latency_ms": self.latency_ms})},
            "fdr": {"q": self.fdr_q, "scope": self.fdr_scope},
        }[self.policy]
        return {**common, **specific}


def load_json(text: str) -> Any:
    """Parse JSON, refusing a key repeated within one object (json.loads keeps the last one
    silently, so a config would lose the setting written first). Raises ValueError."""

    def unique(pairs):
        keys = [k for k, _ in pairs]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise ValueError(f"duplicate key {repeated[0]!r}")
        return dict(pairs)

    return json.loads(text, object_pairs_hook=unique)


def load_yaml(text: str) -> Any:
    """Parse YAML with the safe loader, no aliases and no repeated keys.

    Configs are a few flat keys; an alias (``*name``) is never needed there, and a few nested ones
    (the "billion laughs" file) expand into billions of elements as soon as anything walks the
    result. A key given twice in one mapping is an error, not "the last one wins". Raises
    ``yaml.YAMLError`` on either.
    """
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(None, None, f"alias *{event.anchor} is not allowed in a config",
                                                  event.start_mark)
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, (str, int, float, bool)) and key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    return yaml.load(text, Loader=StrictLoader)


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
