"""Argument checks shared across the package (the operators keep their own, in ``_op_checks.py``)."""

from __future__ import annotations

from typing import Any

__all__ = ["check_counts"]


def check_counts(optional: bool = True, **values: Any) -> None:
    """Raise a ValueError naming the first of ``values`` that is not a positive int (or None,
    when ``optional``)."""
    for name, value in values.items():
        if optional and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int{' or None' if optional else ''}, got {value!r}")
