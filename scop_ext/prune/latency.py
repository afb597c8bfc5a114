"""A latency model measured on the target device, and the knapsack that spends a latency budget.

Convolution time moves in steps of channel count (oneDNN and cuDNN work in channel blocks), so
FLOPs are a poor proxy for it. :class:`LatencyModel` times every convolution of the network as
a function of its kept input and output widths, at the model's input size and a chosen batch,
dtype and memory format, and predicts the whole network's latency for any choice of group widths:

    latency(widths) = sum over convs l of T_l(C_in', C_out')  +  fixed  +  per_element * activations'

where the last two terms, the time outside the convs (BatchNorm, activations, adds, pooling, the
classifier, per-op overheads), are fitted to measured networks: the dense one and copies with
every group at 3/4, 1/2 and 0.3 of its width; ``activations'`` is the convs' output volume.
Convs of one shape share their measurements. Each distinct (shape, C_in', C_out') is measured
(and, seconds later, rechecked: the faster time counts) and kept in a JSON cache keyed by the
settings (device name, torch version, threads, dtype, memory format, batch, malloc); a cache
taken under other settings is refused and rebuilt, never used. Everything is timed with malloc
keeping freed memory (:func:`~scop_ext.timing.malloc_for_timing`): without it a conv alone paid
page faults that it did not pay inside the network, and the model's error was 0.4-0.6 at
batch 64 (benchmarks/README.md).

Which widths are measured: a coarse grid of the widths a group may take, refined by bisection
wherever the time jumps between two grid points, so the steps are located exactly; the widths a
policy then chooses from (:meth:`LatencyModel.candidates`) are the last width before each step
up ("never just above a step"). :func:`knapsack` is the multiple-choice knapsack that picks one
width per group (the idea of HALP, Shen et al. 2022; our own formulation).
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..train import checkpoint
from ..train.timing import (
    DTYPES,
    MEMORY_FORMATS,
    malloc_for_timing,
    measure_latencies,
    settings,
    time_ms,
)
from .groups import ChannelGroup, is_depthwise, plain_forward
from .surgery import apply_plan

__all__ = ["ConvShape", "LatencyModel", "conv_timer", "cache_file"]

STEP_TOLERANCE = 0.05  # relative: a time this much above another is a step, below it is noise
MAX_CANDIDATES = 10  # widths offered per group: bounds the measuring of (C_in', C_out') pairs
REST_FRACTIONS = (1.0, 0.75, 0.5, 0.3)  # widths (of the dense ones) the time outside the convs is fitted at
REST_TOLERANCE = 0.10  # relative miss of the fitted model at one of its own networks that means a disturbed timing


# --------------------------------------------------------------------------- the table


def cache_file(folder: str | os.PathLike, batch: int) -> str:
    """Where a run keeps its latency table for ``batch`` (settings are checked inside the file)."""
    return os.path.join(folder, f"latency-table-b{batch}.json")


@dataclass(frozen=True)
class ConvShape:
    """What a convolution's time depends on besides its widths (shared by convs of one shape)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    depthwise: bool
    bias: bool
    in_hw: tuple[int, int]

    def key(self, c_in: int, c_out: int) -> str:
        k, s, p, d = ("x".join(map(str, v)) for v in (self.kernel, self.stride, self.padding, self.dilation))
        return (f"k{k} s{s} p{p} d{d} {'dw' if self.depthwise else 'g1'} {'b' if self.bias else 'nb'} "
                f"{self.in_hw[0]}x{self.in_hw[1]} {c_in}->{c_out}")


