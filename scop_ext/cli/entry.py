"""The ``scop`` command: train a baseline, prune it with SCOP, plan a pruning dry run, inspect knockoffs, export.

Every sub-command has ``--help``; those that compute (``train``, ``prune``, ``knockoffs fit``,
``knockoffs check``, ``demo``) take ``--device`` and ``--seed``, and every one that writes files
takes ``--out``. Errors in the user's input (paths, configs, checkpoints) end with one line on
stderr and exit status 2; a run stopped by NaN/Inf or by a batch that would not fit in memory,
with one line and exit status 1.
"""

from __future__ import annotations

import errno
import os
import sys
import warnings

from . import commands
from .parser import build_parser

__all__ = ["main"]


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # A warning is one line of the command's output, not a source excerpt.
    print(f"scop: warning: {' '.join(str(message).split())}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.showwarning = _one_line_warning
    from ..train.checkpoint import CheckpointError
    from ..train.epochs import NonFiniteError
    from ..train.resources import ResourceError

    try:
        _check_out(getattr(args, "out", None))
        return getattr(commands, f"cmd_{args.handler}")(args)
    except (ValueError, CheckpointError) as exc:
        _error(args, exc, "")
        return 2
    except OSError as exc:  # FileNotFoundError, a full disk, a read-only or unwritable --out
        _error(args, _os_message(args, exc), "")
        return 2
    except NonFiniteError as exc:
        _error(args, exc, "; the last complete checkpoint is intact: fix the cause and rerun with --resume"
               if args.command == "prune" else "")
        return 1
    except ResourceError as exc:
        _error(args, exc, "")
        return 1


def _check_out(out: str | None) -> None:
    """--out must be a folder or be creatable as one: not a file, nor under one."""
    if not out:
        return
    path = os.path.abspath(out)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        where = "is a file" if path == os.path.abspath(out) else f"is under {path}, which is a file"
        raise ValueError(f"--out {out}: {where}, expected a folder")


# A full disk stops a command between two atomic writes: every complete file is whole.
_RESUME = {"prune": "rerun it with --resume", "train": "rerun the same command", "knockoffs": "rerun it (with --resume for --kind gan)"}


def _os_message(args, exc: OSError) -> str:
    if not exc.filename:
        return str(exc)
    text = f"{exc.filename}: {exc.strerror or exc}"
    out = getattr(args, "out", None)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        resume = _RESUME.get(args.command, "rerun it")
        return f"{text}; the folder is left resumable, every completed step kept: free some space and {resume} to continue"
    inside = out and os.path.abspath(exc.filename).startswith(os.path.abspath(out))
    if inside and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return f"{text} (--out must be a folder this user can write)"
    return text


def _error(args, exc: BaseException, hint: str) -> None:
    # One line, whatever the message: deeper errors (e.g. load_state_dict's) span several.
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    print(f"scop {args.command}: error: {text}{hint}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
