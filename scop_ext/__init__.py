"""scop_ext: knockoff-controlled filter pruning (SCOP, NeurIPS 2020) for PyTorch.

The subpackages follow the method: ``ops`` (the compiled operators) → ``nn`` (``ScopConv2d``) →
``knockoffs`` (stage 1) → ``scales`` (stage 2) → ``prune`` (stages 3-4) → ``run`` (one whole run,
``ScopPruner``) → ``cli`` (the ``scop`` command); ``train``, ``data`` and ``models`` serve them all.
Importing the package loads the operators (``torch.ops.scop.*``); :func:`build_info` says which
backends were built.
"""

import importlib as _importlib

from . import _moved
from .nn.channels import ChannelScatter
from .nn.scop_conv import ScopConv2d, convert, restore, scop_layers
from .ops.dual_scaled_conv2d import dual_scaled_conv2d
from .ops.lemma2_sample import draw_seed, lemma2_sample
from .ops.loader import build_info
from .train.metrics import install_default_handler

_moved.install()
# Progress (one line per epoch of every stage) goes to stderr through the "scop_ext" logger;
# set its level to WARNING to silence it, or give it your own handlers.
install_default_handler()

__version__ = "0.2.0"

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


def __getattr__(name: str):
    # `import scop_ext; scop_ext.layers.ScopConv2d` worked while the package imported its old
    # flat modules; the moved ones resolve (with their DeprecationWarning) on first use.
    if f"{__name__}.{name}" in _moved.MOVED:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
