"""Residual k-means initialisation of AQLM codebooks.

Codebook ``m`` is fitted by Lloyd's algorithm on what codebooks ``0..m-1`` left
unexplained (the residual of the scale-normalised weight groups), then every group is
assigned its nearest codeword and the residual shrinks. This gives additive codes a
starting point that beam search and Adam refine.

Nearest-codeword search ranks packed (distance, index) int32 keys with one halving
minimum over a *leading* candidate axis: on XLA:CPU that is several times faster than
``argmin``, which lowers to a variadic reduction.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.methods.aqlm import native_kernels
from jaxquant.methods.aqlm.beam_search import index_bits, min0, pack_keys

# Distance matrices are built this many elements at a time (about 2 MB, cache-sized), so
# memory stays bounded for 2^16-entry codebooks and millions of groups.
_ASSIGN_ELEMENTS = 1 << 19


def nearest(points: jax.Array, centroids: jax.Array) -> jax.Array:
    """Nearest centroid of each point.

    Distances are ranked through packed int32 keys (``beam_search.pack_keys``: the
    distance's order-preserving image with the centroid index in its low bits, ≥ 15
    mantissa bits kept for 2^8 centroids) and one halving min over the centroid axis.

    Args:
        points: ``[n, d]`` float32.
        centroids: ``[k, d]`` float32.

    Returns:
        ``[n]`` int32 indices (near-ties within the kept precision go to the smaller index).
    """
    # ||x - c||² = ||x||² - 2 x·c + ||c||²; the ||x||² term does not change the winner.
    scores = jnp.sum(centroids * centroids, axis=1)[:, None] - 2.0 * (centroids @ points.T)
    bits = index_bits(centroids.shape[0])
    return min0(pack_keys(scores, bits)) & jnp.int32((1 << bits) - 1)


def assign_all(points: jax.Array, centroids: jax.Array) -> jax.Array:
    """``nearest`` over many points, in chunks so the distance matrix stays small.

    Args:
        points: ``[n, d]``.
        centroids: ``[k, d]``.

    Returns:
        ``[n]`` int32 indices.
    """
    n, d = points.shape
    k = centroids.shape[0]
    chunk = max(1, min(n, _ASSIGN_ELEMENTS // k))
    n_chunks = -(-n // chunk)
    padded = jnp.pad(points, ((0, n_chunks * chunk - n), (0, 0)))
    idx = jax.lax.map(lambda p: nearest(p, centroids), padded.reshape(n_chunks, chunk, d))
    return idx.reshape(-1)[:n]


def lloyd(points: jax.Array, init: jax.Array, iters: int, weights: jax.Array | None = None) -> jax.Array:
    """k-means (Lloyd) from the given initial centroids (the XLA reference).

    Args:
        points: ``[n, d]`` float32.
        init: ``[k, d]`` initial centroids.
        iters: Lloyd iterations.
        weights: ``[n]`` non-negative point weights (each centroid moves to the weighted
            mean of its points; the nearest centroid does not depend on them), or None.

    Returns:
        ``[k, d]`` centroids. A centroid whose points all have zero weight (or that has
        none) keeps its position.
    """
    n = points.shape[0]
    k = init.shape[0]
    weights = jnp.ones((n,), points.dtype) if weights is None else weights.astype(points.dtype)

    def step(_: int, c: jax.Array) -> jax.Array:
        idx = assign_all(points, c)
        sums = jax.ops.segment_sum(points * weights[:, None], idx, num_segments=k)
        mass = jax.ops.segment_sum(weights, idx, num_segments=k)
        return jnp.where(mass[:, None] > 0, sums / jnp.where(mass > 0, mass, 1.0)[:, None], c)

    return jax.lax.fori_loop(0, iters, step, init)


def fit(points: jax.Array, init: jax.Array, iters: int, native: bool = False) -> tuple[jax.Array, jax.Array]:
    """``iters`` Lloyd iterations, then every point's nearest centroid.

    Args:
        points: ``[n, d]`` float32.
        init: ``[k, d]`` initial centroids.
        iters: Lloyd iterations.
        native: use ``native_kernels.lloyd`` (exact float32 distances, Hamerly's bounds)
            instead of ``lloyd`` and ``assign_all`` (which rank by packed keys).

    Returns:
        ``(centroids [k, d], nearest [n] int32)``.
    """
    if native:
        return native_kernels.lloyd(points, init, iters)
    centroids = lloyd(points, init, iters)
    return centroids, assign_all(points, centroids)


def host_rng(key: Any) -> np.random.Generator:
    """A numpy generator seeded by a JAX key's bits (typed keys and raw uint32 ``PRNGKey``s)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    words = np.asarray(key)
    if not np.issubdtype(words.dtype, np.integer):
        raise TypeError(f"key must be a JAX PRNG key, got dtype {words.dtype}")
    return np.random.default_rng([int(x) for x in words.astype(np.uint64).ravel()])


def sample_indices(
    rng: np.random.Generator, n: int, num_codebooks: int, codebook_size: int, max_points: int
) -> tuple[np.ndarray | None, np.ndarray]:
    """Host-side random choices for ``residual_kmeans`` (threefry under jit compiles slowly).

    Returns:
        ``(subsets [M, max_points] or None when every point is used, inits [M, K])``;
        ``inits`` index into the (subset of) points, distinct whenever there are enough.
    """
    n_fit = min(n, max_points)
    subsets = None
    if n > max_points:
        subsets = np.stack([rng.choice(n, max_points, replace=False) for _ in range(num_codebooks)])
    if n_fit >= codebook_size:
        inits = np.stack([rng.choice(n_fit, codebook_size, replace=False) for _ in range(num_codebooks)])
    else:  # fewer points than codewords (tiny layers): repeats; the extras stay unused
        inits = rng.integers(0, n_fit, (num_codebooks, codebook_size))
    return (None if subsets is None else subsets.astype(np.int32)), inits.astype(np.int32)


def residual_kmeans(
    groups: jax.Array, subsets: jax.Array | None, inits: jax.Array, iters: int, native: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Fit one codebook per row of ``inits``, each on the running residual.

    Args:
        groups: ``[n, d]`` scale-normalised weight groups (a group is one ``og × ig``
            tile flattened).
        subsets: ``[M, p]`` indices of the groups each codebook is fitted on, or
            ``None`` for all of them; every group is assigned codes either way.
        inits: ``[M, K]`` indices (into the fitted points) of the initial centroids.
        iters: Lloyd iterations per codebook.
        native: use the native k-means kernels (see ``fit``).

    Returns:
        ``(codebooks [M, K, d], codes [n, M] int32)``.
    """
    def fit_one(residual: jax.Array, xs: tuple[jax.Array, jax.Array | None]) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        init, subset = xs
        if subset is None:
            c, idx = fit(residual, residual[init], iters, native)
        else:  # fitted on a sample, then every group is assigned
            c, _ = fit(residual[subset], residual[subset][init], iters, native)
            idx = native_kernels.nearest(residual, c) if native else assign_all(residual, c)
        return residual - c[idx], (c, idx)

    # A scan, not a Python loop over M: each codebook depends on the last, but one traced
    # body serves all of them, so the program compiles once whatever M is.
    _, (codebooks, codes) = jax.lax.scan(fit_one, groups, (inits, subsets))
    return codebooks, codes.T
