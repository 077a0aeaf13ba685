"""Beam search over AQLM codes, scored through ``XᵀX`` with the incremental loss.

Notation (one output group, "row", at a time; all rows run in parallel): ``H = XᵀX``,
``r = w - ŵ`` the residual, ``L = Σ_rows r H rᵀ`` the output error. For input group
``j`` let ``G_j = I_og ⊗ H_jj`` act on a flattened ``og × ig`` tile. With every other
group fixed, the loss as a function of group ``j``'s decoded tile ``y`` is

    L(y) = const + yᵀ G_j y - 2 yᵀ t,    t = (r H)_j + G_j ŷ   (ŷ: current tile).

A tile is ``y = s · c`` with ``c = p + a`` where ``a`` is the codeword being searched
(codebook ``m``) and ``p`` the sum of the hypothesis' other codewords, so the score of
codeword ``k`` is ``s² q_jmk - 2 s a_k·(t - s G_j p) + const(p)`` with the codeword
Gram terms ``q_jmk = a_kᵀ G_j a_k`` computed once per round. Scoring a candidate thus
costs ``O(og·ig)``, never a re-decode of the weight; after a group is settled ``r H``
gets a rank-``ig`` update.

The beam for group ``j`` starts from the current codes; codebooks are visited once in a
random order, each step keeping the ``beam_size`` best (hypothesis, codeword) pairs; the
last step only needs the single best. Selection uses two plain reductions over a leading
candidate axis (min value, then min index attaining it), which XLA:CPU runs far faster
than ``argmin``/``top_k``. A final exact comparison keeps the old codes whenever the
winner is not strictly better, so a round never increases the objective.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


# Inside the search every array is "rows last" ([..., R]): reductions over candidates then
# run along leading axes with the rows as the contiguous, vectorised dimension, and every
# product is a plain 2-D matmul. A tile is flattened in (ig, og) order there, so slices of
# ``H rᵀ`` ([d_in, og, R]) reshape to [D, R] without a transpose.


def diag_blocks(h: jax.Array, in_group_size: int, out_group_size: int) -> jax.Array:
    """``G_j = H_jj ⊗ I_og`` for every input group ``j`` (tiles flattened in (ig, og) order).

    Args:
        h: ``[d_in, d_in]``.
        in_group_size: ``ig``.
        out_group_size: ``og``.

    Returns:
        ``[n_ig, ig*og, ig*og]``.
    """
    d_in = h.shape[0]
    n_ig = d_in // in_group_size
    h4 = h.reshape(n_ig, in_group_size, n_ig, in_group_size)
    blocks = jnp.diagonal(h4, axis1=0, axis2=2).transpose(2, 0, 1)  # [n_ig, ig, ig]
    eye = jnp.eye(out_group_size, dtype=h.dtype)
    kron = blocks[:, :, None, :, None] * eye[None, None, :, None, :]
    d = out_group_size * in_group_size
    return kron.reshape(n_ig, d, d)


def flat_codebooks(codebooks: jax.Array) -> jax.Array:
    """``[M, K, og, ig] -> [M, D, K]``: codewords as columns, tiles in (ig, og) order."""
    m, k, og, ig = codebooks.shape
    return codebooks.transpose(0, 3, 2, 1).reshape(m, ig * og, k)


def codeword_gram(books_t: jax.Array, gblocks: jax.Array) -> jax.Array:
    """``q[j, m, k] = a_mkᵀ G_j a_mk`` for every group, codebook and codeword.

    Args:
        books_t: ``[M, D, K]`` from ``flat_codebooks``.
        gblocks: ``[n_ig, D, D]``.

    Returns:
        ``[n_ig, M, K]``.
    """
    # One group at a time: an [n_ig, M, D, K] temporary would not fit for 2^16 codebooks.
    return jax.lax.map(lambda g: jnp.sum(jnp.einsum("de,mek->mdk", g, books_t) * books_t, axis=1), gblocks)


def smallest(scores: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """The ``n`` smallest entries along axis 0 (ascending; ties to the smallest index).

    Args:
        scores: ``[C, R]`` with ``n <= C``; must not contain NaN.
        n: how many to keep (static).

    Returns:
        ``(values [n, R], indices [n, R] int32)``.
    """
    c = scores.shape[0]
    # Materialise the scores once: XLA may otherwise recompute them inside each fusion
    # with different rounding (e.g. FMA contraction), so ``scores == best`` could fail.
    scores = jax.lax.optimization_barrier(scores)
    iota = jax.lax.broadcasted_iota(jnp.int32, scores.shape, 0)
    vals, idxs = [], []
    for i in range(n):  # n is the beam width: small and static
        best = jnp.min(scores, axis=0)
        idx = jnp.min(jnp.where(scores == best[None, :], iota, jnp.int32(c)), axis=0)
        vals.append(best)
        idxs.append(idx)
        if i + 1 < n:
            scores = jnp.where(iota == idx[None, :], jnp.float32(jnp.inf), scores)
    return jnp.stack(vals), jnp.stack(idxs)


def _column(book_t: jax.Array, idx: jax.Array) -> jax.Array:
    """``book_t[:, idx]`` for in-range indices of any shape: ``[D, *idx.shape]``."""
    return book_t.at[:, idx].get(mode="promise_in_bounds")


def tile_sums(books_t: jax.Array, codes: jax.Array) -> jax.Array:
    """Unscaled tiles ``Σ_m a_m[codes[m]]``: ``[M, D, K], [M, R] -> [D, R]``."""
    out = _column(books_t[0], codes[0])
    for m in range(1, books_t.shape[0]):  # M is small and static
        out = out + _column(books_t[m], codes[m])
    return out


def search_group(
    t: jax.Array,
    s: jax.Array,
    cur_codes: jax.Array,
    cur_sum: jax.Array,
    books_t: jax.Array,
    q_j: jax.Array,
    g_j: jax.Array,
    order: jax.Array,
    beam_size: int,
) -> tuple[jax.Array, jax.Array]:
    """Beam search for one input group over all rows of a chunk.

    Args:
        t: ``[D, R]`` linear term ``(r H)_j + G_j ŷ``.
        s: ``[R]`` scales.
        cur_codes: ``[M, R]`` int32 current codes (the beam's start).
        cur_sum: ``[D, R]`` their unscaled tile.
        books_t: ``[M, D, K]``.
        q_j: ``[M, K]`` codeword Gram terms of this group.
        g_j: ``[D, D]``.
        order: ``[M]`` int32 order in which codebooks are visited.
        beam_size: beam width.

    Returns:
        ``(codes [M, R] int32, their unscaled tile [D, R])`` of the best hypothesis.
    """
    num_codebooks, d, k = books_t.shape
    rows = t.shape[1]
    hyp_codes = cur_codes[None]  # [h, M, R]
    hyp_sum = cur_sum[:, None, :]  # [D, h, R]
    n_hyp = 1
    book_ids = jax.lax.broadcasted_iota(jnp.int32, (1, num_codebooks, 1), 1)
    s2 = s * s
    for step in range(num_codebooks):  # static unroll: the beam width changes after step 0
        m = order[step]
        book_t = books_t[m]  # [D, K]
        p = hyp_sum - _column(book_t, hyp_codes[:, m, :])  # other codewords' sum, [D, h, R]
        pg = (g_j @ p.reshape(d, n_hyp * rows)).reshape(d, n_hyp, rows)
        v = t[:, None, :] - s * pg
        const = s2 * jnp.sum(p * pg, axis=0) - 2.0 * s * jnp.sum(p * t[:, None, :], axis=0)  # [h, R]
        av = (book_t.T @ v.reshape(d, n_hyp * rows)).reshape(k, n_hyp, rows)
        scores = s2 * q_j[m][:, None, None] - 2.0 * s * av + const[None]
        last = step == num_codebooks - 1
        n_keep = 1 if last else min(beam_size, n_hyp * k)
        _, idx = smallest(scores.reshape(k * n_hyp, rows), n_keep)  # candidate = code * h + parent
        code = idx // n_hyp
        if n_hyp > 1:
            parent = idx % n_hyp
            hyp_codes = jnp.take_along_axis(hyp_codes, parent[:, None, :], axis=0)
            p = jnp.take_along_axis(p, parent[None], axis=1)
        hyp_codes = jnp.where(book_ids == m, code[:, None, :], hyp_codes)
        hyp_sum = p + _column(book_t, code)
        n_hyp = n_keep
    return hyp_codes[0], hyp_sum[:, 0, :]


def search_rows(
    rh_t: jax.Array,
    codes_t: jax.Array,
    s: jax.Array,
    books_t: jax.Array,
    h: jax.Array,
    gblocks: jax.Array,
    q: jax.Array,
    group_order: jax.Array,
    codebook_order: jax.Array,
    beam_size: int,
) -> tuple[jax.Array, jax.Array]:
    """One beam-search pass over every input group for a chunk of rows (rows-last layout).

    Args:
        rh_t: ``[d_in, og, R]``, ``H rᵀ`` for the current residual ``r = w - ŵ``.
        codes_t: ``[n_ig, M, R]`` int32 current codes.
        s: ``[R]`` scales.
        books_t: ``[M, D, K]`` from ``flat_codebooks``.
        h: ``[d_in, d_in]``.
        gblocks: ``[n_ig, D, D]`` from ``diag_blocks``.
        q: ``[n_ig, M, K]`` from ``codeword_gram``.
        group_order: ``[n_ig]`` permutation of the input groups.
        codebook_order: ``[n_ig, M]`` codebook visiting order per group.
        beam_size: beam width.

    Returns:
        ``(new codes [n_ig, M, R] int32, loss change of the pass (≤ 0) float32)``.
    """
    d_in, og, rows = rh_t.shape
    n_ig = codes_t.shape[0]
    ig = d_in // n_ig
    d = ig * og

    def body(i: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        codes_t, rh_t, dloss = carry
        j = group_order[i]
        g_j = gblocks[j]
        cur = codes_t[j]  # [M, R]
        cur_sum = tile_sums(books_t, cur)
        rh_j = jax.lax.dynamic_slice_in_dim(rh_t, j * ig, ig, axis=0).reshape(d, rows)
        t = rh_j + s * (g_j @ cur_sum)
        new, new_sum = search_group(t, s, cur, cur_sum, books_t, q[j], g_j, codebook_order[j], beam_size)
        # Exact change of the loss; keep the old codes unless strictly better.
        quad = jnp.sum(new_sum * (g_j @ new_sum), axis=0) - jnp.sum(cur_sum * (g_j @ cur_sum), axis=0)
        gain = s * s * quad - 2.0 * s * jnp.sum((new_sum - cur_sum) * t, axis=0)
        better = gain < 0
        new = jnp.where(better[None], new, cur)
        delta = jnp.where(better[None], (new_sum - cur_sum) * s, 0.0).reshape(ig, og * rows)
        h_rows = jax.lax.dynamic_slice_in_dim(h, j * ig, ig, axis=0)  # [ig, d_in] = H[:, block]ᵀ
        rh_t = rh_t - jnp.einsum("id,ix->dx", h_rows, delta).reshape(d_in, og, rows)
        codes_t = jax.lax.dynamic_update_index_in_dim(codes_t, new, j, axis=0)
        return codes_t, rh_t, dloss + jnp.sum(jnp.where(better, gain, 0.0))

    codes_t, _, dloss = jax.lax.fori_loop(0, n_ig, body, (codes_t, rh_t, jnp.float32(0.0)))
    return codes_t, dloss


def search_orders(rng: np.random.Generator, n_groups: int, num_codebooks: int) -> tuple[np.ndarray, np.ndarray]:
    """Random order of input groups and, per group, of codebooks for one round.

    Drawn on the host: threefry under ``jit`` costs seconds of XLA:CPU compile time.
    """
    group_order = rng.permutation(n_groups).astype(np.int32)
    codebook_order = np.argsort(rng.random((n_groups, num_codebooks)), axis=1).astype(np.int32)
    return group_order, codebook_order


def beam_search(
    w: jax.Array,
    codes: jax.Array,
    scales: jax.Array,
    codebooks: jax.Array,
    h: jax.Array,
    group_order: jax.Array,
    codebook_order: jax.Array,
    *,
    beam_size: int,
    chunk_rows: int,
) -> tuple[jax.Array, jax.Array]:
    """Beam-search pass over all (local) output groups, ``chunk_rows`` at a time.

    Args:
        w: ``[R, og, d_in]`` with ``R`` a multiple of ``chunk_rows``.
        codes: ``[R, n_ig, M]`` int32.
        scales: ``[R]``.
        codebooks: ``[M, K, og, ig]``.
        h: ``[d_in, d_in]``.
        group_order: ``[n_ig]`` int32 permutation (the same for every chunk and device).
        codebook_order: ``[n_ig, M]`` int32.
        beam_size: beam width.
        chunk_rows: rows searched at once.

    Returns:
        ``(codes [R, n_ig, M] int32, loss change float32)``.
    """
    rows, og, d_in = w.shape
    num_codebooks, _, _, ig = codebooks.shape
    n_ig = d_in // ig
    books_t = flat_codebooks(codebooks)
    gblocks = diag_blocks(h, ig, og)
    q = codeword_gram(books_t, gblocks)
    n_chunks = rows // chunk_rows

    def one(args: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        w_c, codes_c, s_c = args
        codes_t = codes_c.transpose(1, 2, 0)
        w_hat = tiles_to_rows_t(books_t, codes_t, og) * s_c  # [d_in, og, R]
        r_t = w_c.transpose(2, 1, 0) - w_hat
        rh_t = (h @ r_t.reshape(d_in, og * chunk_rows)).reshape(d_in, og, chunk_rows)
        new_t, dloss = search_rows(rh_t, codes_t, s_c, books_t, h, gblocks, q, group_order, codebook_order, beam_size)
        return new_t.transpose(2, 0, 1), dloss

    new, dloss = jax.lax.map(
        one,
        (
            w.reshape(n_chunks, chunk_rows, og, d_in),
            codes.reshape(n_chunks, chunk_rows, n_ig, num_codebooks),
            scales.reshape(n_chunks, chunk_rows),
        ),
    )
    return new.reshape(rows, n_ig, num_codebooks), jnp.sum(dloss)


def tiles_to_rows_t(books_t: jax.Array, codes_t: jax.Array, og: int) -> jax.Array:
    """Unscaled decoded weight, rows last: ``[M, D, K], [n_ig, M, R] -> [d_in, og, R]``."""
    n_ig, num_codebooks, rows = codes_t.shape
    d = books_t.shape[1]
    out = _column(books_t[0], codes_t[:, 0, :])  # [D, n_ig, R]
    for m in range(1, num_codebooks):
        out = out + _column(books_t[m], codes_t[:, m, :])
    ig = d // og
    return out.reshape(ig, og, n_ig, rows).transpose(2, 0, 1, 3).reshape(n_ig * ig, og, rows)
