"""scop_ext: knockoff-controlled filter pruning (SCOP, NeurIPS 2020) for PyTorch.

Importing the package loads the compiled operators (``torch.ops.scop.*``);
:func:`build_info` says which backends were built.
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
