"""Re-encoding VPTQ weights toward a dense target (PV-Tuning's V step, straight-through).

A group is one vector: ``v`` consecutive rows of one column, in ``(d_out // v, d_in)``
order. A selected vector gets the nearest codeword to its scaled target, then (with a
residual codebook) the nearest residual codeword to what is left, the same greedy
choice the quantizer makes. With ``force``, a vector whose greedy choice is its current
code takes the nearest other first-stage codeword that moves it toward the target.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxquant.methods.reencoding import Reencoder, keep_new
from jaxquant.methods.vptq.array import VPTQQuantized
from jaxquant.methods.vptq.quantize import codeword_scores, column_vectors, nearest_exact


def _first_stage_scores(q: VPTQQuantized, points: jax.Array, columns: jax.Array) -> jax.Array:
    """``[n, k]`` squared distance (up to a per-point constant) of each point to every
    first-stage codeword of its column's codebook."""
    scores = codeword_scores(points, q.codebook.astype(jnp.float32))
    if q.outlier_codebook is not None:
        other_scores = codeword_scores(points, q.outlier_codebook.astype(jnp.float32))
        scores = jnp.where(q.outlier_mask()[columns][:, None], other_scores, scores)
    return scores


def reencode_vptq(q: VPTQQuantized, target: jax.Array, idx: jax.Array, *, beam_size: int = 1,
                  trust_ratio: float | None = None, force: bool = False) -> VPTQQuantized:
    """Re-encode the vectors ``idx`` (flat ``r * d_in + i``) of ``q`` toward ``target``
    ``(d_out, d_in)`` (the ``Reencoder.reencode`` contract; ``beam_size`` is unused: the
    choice is greedy, as in the quantizer)."""
    del beam_size
    rows, columns = idx // q.d_in, idx % q.d_in
    want = column_vectors(target.astype(jnp.float32), q.vector_size)[rows, columns]  # [n, v]
    scale = jnp.ones_like(want[:, 0]) if q.column_scales is None else q.column_scales.astype(jnp.float32)[columns]
    points = want / scale[:, None]

    cur_first = q.codes[rows, columns].astype(jnp.int32)
    cur_residual = None if q.residual_codes is None else q.residual_codes[rows, columns].astype(jnp.int32)
    current = q.decode_vectors(cur_first, cur_residual, columns)

    scores = _first_stage_scores(q, points, columns)
    first = jnp.argmin(scores, axis=1)
    if force:
        # The nearest other codeword, for vectors whose nearest is their own.
        others = scores.at[jnp.arange(first.shape[0]), cur_first].set(jnp.inf)
        first = jnp.where(first == cur_first, jnp.argmin(others, axis=1), first)
    residual = None
    if q.residual_codebook is not None:
        left = points - q.decode_vectors(first, None, columns) / scale[:, None]
        residual = nearest_exact(left, q.residual_codebook.astype(jnp.float32))
    new = q.decode_vectors(first, residual, columns)

    keep = keep_new(current, new, want, jnp.sum(q.decode_out_in(jnp.float32) ** 2), trust_ratio, force)

    def update(codes: jax.Array, chosen: jax.Array) -> jax.Array:
        return codes.at[rows, columns].set(jnp.where(keep, chosen, codes[rows, columns].astype(jnp.int32))
                                           .astype(codes.dtype), unique_indices=True)

    return dataclasses.replace(
        q,
        codes=update(q.codes, first),
        residual_codes=None if residual is None else update(q.residual_codes, residual),
    )


REENCODER = Reencoder(
    num_groups=lambda q: (q.d_out // q.vector_size) * q.d_in,
    group_sums=lambda q, per_weight: jnp.sum(column_vectors(per_weight, q.vector_size), axis=-1).reshape(-1),
    reencode=reencode_vptq,
)
