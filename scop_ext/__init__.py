"""scop_ext: knockoff-controlled filter pruning (SCOP, NeurIPS 2020) for PyTorch.

Importing the package loads the compiled operators (``torch.ops.scop.*``);
:func:`build_info` says which backends were built. Where each stage lives (paths under
``scop_ext/``):

| stage (DESIGN.md §1) | `STAGES` name | `ScopPruner` step | module |
|---|---|---|---|
| 1. knockoff data | `knockoffs` | `fit_knockoffs` | `knockoffs/` |
| 2. excavating: learn β, weights frozen | `scales` | `convert`, `learn_scales` | `prune/excavate.py` (on `prune/pairs.py`, `layers.py`, `lemma2.py`, `knockoff_stream.py`, `batch_detached.py`) |
| 3. selecting filters | `select` | `select` | `prune/importance.py`, `prune/groups.py`, `prune/space.py`, `prune/select.py` (`prune/keep.py`: what every policy shares; `prune/latency_policy.py`: `latency_target`) |
| 4. physical pruning and fine-tuning | `prune`, `finetune` | `prune`, `recalibrate_bn`, `finetune` | `prune/surgery.py`, `train.py` |
| the report | `report` | `evaluate`, `report` | `report.py` |

Beside the stages: `_ops.py` (the compiled operators, which `_loader.py` loads; their
argument checks are in `_op_checks.py`, and `reference.py` is their plain-PyTorch twin),
`layers.py` (`ScopConv2d`), `lemma2.py` (the knockoff bias), `knockoff_stream.py`
(`split_forward`: the frozen-BN step with the knockoff stream run apart, without autograd),
`batch_detached.py` (the batch-BN step with its statistics constant in the backward);
the run: `config.py` (`PruneConfig`), `presets.py` (named bundles of settings), `pipeline.py`
(`ScopPruner`, `STAGES`), `trained_model.py` (the model a run starts from, checked against the
data), `runfolder.py` (its output folder, resume state), `runlock.py` (one live run per
folder), `planner.py` (`scop plan`, a dry run of stages 3-4), `cli.py` (the `scop` parser and
its one-line errors; the sub-commands are in `cli_commands.py`, flags to settings in
`cli_config.py`); generic pieces that baseline training uses as much as pruning: `epochs.py` (the resumable epoch loop and its NaN checks), `train.py` (`fit`,
`evaluate`, `recalibrate_bn`), `export.py` (pickle-free model files), `distributed.py`
(torchrun), `resources.py` (memory checks), `timing.py`, `checkpoint.py`, `data.py`,
`models.py`, `plots.py` (every figure), `_checks.py`; in `prune/`: `flops.py`, `latency.py` and
`knapsack.py` (the latency model and its budget), `shuffle.py` (channel shuffles through the dependency graph).
"""

from ._loader import build_info
from ._ops import draw_seed, dual_scaled_conv2d, lemma2_sample
from .layers import ChannelScatter, ScopConv2d, convert, restore, scop_layers

__version__ = "0.1.0"

__all__ = [
    "build_info",
    "dual_scaled_conv2d",
    "lemma2_sample",
    "draw_seed",
    "ScopConv2d",
    "ChannelScatter",
    "convert",
    "restore",
    "scop_layers",
]
