"""Modules for your own networks: :class:`ScopConv2d` (a drop-in ``nn.Conv2d`` with SCOP's
paired forward) with :func:`convert` / :func:`restore`, the Lemma 2 knockoff bias it draws
(:mod:`.lemma2`), and the channel-moving :class:`ChannelScatter` and :class:`ChannelShuffle`."""

from . import lemma2
from .channels import ChannelScatter, ChannelShuffle
from .scop_conv import ScopConv2d, convert, restore, scop_layers

__all__ = ["ChannelScatter", "ChannelShuffle", "ScopConv2d", "convert", "lemma2", "restore", "scop_layers"]
