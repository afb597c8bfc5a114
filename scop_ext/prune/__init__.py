"""Stages 3-4 of SCOP (DESIGN.md §1): score channels, select which to remove, remove them.

- :mod:`.importance`: criteria, ``criterion(model) -> {conv name: (C_out,) scores}``.
- :mod:`.select`: :class:`PruningSpace` (coupled channel groups + FLOPs prediction) and the
  policies ``uniform``, ``global_ranking``, ``flops_target``, ``fdr`` returning a plan
  ``{conv name: [channel indices to remove]}``, and ``cuts`` (where a plan cut each group).
- :mod:`.surgery`: ``apply_plan`` (physical removal with torch-pruning; ``block_width`` prune,
  keep or scatter, the authors' scheme), ``channel_widths``, ``scattered_convs`` and ``rebuild``
  (re-create a pruned architecture from JSON widths).
- :mod:`.flops`: FLOPs (= 2 x MACs), MACs and parameter counts.
- :mod:`.scales` (stage 2), :mod:`.train` (fine-tuning, evaluation, BN recalibration),
  :mod:`.export` (pickle-free model files), :mod:`.report`, :mod:`.distributed`, and
  :mod:`.pipeline`: :class:`ScopPruner`, the whole run as one object with plain steps.
"""

from .flops import count_flops, count_macs, count_params, flops_by_module
from .importance import (
    BNScaleImportance,
    L1Importance,
    L2Importance,
    RandomImportance,
    ScopImportance,
    following_batchnorm,
    make_importance,
)
from .select import (
    PruningSpace,
    cuts,
    fdr,
    flops_target,
    global_ranking,
    knockoff_threshold,
    select,
    uniform,
)
from .surgery import BLOCK_WIDTHS, ChannelGroup, Plan, apply_plan, channel_groups, channel_widths, rebuild, scattered_convs

__all__ = [
    "count_flops",
    "count_macs",
    "count_params",
    "flops_by_module",
    "ScopImportance",
    "L1Importance",
    "L2Importance",
    "BNScaleImportance",
    "RandomImportance",
    "make_importance",
    "following_batchnorm",
    "PruningSpace",
    "uniform",
    "global_ranking",
    "flops_target",
    "fdr",
    "knockoff_threshold",
    "select",
    "cuts",
    "Plan",
    "ChannelGroup",
    "channel_groups",
    "apply_plan",
    "channel_widths",
    "rebuild",
    "scattered_convs",
    "BLOCK_WIDTHS",
]
