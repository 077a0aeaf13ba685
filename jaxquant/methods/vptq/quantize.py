"""VPTQ (Liu et al., 2024) on GPTQ's compiled column loop.

1. **Column scales** (``normalize``): each column is divided by its RMS, rounded to the
   stored dtype, so one codebook fits columns of any size.
2. **Codebooks** by k-means on the scaled weights' vectors (``v`` consecutive rows of one
   column), each vector weighted by ``diag(XᵀX)_i · s_i²``, its column's share of the
   output error per unit of squared error: the outlier columns (largest ``diag(XᵀX)``)
   get a codebook of their own, the others the main one, and the residual codebook is
   fitted on what the first one leaves of every vector.
3. **Codes** in ``methods.gptq``'s column loop: every column (in ``diag(XᵀX)``-decreasing
   order with ``act_order``) is coded vector by vector, nearest codeword first, then the
   nearest residual codeword to what is left; the column's error is spread over the
   columns not yet coded (``VectorRounding``).

The reference (``microsoft/VPTQ``, branch ``algorithm``) runs the column loop twice with a
residual codebook (once to fit it on the loop's errors); here it is fitted on the k-means
residual, so the loop runs once.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.methods import gptq
from jaxquant.methods._inputs import host_problem
from jaxquant.methods.aqlm.kmeans import assign_all, host_rng, lloyd, sample_indices
from jaxquant.methods.vptq.array import VPTQQuantized
from jaxquant.qarray import check_layout, code_dtype
from jaxquant.recipes import VPTQ


def codeword_scores(points: jax.Array, book: jax.Array) -> jax.Array:
    """``[n, k]``: squared distance of each of ``points [n, v]`` to each codeword of ``book
    [k, v]``, less the point's own squared norm (which does not change the ranking)."""
    return jnp.sum(book * book, axis=1)[None, :] - 2.0 * (points @ book.T)


def nearest_exact(points: jax.Array, book: jax.Array) -> jax.Array:
    """Index ``[n]`` of the codeword of ``book [k, v]`` nearest each of ``points [n, v]``
    (full-precision distances; ties go to the smaller index)."""
    return jnp.argmin(codeword_scores(points, book), axis=1)


