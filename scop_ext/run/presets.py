"""Named bundles of :class:`~scop_ext.config.PruneConfig` settings, chosen by one key.

``preset: authors`` (``--preset authors``) is the recipe of the authors' release
(huawei-noah/Efficient-Computing, ``Pruning/SCOP_NeurIPS2020``; DESIGN.md §1 lists what their
code does). A preset only fills the keys a config leaves out: every key given in a file, by a
flag or by ``--set`` wins over it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS", "with_preset"]

PRESETS: dict[str, dict[str, Any]] = {
    "authors": {
        # stage 2: every conv but the stem and the downsample (shortcut) convs, mixing with no
        # knockoff bias, BatchNorm over the 2N batch, Adam 0.004 (0.5, 0.9) for 20 epochs
        "skip": ["conv1", "*.shortcut.0", "*.downsample.0"],
        "knockoff_bias": False,
        "bn": "batch",
        "scales_epochs": 20,
        "scales_lr": 0.004,
        "scales_betas": [0.5, 0.9],
        # stage 3: |gamma| (2 beta - 1), one uniform rate per layer (their README's 0.45)
        "importance": "scop",
        "multiply_bn_gamma": True,
        "policy": "uniform",
        "ratio": 0.45,
        # stage 4: block-final convs pruned and scattered back to full width; SGD Nesterov
        # (momentum 0.9) with a cosine schedule, lr 0.2, weight decay 1e-4, 120 epochs
        "block_width": "scatter",
        "finetune_epochs": 120,
        "finetune_lr": 0.2,
        "weight_decay": 1e-4,
    },
}


def with_preset(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with the settings of its ``preset`` key filled in where ``values`` has none.

    Raises:
        ValueError: ``preset`` names no preset.
    """
    name = values.get("preset")
    if name is None:
        return dict(values)
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(sorted(PRESETS))} (or null), got {name!r}")
    return {**PRESETS[name], **values}
