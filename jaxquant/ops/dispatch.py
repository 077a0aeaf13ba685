"""``matmul(x, w)``: the single entry for ``x @ W`` with dense or quantized ``W``.

Weights follow the Flax kernel convention at this boundary: a dense ``w`` is
``(d_in, d_out)`` and ``matmul`` contracts the last axis of ``x`` with ``w``'s first
axis. A quantized ``w`` carries its own layout (see ``jaxquant.qarray``) and is decoded
to ``(d_out, d_in)`` storage order, then contracted on its input axis, which needs no
transpose of the weight.

Quantized weights go to the first eligible implementation of ``IMPLEMENTATIONS``: on
GPU the CUDA kernels ``cuda_ffi`` (lookup tables for 2^8 codebooks, a warp-per-row decode
for 2^16; built with nvcc at first use, skipped without it), then Pallas on GPU/TPU, the
native CPU lookup-table kernel ``cpu_ffi`` (an XLA FFI custom call compiled at first use,
skipped when no compiler is available), a kernel the weight's own type provides
(``QuantizedArray.few_rows_matmul``: how a method outside this layer brings one), the XLA
lookup-table kernel, and the XLA tile-wise decode that always works. Each raises ``NotImplementedError`` when it cannot
run the call (config, backend, batch rows); the choice is made in Python at trace time
from ``jax.default_backend()``, so compiled code carries exactly one implementation.
A weight that wraps another (``QuantizedArray.unwrap_for_matmul``: a rotated one) is
reduced first to a product with the wrapped array, which then goes through the same order.
Batches of more than ``DECODE_BATCH_ROWS`` rows go to the tile-wise decode and a
dense product, where decoding once is amortised over the rows.

Calibration needs the input of every linear layer. Rather than each model exposing
hooks, ``record_matmul_inputs`` installs a recorder for the duration of a trace; every
``matmul`` call then hands ``(x, w)`` to it. The recorder runs at trace time only, so
it costs nothing in compiled code that does not use it. A model whose layer sees only some
of its input rows (an expert, of the tokens routed to it) says which inside
``token_mask(mask)``; ``current_token_mask()`` gives the recorder that mask.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxquant.ops import cpu_ffi, cuda_ffi, xla
from jaxquant.qarray import AdditiveQuantized, is_quantized
from jaxquant.thread_scope import thread_setting

# Above this many rows of x, decoding a tile once and using a dense product beats
# per-row lookups (the LUT work grows with rows, the decode does not). Measured on a
# 2-core x86 machine, 4096x4096 2x8 (benchmarks/generate.py notes): cpu_ffi vs
# tile-wise decode took 2.8 vs 14.5 ms at 1 row, 18.5 vs 20.5 ms at 4, 108 vs 46 ms at 16.
DECODE_BATCH_ROWS = 4

_local = threading.local()

Recorder = Callable[[jax.Array, Any], None]


def record_matmul_inputs(recorder: Recorder) -> contextlib.AbstractContextManager[None]:
    """Call ``recorder(x, w)`` for every ``matmul`` made inside the ``with`` block."""
    return thread_setting(_local, "recorder", recorder)


def token_mask(mask: jax.Array) -> contextlib.AbstractContextManager[None]:
    """Mark the rows of the ``matmul`` inputs inside the ``with`` block that count for
    calibration: ``mask`` is boolean, shaped as the inputs' leading axes. It changes no
    product."""
    return thread_setting(_local, "token_mask", mask)


def current_token_mask() -> jax.Array | None:
    """The mask of the innermost ``token_mask`` block, or ``None``."""
    return getattr(_local, "token_mask", None)


def _dense_matmul(x: jax.Array, w: jax.Array, precision: Any = None) -> jax.Array:
    # Contract x's last axis with the kernel's input axis (axis 0 of a (d_in, d_out) kernel),
    # on x flattened to 2-D: XLA:CPU differentiates a dot over several leading axes into
    # slow transposed products (the quickstart training step: 1.10 s -> 0.78 s flattened).
    lead = x.shape[:-1]
    y = lax.dot_general(x.reshape(math.prod(lead), x.shape[-1]), w, (((1,), (0,)), ((), ())), precision=precision)
    return y.reshape(*lead, w.shape[1])


Impl = Callable[[jax.Array, Any], jax.Array]


def _require_small_batch(x: jax.Array, name: str) -> None:
    if x.shape[0] > DECODE_BATCH_ROWS:
        raise NotImplementedError(f"{name}: {x.shape[0]} rows > DECODE_BATCH_ROWS={DECODE_BATCH_ROWS}")


def _pallas(backend: str) -> Impl:
    """The Pallas AQLM kernel of ``backend`` ("gpu" or "tpu") as a matmul implementation."""
    name = f"pallas_{backend}"

    def run(x: jax.Array, w: Any) -> jax.Array:
        if jax.default_backend() != backend:
            raise NotImplementedError(f"{name}: backend is not {backend}")
        if not isinstance(w, AdditiveQuantized):
            raise NotImplementedError(f"{name}: AdditiveQuantized only")
        _require_small_batch(x, name)
        import pallas_kernels  # only on GPU/TPU: the dispatcher must not need Pallas elsewhere

        if not getattr(pallas_kernels, f"{backend}_eligible")(w.codes.shape, w.codebooks.shape):
            raise NotImplementedError(f"{name}: unsupported {w!r}")
        return getattr(pallas_kernels, f"aqlm_matmul_{backend}")(x, w.codes, w.codebooks, w.scales)

    return run


# Tried in this order; the last one accepts every quantized array.
IMPLEMENTATIONS: dict[str, Impl] = {
    "cuda_ffi": cuda_ffi.matmul_cuda,  # refuses more than cuda_ffi.MAX_ROWS rows itself
    "pallas_gpu": _pallas("gpu"),
    "pallas_tpu": _pallas("tpu"),
    "cpu_ffi": cpu_ffi.lut_matmul_ffi,
    "own_kernel": lambda x, w: w.few_rows_matmul(x),
    "xla_lut": xla.lut_matmul,
    "xla_decode": xla.decode_matmul,
    "reference": xla.reference_matmul,
}
_AUTO_ORDER = ("cuda_ffi", "pallas_gpu", "pallas_tpu", "cpu_ffi", "own_kernel", "xla_lut", "xla_decode")
# Lookup-table kernels are correct at any row count but only the fastest choice for a
# few rows: automatic selection skips them above DECODE_BATCH_ROWS; ``impl=`` does not.
_FEW_ROWS_ONLY = frozenset({"cuda_ffi", "cpu_ffi", "own_kernel", "xla_lut"})


def _run_quantized(x2: jax.Array, w: Any, impl: str | None) -> tuple[str, jax.Array]:
    wrapped = w.unwrap_for_matmul(x2)
    if wrapped is not None:  # e.g. a rotated weight: the wrapped array picks the kernel
        x_inner, inner, finish = wrapped
        name, y = _run_quantized(x_inner, inner, impl)
        return name, finish(y)
    if impl is not None:
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"impl={impl!r} is not one of {sorted(IMPLEMENTATIONS)}")
        return impl, IMPLEMENTATIONS[impl](x2, w)
    reasons = []
    for name in _AUTO_ORDER:
        if name in _FEW_ROWS_ONLY and x2.shape[0] > DECODE_BATCH_ROWS:
            reasons.append(f"{name}: {x2.shape[0]} rows > DECODE_BATCH_ROWS={DECODE_BATCH_ROWS}")
            continue
        try:
            return name, IMPLEMENTATIONS[name](x2, w)
        except NotImplementedError as e:
            reasons.append(f"{name}: {e}")
    raise NotImplementedError("no implementation accepted the call:\n" + "\n".join(reasons))


def select_impl(x: jax.Array, w: Any) -> str:
    """Name of the implementation ``matmul(x, w)`` uses (traced abstractly, no compute)."""
    x2 = jax.ShapeDtypeStruct((int(math.prod(x.shape[:-1])), x.shape[-1]), x.dtype)
    chosen: list[str] = []

    def probe(x2: jax.Array, w: Any) -> jax.Array:
        name, y = _run_quantized(x2, w, None)
        chosen.append(name)
        return y

    jax.eval_shape(probe, x2, w)
    return chosen[0]


def matmul(x: jax.Array, w: Any, *, impl: str | None = None) -> jax.Array:
    """``x @ W`` for a dense ``(d_in, d_out)`` kernel or a quantized array.

    Args:
        x: ``[..., d_in]`` activations.
        w: dense ``(d_in, d_out)`` kernel or a ``ScalarQuantized``/``AdditiveQuantized``.
        impl: force an implementation by name (quantized weights only), one of
            ``IMPLEMENTATIONS``; it raises ``NotImplementedError`` if ineligible.

    Returns:
        ``[..., d_out]`` in ``x``'s dtype.
    """
    recorder = getattr(_local, "recorder", None)
    if recorder is not None:
        recorder(x, w)
    if is_quantized(w):
        if x.shape[-1] != w.d_in:
            raise ValueError(f"matmul: x has {x.shape[-1]} features but the weight expects d_in={w.d_in}")
        lead = x.shape[:-1]
        _, y = _run_quantized(x.reshape(int(math.prod(lead)), w.d_in), w, impl)
        return y.reshape(*lead, w.d_out).astype(x.dtype)
    # A dense kernel has one implementation; ``impl`` is accepted and ignored so that a
    # model can pass the same ``impl`` to every matmul, quantized or not.
    w = jnp.asarray(w)
    if w.ndim != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"matmul: x of shape {x.shape} does not contract with kernel of shape {w.shape}")
    return _dense_matmul(x, w.astype(x.dtype))