@dataclasses.dataclass(frozen=True)
class VectorRounding:
    """The column rounding of VPTQ for ``gptq.column_loop``.

    ``params`` is ``(codebook, outlier_codebook, residual_codebook, scales, outlier)``:
    the codebooks ``[k, v]`` (``outlier_codebook`` equal to ``codebook`` when there are no
    outlier columns, ``residual_codebook`` unused without a residual) and, per column in
    processing order, the scale ``[d_in]`` and whether it is an outlier column ``[d_in]``.
    A column's codes are its first-stage codes, then its residual codes.
    """

    vector_size: int
    residual: bool

    def code_width(self, d_out: int) -> int:
        return (1 + int(self.residual)) * (d_out // self.vector_size)

    def __call__(self, x: jax.Array, column: jax.Array, params: Any) -> tuple[jax.Array, jax.Array]:
        codebook, outlier_codebook, residual_codebook, scales, outlier = params
        points = x.reshape(-1, self.vector_size) / scales[column]
        book = jnp.where(outlier[column], outlier_codebook, codebook)
        first = nearest_exact(points, book)
        decoded = book[first]
        codes = [first]
        if self.residual:
            second = nearest_exact(points - decoded, residual_codebook)
            decoded = decoded + residual_codebook[second]
            codes.append(second)
        return jnp.concatenate(codes).astype(x.dtype), (decoded * scales[column]).reshape(-1)


def column_vectors(w: Any, v: int) -> Any:
    """``[d_out, d_in] -> [d_out // v, d_in, v]``: the vectors of every column (numpy or jax)."""
    d_out, d_in = w.shape
    return w.reshape(d_out // v, v, d_in).transpose(0, 2, 1)


@functools.partial(jax.jit, static_argnames=("iters",))
def _kmeans(points: jax.Array, weights: jax.Array, subset: jax.Array | None, init: jax.Array, iters: int) -> jax.Array:
    """Weighted Lloyd on ``points[subset]`` from the points ``init`` of that subset."""
    if subset is not None:
        points, weights = points[subset], weights[subset]
    return lloyd(points, points[init], iters, weights)


@jax.jit
def _left_over(points: jax.Array, book: jax.Array) -> jax.Array:
    """What the nearest codeword leaves of each of ``points [..., v]`` (float32)."""
    flat = points.reshape(-1, points.shape[-1])
    return (flat - book[assign_all(flat, book)]).reshape(points.shape)


def fit_codebook(points: Any, weights: Any, bits: int, recipe: VPTQ, rng: np.random.Generator) -> jax.Array:
    """A ``[2**bits, v]`` codebook by weighted k-means on ``points [n, v]`` (a random
    subset of at most ``recipe.kmeans_max_points``, distinct random points as the start)."""
    subsets, inits = sample_indices(rng, points.shape[0], 1, 2**bits, recipe.kmeans_max_points)
    subset = None if subsets is None else jnp.asarray(subsets[0])
    # float32 whatever the weight's dtype: the nearest-centroid ranking packs float32 keys.
    return _kmeans(jnp.asarray(points, jnp.float32), jnp.asarray(weights, jnp.float32), subset, jnp.asarray(inits[0]),
                   iters=recipe.kmeans_iters)


def quantize_vptq(w: jax.Array, xtx: Any, recipe: VPTQ, key: jax.Array, *, layout: str = "out_in",
                  path: str = "") -> VPTQQuantized:
    """VPTQ quantization of one weight: the ``QuantizeFn`` of ``jaxquant.methods``.

    ``xtx`` is the ``(d_in, d_in)`` input second moment; ``key`` seeds the k-means starts
    and subsets (the same key gives the same codes).

    Raises:
        TypeError: ``recipe`` is not a ``VPTQ``.
        ValueError: a weight that is not 2-D, ``vector_size`` not dividing ``d_out``,
            missing or mis-shaped ``xtx``, or ``xtx`` not positive definite after damping.
    """
    where = path or "<weight>"
    check_layout(layout)
    w, h = host_problem(w, xtx, recipe, VPTQ, where)
    dt = w.dtype.type
    d_out, d_in = w.shape
    v, pdt = recipe.vector_size, jnp.dtype(recipe.param_dtype)
    diag = np.diagonal(h)

    scales = None
    if recipe.normalize:
        rms = np.sqrt(np.mean(w * w, axis=0))
        scales = np.where(rms > 0, rms, 1.0).astype(pdt)
    s = np.ones(d_in, dt) if scales is None else scales.astype(dt)

    by_diag = np.argsort(-diag, kind="stable")
    n_outliers = int(round(recipe.outlier_fraction * d_in))
    outlier = np.zeros(d_in, bool)
    outlier[by_diag[:n_outliers]] = True

    # k-means on the scaled vectors, each weighted by its column's diag(XᵀX)·s².
    rng = host_rng(key)
    points = np.asarray(column_vectors(w / s, v), np.float32)  # [d_out / v, d_in, v]
    weights = np.broadcast_to((diag * s * s).astype(np.float32), points.shape[:2])

    def fit(columns: np.ndarray, vectors: np.ndarray, bits: int) -> np.ndarray:
        book = fit_codebook(vectors[:, columns].reshape(-1, v), weights[:, columns].reshape(-1), bits, recipe, rng)
        return np.asarray(book).astype(pdt)

    codebook = fit(~outlier, points, recipe.codebook_bits)
    outlier_codebook = fit(outlier, points, recipe.codebook_bits) if n_outliers else None
    residual_codebook = None
    if recipe.residual_bits:
        left = points.copy()
        for columns, book in ((~outlier, codebook), (outlier, outlier_codebook)):
            if columns.any():
                left[:, columns] = np.asarray(_left_over(points[:, columns], book.astype(np.float32)))
        residual_codebook = fit(np.ones(d_in, bool), left, recipe.residual_bits)

    order = gptq.processing_order(h, recipe.act_order)
    books = tuple(b.astype(dt) for b in (codebook, codebook if outlier_codebook is None else outlier_codebook,
                                          codebook if residual_codebook is None else residual_codebook))
    codes = gptq.code_columns(w, h, VectorRounding(v, bool(recipe.residual_bits)),
                              (*books, s[order], outlier[order]), damp=recipe.damp, act_order=recipe.act_order,
                              block_size=recipe.block_size, where=where)
    codes = codes.reshape(-1, d_out // v, d_in)  # [stages, d_out / v, d_in]
    as_jax = lambda a: None if a is None else jnp.asarray(a)  # noqa: E731
    return VPTQQuantized(
        codes=jnp.asarray(codes[0].astype(code_dtype(recipe.codebook_bits))),
        codebook=jnp.asarray(codebook),
        residual_codes=jnp.asarray(codes[1].astype(code_dtype(recipe.residual_bits))) if recipe.residual_bits else None,
        residual_codebook=as_jax(residual_codebook),
        outlier_codebook=as_jax(outlier_codebook),
        outlier_columns=jnp.asarray(np.flatnonzero(outlier).astype(np.int16 if d_in < 2**15 else np.int32))
        if n_outliers else None,
        column_scales=as_jax(scales),
        codebook_bits=recipe.codebook_bits,
        residual_bits=recipe.residual_bits,
        shape=(d_out, d_in) if layout == "out_in" else (d_in, d_out),
        layout=layout,  # type: ignore[arg-type]
    )
