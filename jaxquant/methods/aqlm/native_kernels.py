"""Native CPU kernels of AQLM (XLA FFI custom calls): the beam search and k-means.

``beam_search`` has the same algorithm, same inputs and the same result contract as ``beam_search.beam_search``
(the XLA implementation, which stays the reference it is tested against): for every row
(output group) a beam of ``beam_size`` whole-row hypotheses visits the input groups in
``group_order`` and, within a group, the codebooks in ``codebook_order``, extending every
hypothesis by every codeword and keeping the best (hypothesis, codeword) pairs, scored
through ``XᵀX`` with the incremental loss (see the notation in ``beam_search``). A row
keeps its best hypothesis only if it lowers the loss.

Why native code. XLA:CPU runs the search as hundreds of small fused loops per input group
over arrays shaped [candidates, beam, rows]; the beam's state for a chunk of rows (the
hypotheses' ``(ŵ - w)H``, 4 MB for 256 rows at beam 8) streams through memory at every
group, and selecting the best candidates takes several passes over the scores. Here one
thread takes one row at a time: the row's beam (8 × ``d_in`` floats of ``g`` plus codes)
stays in L1/L2 for the whole pass, candidates are scored by vectorised loops over the
codebook, and the best ``beam_size`` are kept by insertion against a running threshold
(one comparison for almost every candidate). Selection is exact in float32 (the XLA
path ranks by packed keys that keep ≥ 11 mantissa bits), ties going to the smaller
(code, parent) as there. Rows are spread over XLA's intra-op thread pool.

Inputs are the codes, scales and codebooks of the round, ``H`` and ``g0 = (ŵ - w)H``
(one matmul, done by XLA before the call), and the codeword Gram terms ``q`` of
``beam_search.codeword_gram``.

``nearest`` is k-means' assignment step (``kmeans.assign_all`` is its reference): the
exact nearest centroid of each point, distances kept in registers. ``lloyd`` is a whole
k-means fit (``kmeans.lloyd`` then ``assign_all`` is its reference) that skips most
distance computations with Hamerly's bounds.

Built on first use by ``jaxquant.native_build``; when the library cannot be built
``available()`` is False and AQLM uses the XLA paths (``JAXQUANT_NO_FFI=1`` forces them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.methods.aqlm import beam_search as bs
from jaxquant.methods.aqlm import codebooks as cb
from jaxquant.native_build import NativeLibrary

TARGET_NAME = "jaxquant_aqlm_beam_search_f32"
NEAREST_TARGET_NAME = "jaxquant_kmeans_nearest_f32"
LLOYD_TARGET_NAME = "jaxquant_kmeans_lloyd_f32"
# Points per block of the nearest-centroid kernel.
NEAREST_BLOCK_ROWS = 1024
# Rows a thread claims at a time: small enough to balance two threads on a few hundred
# rows, large enough that the claim is negligible.
BLOCK_ROWS = 4

SOURCE_FILE = "aqlm_kernels.cc"  # in jaxquant/ops/_native/

LIBRARY = NativeLibrary(
    "aqlm_kernels",
    SOURCE_FILE,
    {
        TARGET_NAME: "JaxquantAqlmBeamSearchF32",
        NEAREST_TARGET_NAME: "JaxquantKmeansNearestF32",
        LLOYD_TARGET_NAME: "JaxquantKmeansLloydF32",
    },
)


def available() -> bool:
    """Build (once) and register the kernel; False when disabled or it cannot be built."""
    return LIBRARY.available()


def unavailable_reason() -> str | None:
    """Why ``available()`` is False (None when it is True or was not asked yet)."""
    return LIBRARY.unavailable_reason()


def beam_search(inputs: bs.SearchInputs, *, beam_size: int) -> tuple[jax.Array, jax.Array]:
    """Native counterpart of ``beam_search.beam_search`` (same inputs, no chunking).

    Args:
        inputs: the rows, codes, scales, codebooks, ``XᵀX`` and visiting orders.
        beam_size: hypotheses kept per row.

    Returns:
        ``(codes [R, n_ig, M] int32, loss change float32)``.

    Raises:
        NotImplementedError: the kernel could not be built (see ``unavailable_reason``).
    """
    _require()
    w, codes, scales, codebooks, h, group_order, codebook_order = inputs
    rows, og, d_in = w.shape
    num_codebooks, _, _, ig = codebooks.shape
    n_ig = d_in // ig
    codebooks = codebooks.astype(jnp.float32)
    resid = cb.tiles_to_rows(cb.decode_tiles(codes, codebooks)) * scales[:, None, None] - w
    g0 = jnp.einsum("roi,ij->roj", resid, h)  # H symmetric: the rows of (ŵ - w)H
    q = bs.codeword_gram(bs.flat_codebooks(codebooks), bs.diag_blocks(h, ig, og))  # order-independent
    out_types = (
        jax.ShapeDtypeStruct((rows, n_ig, num_codebooks), jnp.int32),
        jax.ShapeDtypeStruct((rows,), jnp.float32),
    )
    new, dloss = jax.ffi.ffi_call(TARGET_NAME, out_types)(
        codes.astype(jnp.int32),
        scales.astype(jnp.float32),
        codebooks,
        h.astype(jnp.float32),
        g0,
        q,
        group_order.astype(jnp.int32),
        codebook_order.astype(jnp.int32),
        beam_size=np.int64(beam_size),
        block_rows=np.int64(BLOCK_ROWS),
    )
    return new, jnp.sum(dloss)


def nearest(points: jax.Array, centroids: jax.Array) -> jax.Array:
    """Native counterpart of ``kmeans.assign_all``: the nearest centroid of every point.

    Exact float32 ranking of ``|c|² - 2 x·c`` (ties to the smaller index), one pass per
    point with the distances kept in registers; nothing ``[n, k]`` is materialised.

    Args:
        points: ``[n, d]`` float32.
        centroids: ``[k, d]`` float32.

    Returns:
        ``[n]`` int32 indices.

    Raises:
        NotImplementedError: the kernel could not be built.
    """
    _require()
    out_type = jax.ShapeDtypeStruct((points.shape[0],), jnp.int32)
    return jax.ffi.ffi_call(NEAREST_TARGET_NAME, out_type)(
        points.astype(jnp.float32), centroids.astype(jnp.float32), block_rows=np.int64(NEAREST_BLOCK_ROWS)
    )


def lloyd(points: jax.Array, init: jax.Array, iters: int) -> tuple[jax.Array, jax.Array]:
    """Native counterpart of ``kmeans.lloyd`` followed by ``kmeans.assign_all``.

    ``iters`` Lloyd iterations from ``init``, then the nearest centroid of every point;
    Hamerly's distance bounds let most points skip the scan once the centroids settle
    (about 10x fewer distances than a full scan per iteration on AQLM's 2x8 init). The
    iterates are those of exact Lloyd up to float rounding in near ties.

    Args:
        points: ``[n, d]`` float32.
        init: ``[k, d]`` initial centroids.
        iters: centroid updates (static, ≥ 0).

    Returns:
        ``(centroids [k, d], nearest [n] int32)``; a centroid that loses all its points
        keeps its position.

    Raises:
        NotImplementedError: the kernel could not be built.
    """
    _require()
    n, d = points.shape
    out_types = (jax.ShapeDtypeStruct(init.shape, jnp.float32), jax.ShapeDtypeStruct((n,), jnp.int32))
    return jax.ffi.ffi_call(LLOYD_TARGET_NAME, out_types)(
        points.astype(jnp.float32), init.astype(jnp.float32), iters=np.int64(iters),
        block_rows=np.int64(NEAREST_BLOCK_ROWS),
    )


def _require() -> None:
    if not available():
        raise NotImplementedError(f"native AQLM kernels unavailable ({unavailable_reason()})")


__all__ = [
    "LLOYD_TARGET_NAME",
    "NEAREST_TARGET_NAME",
    "TARGET_NAME",
    "available",
    "beam_search",
    "lloyd",
    "nearest",
    "unavailable_reason",
]
