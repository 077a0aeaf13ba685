"""Checks of settings that every layer shares, with errors that name the setting and its value."""

from __future__ import annotations

from typing import Any

import numpy as np


def require_positive_int(name: str, value: Any) -> None:
    """Raise ``ValueError("name=value must be a positive int")`` unless ``value`` is an int >= 1
    (``True`` is not one)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")


def require_positive_ints(obj: Any, *names: str) -> None:
    """``require_positive_int`` on each named attribute of ``obj`` (a config dataclass)."""
    for name in names:
        require_positive_int(name, getattr(obj, name))


def require_finite_floats(where: str, **arrays: np.ndarray) -> None:
    """Raise unless each named host array has a floating dtype and holds no NaN or Inf.

    Args:
        where: what the arrays belong to (a leaf path or a file), named in the error.
        **arrays: the arrays by the names the error gives them.

    Raises:
        TypeError: ``"{name} at {where} has dtype {dtype}, expected floating point"``.
        ValueError: ``"{name} at {where} holds NaN or Inf"``.
    """
    for name, array in arrays.items():
        if not np.issubdtype(array.dtype, np.floating):
            raise TypeError(f"{name} at {where} has dtype {array.dtype}, expected floating point")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{name} at {where} holds NaN or Inf")


__all__ = ["require_finite_floats", "require_positive_int", "require_positive_ints"]
