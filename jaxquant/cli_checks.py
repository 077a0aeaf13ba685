"""Checks of command-line values that name the flag a user typed, not an internal field."""

from __future__ import annotations

import argparse


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


__all__ = ["flag", "require", "require_positive"]
