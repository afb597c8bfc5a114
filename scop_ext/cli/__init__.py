"""The ``scop`` command: :mod:`.entry` parses and turns errors into one line, :mod:`.commands`
runs each sub-command and :mod:`.settings` maps flags onto :class:`~scop_ext.run.PruneConfig`."""

from .entry import main

__all__ = ["main"]
