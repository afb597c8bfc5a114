"""One SCOP run: its settings (:class:`PruneConfig`, :mod:`.presets`), :class:`ScopPruner` with
its public steps (:mod:`.pruner`), the stage runner that resumes a run from its folder
(:mod:`.runner`, :mod:`.folder`, :mod:`.lock`), the dry run of ``scop plan`` (:mod:`.dry_run`) and
the report (:mod:`.report`)."""

from .config import PruneConfig
from .presets import PRESETS
from .pruner import STAGES, ScopPruner

__all__ = ["PRESETS", "PruneConfig", "STAGES", "ScopPruner"]
