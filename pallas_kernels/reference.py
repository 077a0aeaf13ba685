"""Pure-JAX reference twin of the Pallas AQLM kernels (same arguments, same result)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def reference_aqlm_matmul(
    x: jax.Array, codes: jax.Array, codebooks: jax.Array, scales: jax.Array
) -> jax.Array:
    """``x @ W.T`` for an AQLM weight with ``out_group_size == 1``, decoded densely.

    Args:
        x: ``[rows, d_in]`` activations.
        codes: ``[d_out, n_in_groups, M]`` unsigned integer codes.
        codebooks: ``[M, K, 1, ig]`` codewords.
        scales: ``[d_out, 1, 1, 1]`` per-row scales.

    Returns:
        ``[rows, d_out]`` float32.
    """
    d_out, n_in_groups, m = codes.shape
    ig = codebooks.shape[-1]
    idx = codes.astype(jnp.int32)
    w = jnp.zeros((d_out, n_in_groups, ig), jnp.float32)
    for j in range(m):
        w = w + jnp.take(codebooks[j, :, 0, :].astype(jnp.float32), idx[..., j], axis=0)
    w = w.reshape(d_out, n_in_groups * ig) * scales.reshape(d_out, 1).astype(jnp.float32)
    return lax.dot_general(
        x.astype(jnp.float32), w, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST
    )