def conv_timer(device: str | torch.device, dtype: str, memory_format: str, batch: int,
               min_time: float = 0.03) -> Callable[[ConvShape, int, int], float]:
    """The default timer: ms of one ``F.conv2d`` of ``shape`` with ``c_in`` -> ``c_out`` channels
    (malloc as :func:`~scop_ext.timing.malloc_for_timing` sets it, as for the whole network)."""
    malloc_for_timing()
    device, fmt, dt = torch.device(device), MEMORY_FORMATS[memory_format], DTYPES[dtype]

    @torch.no_grad()
    def timer(shape: ConvShape, c_in: int, c_out: int) -> float:
        groups = c_in if shape.depthwise else 1
        x = torch.randn(batch, c_in, *shape.in_hw, device=device, dtype=dt).contiguous(memory_format=fmt)
        w = torch.randn(c_out, c_in // groups, *shape.kernel, device=device, dtype=dt).contiguous(memory_format=fmt)
        b = torch.randn(c_out, device=device, dtype=dt) if shape.bias else None
        return time_ms(lambda: F.conv2d(x, w, b, shape.stride, shape.padding, shape.dilation, groups), device, min_time,
                       fastest=True)

    return timer


class _Table:
    """Measured points ``{ConvShape.key: ms}`` under one set of settings, optionally cached in a file."""

    def __init__(self, path: str | None, wanted: dict, timer, progress: bool, log) -> None:
        self.path, self.settings, self.timer, self.points = path, wanted, timer, {}
        self.measured = 0  # points measured by this process (the rest came from the cache)
        self.fresh = {}  # key: (shape, c_in, c_out) of the points not rechecked yet
        if path and os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    stored = json.load(f)
                found = stored["settings"]
                points = {str(k): float(v) for k, v in stored["points"].items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                log(f"latency cache {path} is unreadable ({type(exc).__name__}): measuring again")
            else:
                if found == wanted:
                    self.points = points
                else:
                    diff = ", ".join(f"{k} {found.get(k)!r} != {v!r}" for k, v in wanted.items() if found.get(k) != v)
                    log(f"latency cache {path} was measured under other settings ({diff}): refused, measuring again")
        from tqdm.auto import tqdm

        self.bar = tqdm(desc="latency table", unit="conv", disable=not progress, leave=False)

    def ms(self, shape: ConvShape, c_in: int, c_out: int) -> float:
        key = shape.key(c_in, c_out)
        if key not in self.points:
            self.points[key] = float(self.timer(shape, c_in, c_out))
            self.fresh[key] = (shape, c_in, c_out)
            self.measured += 1
            self.bar.update()
        return self.points[key]

    def recheck(self, points: Iterable[tuple[ConvShape, int, int]] | None = None) -> None:
        """Time ``points`` (default: every point measured since the last recheck) once more and
        keep the faster time: another process busy on the machine (or on a sibling hyperthread)
        only adds time, and a second look seconds later rarely falls into the same busy spell."""
        todo = self.fresh.values() if points is None else points
        for shape, c_in, c_out in list(todo):
            key = shape.key(c_in, c_out)
            self.points[key] = min(self.ms(shape, c_in, c_out), float(self.timer(shape, c_in, c_out)))
        self.fresh = {}

    def save(self) -> None:
        if self.path and self.measured:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            checkpoint.write_json(self.path, {"settings": self.settings, "points": self.points})


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class _Conv:
    name: str
    shape: ConvShape
    c_in: int
    c_out: int
    out_elems: int  # H_out * W_out of one image
    out_group: int | None  # the group that sets C_out (None: fixed)
    in_groups: tuple[tuple[int, float], ...]  # (group, share of its channels in this conv's input)


class LatencyModel:
    """Predicted latency of ``model`` for any widths of its channel ``groups``, from measured convs.

    Args:
        model: the network (ScopConv2d layers are timed as plain convs; the model is not changed).
        example_input: a (1, C, H, W) input of the model's size.
        groups: the prunable channel groups (:attr:`~scop_ext.prune.space.PruningSpace.groups`).
        batch, dtype, memory_format, device: how the network will run; ``dtype`` in
            :data:`DTYPES`, ``memory_format`` in :data:`MEMORY_FORMATS`.
        fold_bn: the network runs with BatchNorm folded into the convs (the rest term is
            measured that way).
        cache: JSON file of measured points (created or extended; refused under other settings).
        timer: ``(ConvShape, C_in, C_out) -> ms``; defaults to timing ``F.conv2d`` on ``device``.
        measure_network: time the dense network once for the time outside its convs, and allow
            :meth:`measure_plan` (False: count convs only, nothing but ``timer`` is timed).
        progress: show a progress bar while measuring; log: where cache refusals are reported.

    Attributes:
        dense_ms: predicted latency of the unpruned network; measured_dense_ms: measured (with ``rest``).
    """

    def __init__(self, model: nn.Module, example_input: Tensor, groups: Sequence[ChannelGroup], *, batch: int = 64,
                 dtype: str = "float32", memory_format: str = "contiguous", device: str | torch.device = "cpu",
                 fold_bn: bool = False, cache: str | os.PathLike | None = None,
                 timer: Callable[[ConvShape, int, int], float] | None = None, measure_network: bool = True,
                 progress: bool = True, log: Callable[[str], None] = print) -> None:
        if dtype not in DTYPES or memory_format not in MEMORY_FORMATS:
            raise ValueError(f"dtype must be one of {list(DTYPES)} and memory_format one of {list(MEMORY_FORMATS)}, "
                             f"got {dtype!r}, {memory_format!r}")
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be an int >= 1, got {batch!r}")
        self.groups, self.batch = list(groups), batch
        self.sizes = [g.size for g in self.groups]
        wanted = settings(device, dtype, memory_format, batch)
        timer = timer or conv_timer(device, dtype, memory_format, batch)
        self._table = _Table(os.fspath(cache) if cache else None, wanted, timer, progress, log)
        self._log = log
        self._convs = self._trace(model, example_input)
        self._rest = (0.0, 0.0)  # (fixed ms, ms per output element of the convs)
        self.measured_dense_ms = None
        self.measure_network = measure_network
        self._network = (model, example_input, device, {"dtype": dtype, "memory_format": memory_format, "fold_bn": fold_bn})
        if measure_network:
            self._fit_rest()
        self.dense_ms = self.predict(self.sizes)
        self.save()

    def _trace(self, model: nn.Module, example_input: Tensor) -> list[_Conv]:
        seen = {}

        def hook(name):
            def record(module, inputs, output):
                seen[name] = (tuple(inputs[0].shape[-2:]), output.shape[-2] * output.shape[-1])
            return record

        convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
        with plain_forward(model), torch.no_grad():
            handles = [m.register_forward_hook(hook(n)) for n, m in convs.items()]
            try:
                model.eval()
                model(example_input[:1])
            finally:
                for h in handles:
                    h.remove()
        out_group, in_groups = {}, {}
        for i, g in enumerate(self.groups):
            for layer, kind, channels in g.shrinks:
                if kind in ("out", "depthwise"):
                    out_group[layer] = i
                if kind == "in":
                    in_groups.setdefault(layer, []).append((i, len(channels) / g.size))
        result = []
        for name, m in convs.items():
            if name not in seen:
                continue  # did not run in the traced forward: costs nothing
            if m.groups > 1 and not is_depthwise(m):
                continue  # grouped (non-depthwise) convs are left to the rest term at their dense time
            depthwise = is_depthwise(m)
            shape = ConvShape(m.kernel_size, m.stride, m.padding, m.dilation, depthwise, m.bias is not None, seen[name][0])
            result.append(_Conv(name, shape, m.in_channels, m.out_channels, seen[name][1], out_group.get(name),
                                () if depthwise else tuple(in_groups.get(name, ()))))
        return result

    # ------------------------------------------------------------------ prediction

    def _widths_of(self, c: _Conv, widths: Sequence[int]) -> tuple[int, int]:
        c_out = c.c_out if c.out_group is None else widths[c.out_group]
        if c.shape.depthwise:
            return c_out, c_out
        return c.c_in - sum(round(share * (self.sizes[g] - widths[g])) for g, share in c.in_groups), c_out

    def _conv_ms(self, c: _Conv, widths: Sequence[int]) -> float:
        c_in, c_out = self._widths_of(c, widths)
        return self._table.ms(c.shape, c_in, c_out) + self._rest[1] * c_out * c.out_elems

    def predict(self, widths: Sequence[int]) -> float:
        """Predicted latency (ms) with group ``i`` kept at ``widths[i]`` channels."""
        if len(widths) != len(self.groups):
            raise ValueError(f"widths must give one width per group ({len(self.groups)}), got {len(widths)}")
        return self._rest[0] + sum(self._conv_ms(c, widths) for c in self._convs)

    def widths(self, plan: Mapping[str, Iterable[int]]) -> list[int]:
        """The group widths ``plan`` leaves (a plan made for these groups)."""
        return [g.size - len(list(next((plan[c] for c in g.convs if c in plan), ()))) for g in self.groups]

    def predict_plan(self, plan: Mapping[str, Iterable[int]]) -> float:
        return self.predict(self.widths(plan))

    def _fit_rest(self) -> None:
        """The time outside the convs as ``fixed + per_element * conv output volume``: the slope
        fitted by least squares to the dense network and to copies with every group at
        :data:`REST_FRACTIONS` of its width, the line through the dense network (per-op overheads
        do not shrink with the widths, memory-bound BatchNorm/ReLU/add work does). Each network
        is timed in 15 blocks, all in turns (the fastest counts), and the table's points of these
        widths are rechecked. When the fitted model then misses one of its own networks by more
        than :data:`REST_TOLERANCE`, a timing was disturbed (a busy spell, which once put the
        model's prediction at 0.03 for a network that measured 0.85): the networks are timed
        again and their points rechecked, twice at most, and a model still missing is reported."""
        nets = self._rest_networks()
        points = [(c.shape, *self._widths_of(c, widths)) for widths, _ in nets for c in self._convs]
        for point in points:  # measured once; each timing below rechecks them
            self._table.ms(*point)
        times = []
        for attempt in range(3):
            times.append(self._measure([net for _, net in nets]))
            fastest = [min(t[k] for t in times) for k in range(len(nets))]
            self._table.recheck(points if attempt else None)
            misses = self._fit_line([widths for widths, _ in nets], fastest)
            if max(misses) <= REST_TOLERANCE:
                break
        else:
            self._log(f"latency model: after three timings, the fitted model still misses one of the "
                      f"networks it was fitted to by {max(misses):.0%} (was the machine busy?); its predictions "
                      f"may be off by as much")
        self.measured_dense_ms = fastest[0]

    def _rest_networks(self) -> list[tuple[list[int], nn.Module]]:
        """(widths, network) at every :data:`REST_FRACTIONS` the groups allow, the dense one first."""
        model, x, _, _ = self._network
        nets = []
        for fraction in REST_FRACTIONS:
            widths = [max(1, round(s * fraction)) for s in self.sizes]
            plan = {c: [g.index[c][k] for k in range(w, g.size) if k in g.index[c]]
                    for g, w in zip(self.groups, widths) if w < g.size for c in g.convs}
            try:
                nets.append((widths, apply_plan(copy.deepcopy(model), x, plan) if plan else model))
            except ValueError:  # a group that cannot lose these channels (grouped units): fewer points
                continue
        return nets

    def _fit_line(self, widths: Sequence[Sequence[int]], measured: Sequence[float]) -> list[float]:
        """Fit the rest term to networks of ``widths`` that measured ``measured`` ms (the first
        dense); the model's relative miss at each of them."""
        volume, rest = [], []
        for w, ms in zip(widths, measured):
            volume.append(sum((c.c_out if c.out_group is None else w[c.out_group]) * c.out_elems for c in self._convs))
            rest.append(ms - sum(self._table.ms(c.shape, *self._widths_of(c, w)) for c in self._convs))
        per = max(float(np.polyfit(volume, rest, 1)[0]) if len(set(volume)) > 1 else 0.0, 0.0)
        self._rest = (rest[0] - per * volume[0], per)  # exact at the dense network (fixed < 0: convs run faster in it)
        return [abs(self.predict(w) / ms - 1) for w, ms in zip(widths, measured)]

    def _measure(self, models: Sequence[nn.Module], blocks: int = 15) -> list[float]:
        """Measured ms of each of ``models`` as configured, their blocks timed in turns."""
        _, x, device, how = self._network
        return measure_latencies(models, x, self.batch, device, min_run_time=blocks / 10, blocks=blocks, **how)

    def measure_plan(self, plan: Mapping[str, Iterable[int]], blocks: int = 15) -> tuple[float, float]:
        """Measured latency (ms) of the network pruned by ``plan`` (on a copy, timed as configured),
        and its ratio to the dense network's: the two timed in turns, ``blocks`` blocks each,
        the fastest of each counts (:func:`~scop_ext.timing.fastest_ms`)."""
        if not self.measure_network:
            raise RuntimeError("measure_plan needs a LatencyModel built with measure_network=True")
        model, x, _, _ = self._network
        dense, pruned = self._measure([model, apply_plan(copy.deepcopy(model), x, plan)], blocks)
        return pruned, pruned / dense

    def group_ms(self, group: int, width: int, widths: Sequence[int]) -> float:
        """Time of the convs ``group`` touches, with it at ``width`` and the others at ``widths``."""
        at = list(widths)
        at[group] = width
        return sum(self._conv_ms(c, at) for c in self._convs
                   if c.out_group == group or any(g == group for g, _ in c.in_groups))

    def candidates(self, group: int, allowed: Sequence[int]) -> list[int]:
        """The widths of ``allowed`` (ascending) worth keeping: the last one before each step up.

        The group's time (others dense) is measured on a coarse grid of ``allowed`` and refined
        by bisection wherever it jumps by more than :data:`STEP_TOLERANCE`; a width is a
        candidate when every measured wider one costs more than that above it. The widest
        allowed width is always a candidate.
        """
        allowed = sorted(set(allowed))
        cost = {}

        def at(i: int) -> float:
            if i not in cost:
                cost[i] = self.group_ms(group, allowed[i], self.sizes)
            return cost[i]

        def refine(lo: int, hi: int) -> None:
            if hi - lo <= 1 or at(hi) <= at(lo) * (1 + STEP_TOLERANCE):
                return
            mid = (lo + hi) // 2
            at(mid)
            refine(lo, mid)
            refine(mid, hi)

        grid = sorted({round(k * (len(allowed) - 1) / 8) for k in range(9)})
        for i in grid:
            at(i)
        for lo, hi in zip(grid, grid[1:]):
            refine(lo, hi)
        self._table.recheck()
        measured = sorted(cost)
        cost = {i: self.group_ms(group, allowed[i], self.sizes) for i in measured}
        keep, floor = [], math.inf
        for i in reversed(measured):
            if cost[i] * (1 + STEP_TOLERANCE) < floor:
                keep.append(allowed[i])
                floor = cost[i]
        keep.reverse()
        if len(keep) > MAX_CANDIDATES:  # evenly thinned, the widest kept
            keep = [keep[round(k * (len(keep) - 1) / (MAX_CANDIDATES - 1))] for k in range(MAX_CANDIDATES)]
        return keep

    def save(self) -> None:
        """Write the measured points to the cache file (if any, and if anything new was measured)."""
        self._table.save()
