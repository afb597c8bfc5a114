"""The output folder of one pruning run: every stage's result, ``state.json`` (the stages completed
and their results so far), ``config.json``, and what a restart must clear first."""

from __future__ import annotations

import json
import os
from typing import Any

from ..train import checkpoint

__all__ = ["OWNER_FILE", "RunFolder", "claim"]

OWNER_FILE = "scop-owner.json"
# What each command leaves in its folder: how a folder written before owner files existed is told.
_SIGNS = {"prune": ("config.json", "state.json", "scales.pt", "plan.json"),
          "train": ("train-progress.pt", "metrics.json"),
          "knockoffs fit": ("knockoffs-progress.pt",),
          "export": ("model.onnx", "model.ts")}


def claim(folder: str | os.PathLike, command: str, settings: dict[str, Any] | None = None) -> None:
    """Record that ``command`` (``"prune"``, ``"train"``, ``"knockoffs fit"``, ``"export"``) owns
    ``folder``, in its ``scop-owner.json``; refuse a folder another command owns, and, with
    ``settings``, one this command filled under other settings. Nothing is written then, so no
    command overwrites another's files.

    Raises:
        ValueError: naming the folder, its owner and what differs.
    """
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, OWNER_FILE)
    if os.path.lexists(path):
        owner = RunFolder(folder).read_json(OWNER_FILE)
        theirs = owner.get("command")
        if theirs != command:
            raise ValueError(f"{folder}: holds the files of a `scop {theirs}` run ({OWNER_FILE}); `scop {command}` "
                             "never writes into another command's folder: give another --out")
        saved = owner.get("settings")
        differ = checkpoint.differing_keys(saved, settings) if isinstance(saved, dict) and settings is not None else []
        if differ:
            raise ValueError(f"{folder}: holds a `scop {command}` run of other settings ({', '.join(differ)}), which is "
                             "never overwritten: give another --out")
        return
    names = set(os.listdir(folder))
    theirs = next((c for c, signs in _SIGNS.items() if c != command and names & set(signs)), None)
    if command != "prune" and "knockoffs.pt" in names and "config.json" in names:
        theirs = "prune"
    elif command != "knockoffs fit" and "knockoffs.pt" in names and "config.json" not in names:
        theirs = "knockoffs fit"
    if theirs is not None:
        raise ValueError(f"{folder}: holds the files of a `scop {theirs}` run; `scop {command}` never writes into "
                         "another command's folder: give another --out")
    checkpoint.write_json(path, {"command": command, "settings": settings})


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

    def refuse_another_run(self, config: dict[str, Any]) -> None:
        """Before starting over: ValueError when the folder holds the files of a run with other
        settings (or of another command), which starting over would overwrite."""
        progress = sorted(name for name in os.listdir(self.root) if name.endswith("-progress.pt"))
        if os.path.exists(self.path("config.json")):
            saved = self.read_json("config.json")
            differ = checkpoint.differing_keys(saved, config)
            if differ:
                detail = ", ".join(f"{k}: {json.dumps(saved.get(k))} there, {json.dumps(config.get(k))} now" for k in differ)
                raise ValueError(f"{self.root}: holds a run of other settings ({detail}), which is never overwritten; "
                                 "rerun with its settings and --resume, or give another --out")
        elif progress or os.path.exists(self.path("state.json")):
            raise ValueError(f"{self.root}: holds {', '.join(progress or ['state.json'])} but no config.json, so not "
                             "a run this one can start over; give another --out, or delete them")

    def read_json(self, name: str) -> dict:
        """The mapping in the run file ``name``; CheckpointError naming the file otherwise."""
        path = self.path(name)
        try:
            with open(path, encoding="utf-8") as f:
                value = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise checkpoint.CheckpointError(f"{path}: run file unreadable ({exc})") from None
        if not isinstance(value, dict):
            raise checkpoint.CheckpointError(f"{path}: run file holds a {type(value).__name__}, expected a mapping")
        return value

    def read_state(self, config: dict[str, Any]) -> dict | None:
        """``state.json`` of an interrupted run with this ``config``; None when the folder has none.

        Raises:
            CheckpointError: the state or config file cannot be read, or is not a run's.
            ValueError: the interrupted run had another config; the message names the keys.
        """
        path = self.path("state.json")
        if not os.path.exists(path):
            return None
        state, saved = self.read_json("state.json"), self.read_json("config.json")
        completed, results = state.get("completed"), state.get("results")
        if not (isinstance(completed, list) and all(isinstance(c, str) for c in completed) and isinstance(results, dict)):
            raise checkpoint.CheckpointError(f"{path}: cannot resume: not a scop run state (expected "
                                             '{"completed": [stage names], "results": {...}})')
        changed = checkpoint.differing_keys(saved, config)
        if changed:
            raise ValueError(f"{self.root}: cannot resume: the config differs from the interrupted run's in {changed}")
        return state

    def write_state(self, completed: list[str], results: dict[str, Any]) -> None:
        checkpoint.write_json(self.path("state.json"), {"completed": completed, "results": results})

    def claim(self, config: dict[str, Any]) -> None:
        """Own the folder for a pruning run (:func:`claim`) and record ``config.json``, unless the
        folder already holds a run of another config, which is refused, never overwritten."""
        claim(self.root, "prune")
        if os.path.exists(self.path("config.json")):
            differ = checkpoint.differing_keys(self.read_json("config.json"), config)
            if differ:
                raise ValueError(f"{self.root}: holds a run of other settings ({', '.join(differ)}), which is never "
                                 "overwritten; give another --out")
        else:
            self.write_config(config)

    def write_config(self, config: dict[str, Any]) -> None:
        checkpoint.write_json(self.path("config.json"), config)
