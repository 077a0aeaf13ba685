"""Checks of settings that every layer shares, with errors that name the setting and its value."""

from __future__ import annotations

from typing import Any


def require_positive_int(name: str, value: Any) -> None:
    """Raise ``ValueError("name=value must be a positive int")`` unless ``value`` is an int >= 1
    (``True`` is not one)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")


def require_positive_ints(obj: Any, *names: str) -> None:
    """``require_positive_int`` on each named attribute of ``obj`` (a config dataclass)."""
    for name in names:
        require_positive_int(name, getattr(obj, name))


__all__ = ["require_positive_int", "require_positive_ints"]
