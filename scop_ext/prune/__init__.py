"""Stages 2-4 of SCOP (DESIGN.md §1): learn the scales, score and select channels, remove them.

- :mod:`.excavate` (stage 2): the Lemma 2 bias fit and ``learn_scales`` (beta with the weights
  frozen, on [real; knockoff] batches); ``ScaleLearner``, the same stage inside your own loop;
  :mod:`.pairs`: those batches' data, each image paired with one knockoff.
- :mod:`.importance` (stage 3): criteria, ``criterion(model) -> {conv name: (C_out,) scores}``,
  and ``TorchPruningImportance``, any of their scores for Torch-Pruning's own pruners.
- :mod:`.space` (stage 3): :class:`PruningSpace` (coupled channel groups + FLOPs prediction).
- :mod:`.select` (stage 3): the policies ``uniform``, ``global_ranking``, ``flops_target``, ``fdr``
  and (from :mod:`.latency_policy`) ``latency_target``, returning a plan ``{conv name: [channel
  indices to remove]}``, and ``cuts`` (where a plan cut each group); :mod:`.keep`: what they share.
- :mod:`.groups`: the coupled channel groups (:class:`ChannelGroup`, ``channel_groups``) and what
  ``block_width`` prune, keep and scatter (the authors' scheme) make of the residual ones.
- :mod:`.surgery` (stage 4): ``apply_plan`` (physical removal with torch-pruning),
  ``channel_widths``, ``scattered_convs`` and ``rebuild`` (re-create a pruned architecture from
  JSON widths); the fine-tuning that follows is the generic :func:`scop_ext.train.fit`.
- :mod:`.flops`: FLOPs (= 2 x MACs), MACs and parameter counts; :mod:`.latency`: the latency
  model measured on the device (:class:`LatencyModel`), :mod:`.knapsack`: spending its budget.

The whole run (:class:`scop_ext.pipeline.ScopPruner`) sits above this package, since it also
drives stage 1 (:mod:`scop_ext.knockoffs`).
"""

from .flops import count_flops, count_macs, count_params, flops_by_module
from .groups import BLOCK_WIDTHS, ChannelGroup, Plan, channel_groups
from .importance import (
    BNScaleImportance,
    L1Importance,
    L2Importance,
    RandomImportance,
    ScopImportance,
    TorchPruningImportance,
    criterion_names,
    following_batchnorm,
    make_importance,
)
from .latency import LatencyModel
from .select import (
    cuts,
    fdr,
    flops_target,
    global_ranking,
    knockoff_threshold,
    latency_target,
    make_policy,
    policy_names,
    select,
    uniform,
)
from .space import PruningSpace
from .surgery import apply_plan, channel_widths, rebuild, scattered_convs

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
    "TorchPruningImportance",
    "make_importance",
    "criterion_names",
    "following_batchnorm",
    "PruningSpace",
    "uniform",
    "global_ranking",
    "flops_target",
    "latency_target",
    "LatencyModel",
    "fdr",
    "knockoff_threshold",
    "select",
    "make_policy",
    "policy_names",
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
