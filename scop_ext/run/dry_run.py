"""A dry run of stages 3-4: what a policy would remove from a model, before any training.

:func:`dry_run` scores the model's filters (at random, by L1 norm, or with the learned scales of
a finished run), plans with the config's policy, block width and preset exactly as
:class:`~scop_ext.pipeline.ScopPruner` would, prunes a copy and counts it. The result is a plain
JSON-ready dict (``scop plan --json`` prints it), so other tools can add their own entries::

    >>> result = dry_run(PruneConfig.from_dict({"model": "resnet56", "preset": "authors"}), "random")
    >>> result["flops"]["reduction"], result["params"]["reduction"]
    (0.5597..., 0.5607...)
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
import json
import os
import sys
from typing import Any

import torch
from torch import Tensor, nn

from .. import models
from ..export import load_model
from ..nn.scop_conv import ScopConv2d, convert, restore
from ..prune.flops import count_flops, count_params
from ..prune.importance import make_importance
from ..prune.select import make_policy
from ..prune.space import PruningSpace
from ..prune.surgery import apply_plan, channel_widths, scattered_convs
from .config import PruneConfig
from .report import latency_models, latency_section, latency_table, measure_after

__all__ = ["SCORE_SOURCES", "dry_run", "format_plan", "pruned_copy", "stand_in_scores", "run_defaults", "default_io"]

SCORE_SOURCES = "random, l1 or run:<dir>"
LATENCY_CACHE = os.path.join("runs", "latency-cache")  # where `scop plan` keeps latency tables by default
RUN_PREFIX = "run:"


def default_io(model_name: str) -> tuple[int, int]:
    """``(num_classes, in_channels)`` a model is planned with when nothing says otherwise: its
    builder's defaults (``resnet56``: 10, 3; ``resnet_digits``: 10, 1), ImageNet's 1000 and 3
    for torchvision and timm models."""
    if model_name.startswith((models.TORCHVISION_PREFIX, models.TIMM_PREFIX)):
        return 1000, 3
    builder = getattr(models, model_name, None)
    if not callable(builder):
        raise ValueError(f"--model: unknown model name {model_name!r}; see `scop info`")
    params = inspect.signature(builder).parameters
    return params["num_classes"].default, params["in_channels"].default


def _run_dir(scores: str) -> str | None:
    if not scores.startswith(RUN_PREFIX):
        if scores not in ("random", "l1"):
            raise ValueError(f"--scores must be {SCORE_SOURCES}, got {scores!r}")
        return None
    run = scores[len(RUN_PREFIX):]
    if not os.path.isdir(run):
        raise ValueError(f"--scores {scores}: no such run folder")
    return run


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            value = json.load(f)
    except OSError:
        raise ValueError(f"{path}: cannot read {what} (is it the --out folder of a finished `scop prune`?)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: {what} is not valid JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: {what} must be a JSON object")
    return value


def run_defaults(scores: str) -> dict[str, Any]:
    """For ``run:<dir>`` scores, the ``model`` and ``weights`` that run pruned (the network its
    scales were learned on); ``{}`` for other sources."""
    run = _run_dir(scores)
    if run is None:
        return {}
    saved = _read_json(os.path.join(run, "config.json"), "the run's config")
    return {k: saved[k] for k in ("model", "weights") if saved.get(k) is not None}


def _load(config: PruneConfig, num_classes: int | None, in_channels: int | None) -> tuple[nn.Module, int, int]:
    if config.weights and os.path.isfile(config.weights + ".json"):
        model, arch = load_model(config.weights)  # a `scop train` stem knows its classes and channels
        if arch["model"] != config.model:
            raise ValueError(f"--weights {config.weights}: holds a {arch['model']}, not a {config.model}")
        return model, arch["num_classes"], arch["in_channels"]
    classes, channels = default_io(config.model)
    classes, channels = num_classes or classes, in_channels or channels
    return models.build_model(config.model, classes, channels, weights=config.weights).eval(), classes, channels


def _run_scores(run: str, model: nn.Module, config: PruneConfig) -> dict[str, Tensor]:
    """The run's learned scales, scored as ``config`` scores them (2 beta - 1, times |gamma|
    when ``multiply_bn_gamma``); the BN gammas are the loaded weights'."""
    path = os.path.join(run, "state.json")
    betas = _read_json(path, "the run's state").get("results", {}).get("betas")
    if not isinstance(betas, dict) or not betas:
        raise ValueError(f"{path}: the run has no learned scales yet (its stage 2 did not finish)")
    skip = _read_json(os.path.join(run, "config.json"), "the run's config").get("skip", [])
    work = convert(copy.deepcopy(model), skip=skip, enable=False)
    layers = dict(work.named_modules())
    for name, beta in betas.items():
        layer = layers.get(name)
        if not isinstance(layer, ScopConv2d) or not isinstance(beta, list) or len(beta) != layer.out_channels:
            raise ValueError(f"{path}: scales of {name!r} do not fit {config.model} (a run of another model?)")
        layer.enable_scop().beta.data = torch.tensor(beta, dtype=layer.weight.dtype)
    scores = make_importance("scop", multiply_bn_gamma=config.multiply_bn_gamma)(work)
    restore(work)
    return scores


def stand_in_scores(source: str, model: nn.Module, config: PruneConfig) -> dict[str, Tensor]:
    """Random or L1 scores standing in for learned ones: with SCOP importance, only the convs
    stage 2 would wrap (all but ``skip``) get a score, as they would in the run."""
    scores = make_importance(source, **({"seed": config.seed} if source == "random" else {}))(model)
    if config.importance != "scop":
        return scores
    return {n: s for n, s in scores.items() if not any(fnmatch.fnmatchcase(n, p) for p in config.skip)}


