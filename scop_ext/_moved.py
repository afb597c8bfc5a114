"""The modules the 0.2 regrouping moved: their old import paths keep working for one release.

``import scop_ext.layers`` (or ``from scop_ext.pipeline import ScopPruner``) gives a stand-in
module that warns once, with a ``DeprecationWarning`` naming the new home, and hands out the new
module's names. A meta-path finder does it, so the old paths need no files of their own; the
README's "Moved" table lists the same pairs.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

__all__ = ["MOVED", "install"]

# old module -> new module (a package where the old module's names now span several files)
MOVED = {
    "scop_ext._loader": "scop_ext.ops.loader",
    "scop_ext._ops": "scop_ext.ops",
    "scop_ext._op_checks": "scop_ext.ops.checks",
    "scop_ext._checks": "scop_ext.ops.checks",
    "scop_ext.reference": "scop_ext.ops.reference",
    "scop_ext.layers": "scop_ext.nn",
    "scop_ext.lemma2": "scop_ext.nn.lemma2",
    "scop_ext.knockoff_stream": "scop_ext.scales.split",
    "scop_ext.batch_detached": "scop_ext.scales.batch_bn",
    "scop_ext.prune.excavate": "scop_ext.scales",
    "scop_ext.prune.pairs": "scop_ext.scales.pairs",
    "scop_ext.prune.keep": "scop_ext.prune.space",
    "scop_ext.config": "scop_ext.run.config",
    "scop_ext.presets": "scop_ext.run.presets",
    "scop_ext.pipeline": "scop_ext.run",
    "scop_ext.runfolder": "scop_ext.run.folder",
    "scop_ext.runlock": "scop_ext.run.lock",
    "scop_ext.planner": "scop_ext.run.dry_run",
    "scop_ext.report": "scop_ext.run.report",
    "scop_ext.trained_model": "scop_ext.run.trained_model",
    "scop_ext.epochs": "scop_ext.train.epochs",
    "scop_ext.checkpoint": "scop_ext.train.checkpoint",
    "scop_ext.distributed": "scop_ext.train.distributed",
    "scop_ext.resources": "scop_ext.train.resources",
    "scop_ext.timing": "scop_ext.train.timing",
    "scop_ext.cli_commands": "scop_ext.cli.commands",
    "scop_ext.cli_config": "scop_ext.cli.settings",
    "scop_ext.knockoffs.report": "scop_ext.knockoffs.quality",
}


class _Moved(types.ModuleType):
    """Stands in for an old module: every attribute is the new module's."""

    def __init__(self, old: str, new: types.ModuleType) -> None:
        super().__init__(old, f"Moved to {new.__name__}; this name goes away in the next release.")
        self.__dict__["_new"] = new

    def __getattr__(self, name: str):
        return getattr(self.__dict__["_new"], name)

    def __dir__(self):
        return dir(self.__dict__["_new"])


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = importlib.import_module(MOVED[spec.name])
        warnings.warn(f"{spec.name} moved to {new.__name__}: import it from there ({spec.name} goes away in the "
                      "next release)", DeprecationWarning, stacklevel=2)  # warnings skips importlib's frames
        return _Moved(spec.name, new)

    def exec_module(self, module):
        pass


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
