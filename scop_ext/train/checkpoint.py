"""Crash-safe, pickle-free checkpoints.

Every file is written to a temporary name in the same folder, flushed to disk, then renamed over
the target, so a killed process leaves either the old file or the new one, never half of one.
Loading uses ``torch.load(weights_only=True)``: tensors and plain containers only, so a file
carrying a pickled payload is refused rather than executed.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

__all__ = ["FORMAT_VERSION", "TEMP_PREFIX", "CheckpointError", "save", "load", "save_progress", "load_progress",
           "atomic_write_bytes", "atomic_write_text", "write_json", "malformed", "file_mode", "first_nonfinite",
           "differing_keys"]

FORMAT_VERSION = 1
TEMP_PREFIX = ".tmp-"  # files being written; a killed writer leaves one behind, never a half target


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, unsafe, or of the wrong kind/version."""


def file_mode() -> int:
    """The mode a new file gets under the process umask (0o666 & ~umask), as open() gives it."""
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    The file gets the mode ``open()`` would give it (the umask is honoured: run folders are
    shared), not mkstemp's 0600.

    Raises:
        OSError: naming ``path`` itself (not the temporary), e.g. ENOSPC on a full disk; the
            previous ``path``, if any, is left as it was.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX, suffix=os.path.basename(path))
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        # The rename itself lives in the folder's entry: sync it too, or a power cut can undo it.
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        _remove(tmp)
        raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno or errno.EIO), path) from None
    except BaseException:
        _remove(tmp)
        raise


def _remove(tmp: str | None) -> None:
    if tmp is not None and os.path.exists(tmp):
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def first_nonfinite(state: dict) -> str | None:
    """The name of the first floating-point tensor of a state_dict that holds NaN or Inf, or None."""
    return next((k for k, v in state.items()
                 if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())), None)


def save(path: str | os.PathLike, kind: str, payload: dict) -> None:
    """Atomically write ``payload`` (tensors, numbers, strings, lists, dicts) as a ``kind`` checkpoint."""
    buffer = io.BytesIO()
    torch.save({"format": "scop", "version": FORMAT_VERSION, "kind": kind, "payload": payload}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load(path: str | os.PathLike, kind: str, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save`, checking it is safe, whole, and of ``kind``.

    Raises:
        CheckpointError: with one line saying which file and what is wrong.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch wraps the one informative line in paragraphs of advice: keep that line only.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0] if lines else "")
        if "GLOBAL" in detail:  # a class or function to import: what a code-running payload needs
            raise CheckpointError(
                f"{path}: refused: it holds objects other than tensors and plain containers ({detail})"
            ) from None
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({detail})") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as exc:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({type(exc).__name__})") from None
    if not (isinstance(blob, dict) and blob.get("format") == "scop" and "payload" in blob):
        raise CheckpointError(f"{path}: not a scop checkpoint")
    if blob.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: written in checkpoint format version {blob.get('version')!r}; this scop reads version {FORMAT_VERSION}"
        )
    if blob.get("kind") != kind:
        raise CheckpointError(f"{path}: holds a {blob.get('kind')!r} checkpoint, expected {kind!r}")
    return blob["payload"]


def save_progress(path: str | os.PathLike, kind: str, settings: dict, payload: dict) -> None:
    """:func:`save` for the progress of a resumable stage, recording the ``settings`` it belongs to
    (JSON-able values) for :func:`load_progress` to match."""
    save(path, kind, {**payload, "settings": json.dumps(settings, sort_keys=True, default=_json_default)})


def load_progress(path: str | os.PathLike, kind: str, settings: dict, map_location: str | torch.device = "cpu", *,
                  renamed: Mapping[str, str] | None = None) -> dict | None:
    """The payload of the progress file at ``path`` if it was written under ``settings``; None
    when there is no file. ``renamed`` maps settings keys of older files to their names now.

    A file of other settings, or one that records none, is refused rather than ignored: resuming
    it would mix two runs, and starting over would overwrite the other run's work.

    Raises:
        CheckpointError: one line naming the file and every setting that differs.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        return None
    payload = load(path, kind, map_location)
    start_over = "delete the file (or use another output folder) to start over"
    try:
        saved = json.loads(payload["settings"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: records no settings to match this run against; {start_over}") from None
    if renamed and isinstance(saved, dict):
        saved = {renamed.get(k, k): v for k, v in saved.items()}
    ours = json.loads(json.dumps(settings, sort_keys=True, default=_json_default))
    differ = differing_keys(saved, ours)
    if differ:
        detail = ", ".join(f"{k}: {_brief(saved.get(k))} there, {_brief(ours.get(k))} now" for k in differ)
        raise CheckpointError(f"{path}: progress of a run with other settings ({detail}); rerun with its settings "
                              f"to resume it, or {start_over}")
    return payload


def differing_keys(saved: dict, ours: dict, ignore: Iterable[str] = ()) -> list[str]:
    """The keys, sorted, whose values differ between two settings mappings (a key one of them
    lacks counts as differing), leaving out ``ignore``."""
    ignore = set(ignore)
    return sorted(k for k in set(saved) | set(ours) if k not in ignore and saved.get(k) != ours.get(k))


def _brief(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


@contextlib.contextmanager
def malformed(path: str | os.PathLike) -> Iterator[None]:
    """Turn the KeyError/TypeError/... of restoring a checkpoint whose payload lacks a part, or
    holds one of the wrong shape, into one CheckpointError naming the file."""
    try:
        yield
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        what = f"lacks {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        raise CheckpointError(f"{os.fspath(path)}: malformed checkpoint ({what}); delete it to start that step over") from None
