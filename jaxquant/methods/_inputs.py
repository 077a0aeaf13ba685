"""The input checks every second-order method shares (SpQR, VPTQ, PVQ): recipe type, a 2-D
weight whose dimensions fit the recipe's groups, and ``XᵀX`` of the matching shape."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxquant.recipes import check_divisible


def check_weight_and_statistics(w: Any, xtx: Any, recipe: Any, recipe_type: type, where: str) -> tuple[int, int]:
    """Raise unless ``recipe`` is a ``recipe_type`` and ``w`` and ``xtx`` fit it; ``(d_out, d_in)``.

    Raises:
        TypeError: ``recipe`` is of another type.
        ValueError: ``w`` is not 2-D, its dimensions do not divide into the recipe's groups,
            or ``xtx`` is missing or not ``(d_in, d_in)``; each message names ``where``.
    """
    name = recipe_type.__name__
    if not isinstance(recipe, recipe_type):
        raise TypeError(f"recipe must be of type {name} at {where}, got {type(recipe).__name__}")
    if jnp.ndim(w) != 2:
        raise ValueError(f"{name} expects a 2-D weight, got shape {jnp.shape(w)} at {where}")
    d_out, d_in = jnp.shape(w)
    check_divisible(recipe, d_out, d_in, where)
    if xtx is None or tuple(jnp.shape(xtx)) != (d_in, d_in):
        got = None if xtx is None else tuple(jnp.shape(xtx))
        raise ValueError(f"{name} needs XᵀX of shape ({d_in}, {d_in}) for the weight at {where}, got {got}")
    return d_out, d_in


def host_problem(w: Any, xtx: Any, recipe: Any, recipe_type: type, where: str) -> tuple[np.ndarray, np.ndarray]:
    """``w`` and ``xtx`` checked (``check_weight_and_statistics``) and brought to the host as
    numpy arrays of one dtype (float64 where x64 is on, in tests; float32 otherwise), with
    the columns of dead inputs (``diag(XᵀX) = 0``) zeroed as the column loop zeroes them.

    Preparation runs on the host: eager jax ops would each compile a program.
    """
    check_weight_and_statistics(w, xtx, recipe, recipe_type, where)
    dt = np.float64 if jnp.asarray(w).dtype == jnp.float64 else np.float32
    w, h = np.asarray(w, dt), np.asarray(xtx, dt)
    return np.where(np.diagonal(h)[None, :] == 0, dt(0), w), h