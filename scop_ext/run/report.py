"""The before/after report of a pruning run: report.md, report.json and the PNG plots (drawn by
:mod:`scop_ext.plots`)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..prune.groups import ChannelGroup
from ..prune.latency import LatencyModel, cache_file
from ..train import checkpoint
from ..train.timing import load_average, measure_latencies, measure_latency

__all__ = ["format_table", "latency_models", "latency_section", "measure_after", "latency_table", "time_before_after",
           "write_report"]


def _fmt(value, kind: str) -> str:
    if value is None:
        return "–"
    if kind == "count":
        return f"{value / 1e6:.3f} M" if value >= 1e5 else f"{value / 1e3:.1f} k"
    if kind == "pct":
        return f"{100 * value:.2f}%"
    return f"{value:.3f}"


ROWS = [
    ("params", "parameters", "count"),
    ("flops", "FLOPs (2 x MACs, one image)", "count"),
    ("top1", "top-1 accuracy", "pct"),
    ("top5", "top-5 accuracy", "pct"),
    ("latency_ms_b1", "latency batch 1 (ms)", "ms"),
    ("latency_ms_b64", "latency batch 64 (ms)", "ms"),
]


def format_table(before: dict, after: dict, conditions: dict | None = None) -> str:
    """Markdown before/after table with ratios (after ÷ before); ``conditions`` (load average,
    threads) follow the latency rows they were timed under."""
    lines = ["| | before | after | after ÷ before |", "|---|---|---|---|"]
    for key, label, kind in ROWS:
        b, a = before.get(key), after.get(key)
        if b is None and a is None:
            continue
        ratio = f"{a / b:.3f}" if (a is not None and b) else "–"
        lines.append(f"| {label} | {_fmt(b, kind)} | {_fmt(a, kind)} | {ratio} |")
    if conditions and any(k.startswith("latency") for k in before):
        load = conditions.get("load_average")
        lines += ["", f"Latency: before and after timed in turns on {conditions.get('device')}, "
                      f"{conditions.get('threads')} threads, load average {'–' if load is None else f'{load:.2f}'}."]
    return "\n".join(lines)


def time_before_after(dense: nn.Module, pruned: nn.Module, example: Tensor, device: str | torch.device,
                      batches: Sequence[int] = (1, 64)) -> dict:
    """Latency (ms) of the dense and the pruned network at each batch, their timing blocks taken in
    turns so a busy spell falls on both; the process's malloc is left alone. Returns ``before`` /
    ``after`` metric dicts and the ``conditions`` (load, threads) they were timed under."""
    out = {"before": {}, "after": {}}
    load = load_average()
    for b in batches:
        ms = measure_latencies([dense, pruned], example, b, device, tune_malloc=False)
        out["before"][f"latency_ms_b{b}"], out["after"][f"latency_ms_b{b}"] = ms
    out["conditions"] = {"load_average": load, "threads": torch.get_num_threads(), "device": str(device)}
    return out


def latency_models(model: nn.Module, example_input: Tensor, groups: Sequence[ChannelGroup], batch: int,
                   folder: str | os.PathLike, **kw) -> dict[int, LatencyModel]:
    """Latency models at batch 1 and at ``batch``, their tables cached in ``folder`` (``kw``: of
    :class:`LatencyModel`)."""
    return {b: LatencyModel(model, example_input, groups, batch=b, cache=cache_file(folder, b), **kw)
            for b in sorted({1, batch})}


def latency_section(models: Mapping[int, LatencyModel], plan: Mapping[str, Iterable[int]], **settings) -> dict:
    """Per batch, the predicted latency (ms) of the dense network and of ``plan``, and the measured
    dense one; ``settings`` (dtype, memory_format, fold_bn) are stored beside them for :func:`measure_after`."""
    batches = {}
    for b, lat in models.items():
        batches[str(b)] = {"predicted_before": lat.dense_ms, "measured_before": lat.measured_dense_ms,
                           "predicted_after": lat.predict_plan(plan)}
        lat.save()
    return {**settings, "batches": batches}


def measure_after(section: dict, model: nn.Module, example: Tensor, device: str | torch.device) -> dict:
    """Fill ``measured_after`` of every batch of a :func:`latency_section` with ``model`` (pruned) timed
    under the section's settings; returns the section, with ``error`` = predicted / measured - 1."""
    for b, row in section["batches"].items():
        row["measured_after"] = measure_latency(model, example, int(b), device, dtype=section["dtype"],
                                                memory_format=section["memory_format"], fold_bn=section["fold_bn"])
        row["error"] = row["predicted_after"] / row["measured_after"] - 1
    return section


