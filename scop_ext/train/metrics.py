"""What a training stage reports after every epoch: one log line (its figures, the epoch's time and
the ETA) through ``logging``, one JSON line in the run's metrics file, and TensorBoard scalars
when TensorBoard is installed.

The ``scop_ext`` logger prints INFO lines to stderr unless the application configures it
(``logging.getLogger("scop_ext")``): set its level to WARNING to silence them, or clear its
handlers and set ``propagate = True`` to route them through your own logging setup.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import sys
import time

from . import distributed

__all__ = ["EpochLog", "format_seconds", "install_default_handler"]

logger = logging.getLogger("scop_ext")


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a line is emitted (a redirect made after import,
    pytest's capture or ``contextlib.redirect_stderr``, still sees the lines)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def install_default_handler() -> None:
    """INFO lines of the ``scop_ext`` loggers on stderr, unless a handler is already there."""
    if not logger.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # one copy of each line when the application also logs


def format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _figure(key: str, value) -> str:
    if isinstance(value, float):
        if math.isfinite(value) and ("top1" in key or "top5" in key):
            return f"{key} {100 * value:.2f}%"
        return f"{key} {value:.4g}"
    return f"{key} {value}"


class EpochLog:
    """The per-epoch record of one stage (``train``, ``scales``, ``finetune``, ...).

    Args:
        stage: the stage's name, first on every line and in every record.
        epochs: how many epochs the stage runs (for the ETA).
        path: the metrics file (JSON lines, appended to, so a resumed run continues it); None
            writes none. TensorBoard events go to a ``tensorboard`` folder beside it.
        unit: what one step of the record is called on its line ("epoch"; a KnockoffGAN, which
            trains by iterations, logs each tenth of its run).
    """

    def __init__(self, stage: str, epochs: int, path: str | None = None, unit: str = "epoch") -> None:
        self.stage, self.epochs, self.path, self.unit = stage, epochs, path, unit
        self.main = distributed.is_main()
        self._writer = self._tensorboard() if path and self.main else None

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the tensorboard package is optional
            return None
        return SummaryWriter(os.path.join(os.path.dirname(self.path), "tensorboard"))

    def start(self, first_epoch: int) -> None:
        self.first, self.t0, self.last = first_epoch, time.time(), time.time()

    def epoch(self, epoch: int, figures: dict) -> None:
        """Log and record epoch ``epoch`` (0-based) with ``figures``."""
        now = time.time()
        seconds, self.last = now - self.last, now
        done = epoch + 1 - self.first
        eta = (now - self.t0) / max(done, 1) * (self.epochs - epoch - 1)
        if not self.main:
            return
        shown = "  ".join(_figure(k, v) for k, v in figures.items() if k != "epoch")
        logger.info("[%s] %s %d/%d  %s  %s, ETA %s", self.stage, self.unit, epoch + 1, self.epochs, shown,
                    format_seconds(seconds), format_seconds(eta))
        record = {"stage": self.stage, "epoch": epoch, **{k: v for k, v in figures.items() if k != "epoch"},
                  "seconds": seconds, "time": datetime.datetime.now().isoformat(timespec="seconds")}
        if self.path:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, default=float) + "\n")
        if self._writer is not None:
            for key, value in figures.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self._writer.add_scalar(f"{self.stage}/{key}", value, epoch)
            self._writer.flush()
