"""The output folder of one pruning run: every stage's result, ``state.json`` (the stages completed
and their results so far), ``config.json``, and what a restart must clear first."""

from __future__ import annotations

import json
import os
from typing import Any

from . import checkpoint

__all__ = ["RunFolder"]


class RunFolder:
    """Files of a run under ``root``; every write is atomic (:mod:`scop_ext.checkpoint`).

    Args:
        root: the folder (created by :meth:`clear`).
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = os.fspath(root)

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def clear(self, *, keep_progress: bool) -> None:
        """Create the folder; delete what killed writes left, and, unless ``keep_progress``, the
        stages' ``*-progress.pt`` files.

        Not resuming means starting over. When resuming the progress files stay, even before
        ``state.json`` exists (a kill in stage 1), and each is refused if it belongs to another
        config. Under torchrun call it on process 0 only.
        """
        os.makedirs(self.root, exist_ok=True)
        for name in os.listdir(self.root):
            if name.startswith(checkpoint.TEMP_PREFIX) or (not keep_progress and name.endswith("-progress.pt")):
                os.unlink(self.path(name))

    def read_state(self, config: dict[str, Any]) -> dict | None:
        """``state.json`` of an interrupted run with this ``config``; None when the folder has none.

        Raises:
            CheckpointError: the state or config file cannot be read.
            ValueError: the interrupted run had another config; the message names the keys.
        """
        path = self.path("state.json")
        if not os.path.exists(path):
            return None
        try:
            with open(path) as f:
                state = json.load(f)
            with open(self.path("config.json")) as f:
                saved = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise checkpoint.CheckpointError(f"{self.root}: cannot resume, run state unreadable ({exc})") from None
        changed = checkpoint.differing_keys(saved, config)
        if changed:
            raise ValueError(f"{self.root}: cannot resume: the config differs from the interrupted run's in {changed}")
        return state

    def write_state(self, completed: list[str], results: dict[str, Any]) -> None:
        checkpoint.write_json(self.path("state.json"), {"completed": completed, "results": results})

    def write_config(self, config: dict[str, Any]) -> None:
        checkpoint.write_json(self.path("config.json"), config)