def latency_table(section: dict) -> str:
    """Markdown table of a latency section (:func:`~scop_ext.prune.latency.latency_section`):
    predicted beside measured, before and after pruning, per batch."""
    fmt = f"{section['dtype']}, {section['memory_format']}" + (", BN folded" if section.get("fold_bn") else "")
    lines = [f"Latency ({fmt}), predicted by the measured latency model beside measured on the whole network:", "",
             "| batch | before: predicted / measured (ms) | after: predicted / measured (ms) | "
             "after: predicted ÷ measured | measured after ÷ before |", "|---|---|---|---|---|"]
    for b, r in section["batches"].items():
        pa, ma, mb = r.get("predicted_after"), r.get("measured_after"), r.get("measured_before")
        lines.append(f"| {b} | {_fmt(r.get('predicted_before'), 'ms')} / {_fmt(mb, 'ms')} | {_fmt(pa, 'ms')} / "
                     f"{_fmt(ma, 'ms')} | {f'{pa / ma:.3f}' if ma else '–'} | {f'{ma / mb:.3f}' if ma and mb else '–'} |")
    return "\n".join(lines)


def write_report(out_dir: str, results: dict) -> dict[str, str]:
    """Write report.json, report.md and the plots into ``out_dir``; returns their paths.

    ``results`` holds ``before`` / ``after`` metric dicts (keys of :data:`ROWS`), optionally
    ``after_prune`` (metrics right after pruning, before fine-tuning), ``widths_before`` /
    ``widths_after``, ``betas`` and ``importance`` (per layer lists), ``removed`` (the plan),
    ``cuts`` (each group's cut, :func:`scop_ext.prune.select.cuts`), ``latency`` (see :func:`latency_table`), and free-form
    ``config`` and ``notes``.
    """
    from ..plots import (  # matplotlib only when drawing
        plot_betas,
        plot_channels,
        plot_curves,
        plot_importance,
    )

    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "report.json"), "md": os.path.join(out_dir, "report.md")}
    checkpoint.write_json(paths["json"], results)
    if results.get("betas"):
        paths["betas_png"] = os.path.join(out_dir, "betas.png")
        plot_betas(results["betas"], paths["betas_png"])
    if results.get("importance"):
        paths["importance_png"] = os.path.join(out_dir, "importance.png")
        plot_importance(results["importance"], results.get("removed", {}), paths["importance_png"])
    if results.get("widths_before"):
        paths["channels_png"] = os.path.join(out_dir, "channels.png")
        plot_channels(results["widths_before"], results.get("widths_after", {}), paths["channels_png"])
    if results.get("scales_history") or results.get("finetune_history"):
        paths["curves_png"] = os.path.join(out_dir, "curves.png")
        plot_curves(results.get("scales_history"), results.get("finetune_history"), paths["curves_png"])
    md = ["# SCOP pruning report", ""]
    cfg = results.get("config", {})
    if cfg:
        md += [f"Model `{cfg.get('model')}` on `{cfg.get('dataset')}`, criterion `{cfg.get('importance')}`, "
               f"policy `{cfg.get('policy')}`.", ""]
    md += [format_table(results.get("before", {}), results.get("after", {}), results.get("latency_conditions")), ""]
    if results.get("latency"):
        md += [latency_table(results["latency"]), ""]
    if results.get("after_prune"):
        md += [f"Right after pruning, before fine-tuning: top-1 {_fmt(results['after_prune'].get('top1'), 'pct')}.", ""]
    if results.get("widths_before"):
        md += ["| layer | channels before | after |", "|---|---|---|"]
        md += [f"| {n} | {w} | {results.get('widths_after', {}).get(n, '–')} |" for n, w in results["widths_before"].items()]
        md.append("")
    for key, title in (("betas_png", "Learned scales"), ("importance_png", "Importance and cut"),
                       ("channels_png", "Channels per layer"), ("curves_png", "Training curves")):
        if key in paths:
            md += [f"![{title}]({os.path.basename(paths[key])})", ""]
    for note in results.get("notes", []):
        md.append(f"- {note}")
    checkpoint.atomic_write_text(paths["md"], "\n".join(md) + "\n")
    return paths