def pruned_copy(model: nn.Module, example_input: Tensor, config: PruneConfig, scores: dict[str, Tensor],
                latency: dict | None = None) -> tuple[nn.Module, PruningSpace, dict[str, list[int]]]:
    """``(pruned copy of model, its PruningSpace, the plan)`` as stages 3-4 of a run with
    ``config`` would make them from ``scores`` (``model`` is left as it is). For ``latency_target``
    the latency models are measured on ``model`` (tables in ``config.latency_cache``, default
    :data:`LATENCY_CACHE`) and their :func:`~scop_ext.report.latency_section` is put in ``latency``."""
    space = PruningSpace(model, example_input, ignored_layers=config.ignored_layers, block_width=config.block_width)
    params = config.policy_params()
    if config.policy == "latency_target":
        measured = latency_models(model, example_input, space.groups, config.latency_batch,
                                  config.latency_cache or LATENCY_CACHE, progress=False, log=_note,
                                  **config.latency_settings())
        params["latency_model"] = measured[config.latency_batch]
    plan = make_policy(config.policy, **params)(space, scores)
    pruned = apply_plan(copy.deepcopy(model), example_input, plan, block_width=config.block_width)
    if config.policy == "latency_target" and latency is not None:
        section = latency_section(measured, plan, **config.latency_settings())
        latency.update(measure_after(section, pruned, example_input, "cpu"))
    return pruned, space, plan


def _note(message: str) -> None:
    print(message, file=sys.stderr)


def dry_run(config: PruneConfig, scores: str = "random", *, num_classes: int | None = None,
            in_channels: int | None = None, image_size: int | None = None) -> dict[str, Any]:
    """Plan ``config``'s pruning of ``config.model`` without training; a JSON-ready dict.

    Args:
        config: the run's settings (model, weights, policy and its settings, ``block_width``,
            ``skip``, ``ignored_layers``, ``importance``/``multiply_bn_gamma``, ``seed``).
        scores: ``"random"`` (seeded by ``config.seed``), ``"l1"``, or ``"run:<dir>"``, the
            learned scales of a ``scop prune`` run in ``<dir>``.
        num_classes, in_channels: of the model when ``config.weights`` is not a saved model
            stem (default: :func:`default_io`).
        image_size: side of the (1, C, S, S) input FLOPs are counted on (default: the size the
            model is built for, :func:`scop_ext.models.example_input`).

    Returns:
        ``{"model", "input", "scores", "settings", "layers": [{"conv", "before", "after",
        "scattered"}], "flops": {"before", "after", "reduction"}, "params": {...},
        "predicted_flops_reduction", "removed"}``; FLOPs are 2 x MACs of one image, counted on
        the pruned copy, ``removed`` is the plan ``{conv: [channels]}``. With ``latency_target``
        also ``"latency"``: predicted beside measured latency (ms) before and after, at batch 1
        and ``latency_batch`` (:func:`~scop_ext.report.latency_section`).
    """
    run = _run_dir(scores)
    model, num_classes, in_channels = _load(config, num_classes, in_channels)
    x = models.example_input(config.model, in_channels)
    if image_size is not None:
        x = torch.randn(1, in_channels, image_size, image_size)
    scored = _run_scores(run, model, config) if run else stand_in_scores(scores, model, config)
    latency = {}
    pruned, space, plan = pruned_copy(model, x, config, scored, latency)
    before, after, scattered = channel_widths(model), channel_widths(pruned), set(scattered_convs(pruned))
    flops, params = (count_flops(model, x), count_flops(pruned, x)), (count_params(model), count_params(pruned))
    settings = {"preset": config.preset, "policy": config.policy, **config.policy_params(),
                "block_width": config.block_width, "importance": config.importance,
                "multiply_bn_gamma": config.multiply_bn_gamma, "skip": config.skip,
                "ignored_layers": config.ignored_layers}
    return {
        "model": config.model, "weights": config.weights, "num_classes": num_classes, "input": list(x.shape),
        "scores": scores, "seed": config.seed, "settings": settings,
        "layers": [{"conv": n, "before": before[n], "after": after[n], "scattered": n in scattered} for n in before],
        "flops": {"before": flops[0], "after": flops[1], "reduction": 1 - flops[1] / flops[0]},
        "params": {"before": params[0], "after": params[1], "reduction": 1 - params[1] / params[0]},
        "predicted_flops_reduction": space.reduction(plan),
        **({"latency": latency} if latency else {}),
        "removed": plan,
    }


def format_plan(result: dict[str, Any]) -> str:
    """The text ``scop plan`` prints: settings, a widths table, the FLOPs and params lines."""
    s = result["settings"]
    policy = ", ".join(f"{k} {v}" for k, v in s.items() if k not in ("skip", "ignored_layers") and v is not None)
    lines = [f"{result['model']} on a {'x'.join(map(str, result['input']))} input, scores {result['scores']} "
             f"(seed {result['seed']})", policy, "", "| conv | before | after |", "|---|---|---|"]
    for layer in result["layers"]:
        after = f"{layer['after']} (scattered to {layer['before']})" if layer["scattered"] else str(layer["after"])
        lines.append(f"| {layer['conv']} | {layer['before']} | {after} |")
    for key, label in (("flops", "FLOPs (2 x MACs, one image)"), ("params", "parameters")):
        r = result[key]
        lines.append(f"{label}: {_count(r['before'])} -> {_count(r['after'])}, {100 * r['reduction']:.1f}% fewer")
    if result.get("latency"):
        lines += ["", latency_table(result["latency"])]
    return "\n".join(lines)


def _count(value: int) -> str:
    return f"{value / 1e9:.3f} G" if value >= 1e9 else f"{value / 1e6:.3f} M" if value >= 1e5 else f"{value / 1e3:.1f} k"
