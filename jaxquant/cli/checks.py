"""Command-line values checked and converted, with errors that name the flag a user typed."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def flag(name: str) -> str:
    """The flag of an ``argparse`` destination: ``eval_windows`` -> ``--eval-windows``."""
    return "--" + name.replace("_", "-")


def require(args: argparse.Namespace, name: str, ok: bool, rule: str) -> None:
    """Raise ``ValueError("--flag VALUE RULE")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{flag(name)} {getattr(args, name)} {rule}")


def require_positive(args: argparse.Namespace, *names: str) -> None:
    """Every named value is at least 1 (counts) or above 0 (rates)."""
    for name in names:
        value = getattr(args, name)
        require(args, name, value >= 1 if isinstance(value, int) else value > 0, "must be positive")


def with_flags(args: argparse.Namespace, make: Callable[[], T]) -> T:
    """``make()``, its ``ValueError`` reworded to name flags: ``update_fraction=2.0 ...``
    becomes ``--update-fraction 2.0 ...`` for every destination of ``args``."""
    try:
        return make()
    except ValueError as e:
        message = str(e)
        for name in vars(args):
            message = re.sub(rf"\b{re.escape(name)}=", flag(name) + " ", message)
        raise ValueError(message) from None


def compute_dtype(name: str) -> Any:
    """The JAX dtype a ``--dtype`` value names (float32 or bfloat16)."""
    import jax.numpy as jnp  # noqa: PLC0415 - the command line starts without JAX

    choices = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if name not in choices:
        raise ValueError(f"--dtype {name!r} must be one of {sorted(choices)}")
    return choices[name]


__all__ = ["compute_dtype", "flag", "require", "require_positive", "with_flags"]
