"""Single-layer quantization problems and their error metric.

A problem is a weight ``W`` (float32, ``(d_out, d_in)``) and calibration inputs ``X``
(float32, ``(tokens, d_in)``). The shared synthetic problem of DESIGN.md has a few
salient input columns (scaled 5×) and correlated inputs with a decaying spectrum, so
that error-compensating methods (GPTQ, AQLM) have something to exploit over RTN.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from jaxquant.validate import require_finite_floats

SYNTHETIC_SALIENT_COLS = (87, 253, 443, 454, 485)


def make_synthetic_problem(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The shared 512×512 synthetic layer problem (DESIGN.md, "synthetic layer problem").

    Args:
        seed: seed of ``np.random.default_rng``; ``0`` is the shared benchmark.

    Returns:
        ``(W, X)``: ``W`` float32 ``(512, 512)`` (out, in), ``X`` float32 ``(4096, 512)``.
    """
    rng = np.random.default_rng(seed)
    d = 512
    # The draw order is part of the problem's definition: do not reorder.
    w = rng.standard_normal((d, d)) / np.sqrt(d)
    cols = np.sort(rng.choice(d, size=5, replace=False))
    w[:, cols] *= 5
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    z = rng.standard_normal((4096, d))
    x = (z * np.sqrt(1.0 / (np.arange(d) + 1))) @ q.T
    return w.astype(np.float32), x.astype(np.float32)


def make_random_problem(d_out: int, d_in: int, tokens: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A random layer problem of any size (for timing): Gaussian ``W``, inputs with a decaying spectrum."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((d_out, d_in), dtype=np.float32) / np.float32(np.sqrt(d_in))).astype(np.float32)
    x = rng.standard_normal((tokens, d_in), dtype=np.float32)
    x *= np.sqrt(1.0 / (np.arange(d_in, dtype=np.float32) + 1.0)).astype(np.float32)
    return w, x


def _check_problem(w: Any, x: Any, source: str) -> tuple[np.ndarray, np.ndarray]:
    w = np.asarray(w)
    x = np.asarray(x)
    if w.ndim != 2 or x.ndim != 2:
        raise ValueError(f"{source}: W must be (d_out, d_in) and X (tokens, d_in); got W{w.shape}, X{x.shape}")
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"{source}: W has d_in={w.shape[1]} but X has {x.shape[1]} columns")
    require_finite_floats(source, W=w, X=x)
    return w.astype(np.float32), x.astype(np.float32)


def load_problem(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Load ``(W, X)`` from an ``.npz`` with arrays ``W`` and ``X``, or ``"synthetic"``.

    Raises:
        ValueError: missing arrays, mismatched shapes, or non-finite values.
    """
    if str(path) == "synthetic":
        return make_synthetic_problem(0)
    with np.load(path) as data:
        missing = [k for k in ("W", "X") if k not in data.files]
        if missing:
            raise ValueError(f"{path}: missing arrays {missing}; found {data.files}")
        return _check_problem(data["W"], data["X"], str(path))


def relative_output_error(w: Any, w_hat: Any, x: Any) -> float:
    """``||(W − Ŵ) Xᵀ||²_F / ||W Xᵀ||²_F`` computed in float64.

    Args:
        w: ``(d_out, d_in)`` reference weight.
        w_hat: ``(d_out, d_in)`` approximation.
        x: ``(tokens, d_in)`` inputs.
    """
    w = np.asarray(w, np.float64)
    w_hat = np.asarray(w_hat, np.float64)
    x = np.asarray(x, np.float64)
    if w.shape != w_hat.shape:
        raise ValueError(f"W{w.shape} and W_hat{w_hat.shape} differ in shape")
    num = np.linalg.norm((w - w_hat) @ x.T) ** 2
    den = np.linalg.norm(w @ x.T) ** 2
    if den == 0.0:
        raise ValueError("||W Xᵀ|| is zero: the relative error is undefined")
    return float(num / den)
