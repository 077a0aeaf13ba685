"""Checks the quantized array types share: tile decoding and ``ops.matmul`` agree with the
whole decoded weight, and one PV-Tuning step keeps the V step's change within the trust ratio."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxquant as jq
from jaxquant import ops
from jaxquant.finetune import pv


def check_decode_rows_and_matmul(w: np.ndarray, h: np.ndarray, recipe: Any, rng: np.random.Generator,
                                 tile: int = 16) -> None:
    """For ``w (d_out, d_in)`` quantized by ``recipe`` in both layouts: ``decode()`` is the
    stored weight in the leaf's layout, tiles of ``decode_rows`` are its rows, and
    ``ops.matmul`` at a few batch sizes is the product with it."""
    for layout in ("out_in", "in_out"):
        leaf = w if layout == "out_in" else w.T
        q = jq.quantize_weight(jnp.asarray(leaf, jnp.float32), jnp.asarray(h, jnp.float32), recipe, layout=layout)
        _check_one(q, rng, tile)


def _check_one(q: Any, rng: np.random.Generator, tile: int) -> None:
    dense = np.asarray(q.decode_out_in())
    np.testing.assert_array_equal(np.asarray(q.decode()), dense if q.layout == "out_in" else dense.T)
    for start in range(0, q.d_out, tile):
        np.testing.assert_array_equal(np.asarray(q.decode_rows(jnp.int32(start), tile)), dense[start:start + tile])
    for rows in (1, 3, 9):
        x = jnp.asarray(rng.standard_normal((rows, q.d_in)), jnp.float32)
        np.testing.assert_allclose(np.asarray(ops.matmul(x, q)), np.asarray(x) @ dense.T, rtol=2e-5, atol=2e-5)


def bounded_v_step_ratio(q: Any, trust_ratio: float) -> float:
    """``‖ΔŴ‖ / ‖Ŵ‖`` after one PV step (no P step) that pushes every weight of ``q`` toward
    zero with half of its groups selected, under ``trust_ratio``."""
    tree = {"w": q}
    w0 = np.asarray(q.decode_out_in())
    grads = {"w": jnp.asarray(np.sign(w0), jnp.float32)}
    tuner = pv.pv_tuning(optax.sgd(0.0), optax.sgd(50.0), pv.VStep(update_fraction=0.5, trust_ratio=trust_ratio))
    new, _ = jax.jit(tuner.update)(grads, tuner.init(tree), tree)
    return float(np.linalg.norm(np.asarray(new["w"].decode_out_in()) - w0) / np.linalg.norm(w0))
