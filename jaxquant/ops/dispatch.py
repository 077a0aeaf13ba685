"""``matmul(x, w)``: the single entry for ``x @ W`` with dense or quantized ``W``.

Weights follow the Flax kernel convention at this boundary: a dense ``w`` is
``(d_in, d_out)`` and ``matmul`` contracts the last axis of ``x`` with ``w``'s first
axis. A quantized ``w`` carries its own layout (see ``jaxquant.qarray``) and is decoded
to ``(d_out, d_in)`` storage order, then contracted on its input axis, which needs no
transpose of the weight.

Calibration needs the input of every linear layer. Rather than each model exposing
hooks, ``record_matmul_inputs`` installs a recorder for the duration of a trace; every
``matmul`` call then hands ``(x, w)`` to it. The recorder runs at trace time only, so
it costs nothing in compiled code that does not use it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxquant.qarray import is_quantized

_local = threading.local()

Recorder = Callable[[jax.Array, Any], None]


@contextlib.contextmanager
def record_matmul_inputs(recorder: Recorder) -> Iterator[None]:
    """Call ``recorder(x, w)`` for every ``matmul`` made inside the ``with`` block."""
    previous = getattr(_local, "recorder", None)
    _local.recorder = recorder
    try:
        yield
    finally:
        _local.recorder = previous


def _dense_matmul(x: jax.Array, w: jax.Array, precision: Any = None) -> jax.Array:
    # Contract x's last axis with the kernel's input axis (axis 0 of a (d_in, d_out) kernel).
    return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def _decode_then_matmul(x: jax.Array, w: Any) -> jax.Array:
    w_out_in = w.decode_out_in(x.dtype)
    return lax.dot_general(x, w_out_in, (((x.ndim - 1,), (1,)), ((), ())))


def matmul(x: jax.Array, w: Any, *, impl: str | None = None) -> jax.Array:
    """``x @ W`` for a dense ``(d_in, d_out)`` kernel or a quantized array.

    Args:
        x: ``[..., d_in]`` activations.
        w: dense ``(d_in, d_out)`` kernel or a ``ScalarQuantized``/``AdditiveQuantized``.
        impl: force an implementation by name (quantized weights only).

    Returns:
        ``[..., d_out]`` in ``x``'s dtype.
    """
    recorder = getattr(_local, "recorder", None)
    if recorder is not None:
        recorder(x, w)
    if is_quantized(w):
        if x.shape[-1] != w.d_in:
            raise ValueError(f"matmul: x has {x.shape[-1]} features but the weight expects d_in={w.d_in}")
        return _decode_then_matmul(x, w)
    w = jnp.asarray(w)
    if w.ndim != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"matmul: x of shape {x.shape} does not contract with kernel of shape {w.shape}")
    return _dense_matmul(x, w.astype(x.dtype))
