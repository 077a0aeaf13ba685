"""Beam search over AQLM codes, scored through ``XᵀX`` with the incremental loss.

Notation (one output group, "row", at a time; all rows of a chunk run in parallel):
``H = XᵀX``, ``ŵ`` the decoded row, ``g = (ŵ - w) H`` and ``L = (ŵ - w) H (ŵ - w)ᵀ``.
Changing input group ``j``'s tile by ``Δ`` (everything else fixed) changes the loss by

    ΔL = 2 Δ·g_j + Δᵀ G_j Δ,        G_j = H_jj ⊗ I_og,

so a candidate is scored in ``O(og·ig)`` from ``g_j`` (never re-decoding the weight),
and once a tile changes ``g`` gets a rank-``ig`` update from ``ig`` rows of ``H``.

``search_rows`` is the reference's full-row beam (Egiazarian et al., 2024): it keeps
``beam_size`` whole-row hypotheses (codes, ``g``, loss) across every input group of the
row. For each group in turn (random order), for each codebook in turn (random order per
group), every hypothesis is extended by every codeword of that (group, codebook) slot and
the ``beam_size`` best (hypothesis, codeword) pairs survive. Within a group only the
group's slice of ``g`` is kept per hypothesis (its update is ``G_j Δ``); the full ``g``
of the survivors is formed once per group from their ancestors at the group's start.
With ``beam_size = 1`` this is greedy coordinate descent over (group, codebook) slots.
At the end each row keeps the best hypothesis if it beats its starting codes, so a pass
never increases the objective.

Selection avoids ``argmin``/``top_k``/sorts over the candidate axis (slow on XLA:CPU):
each candidate's score is packed with its index into one int32 key (the score's
order-preserving integer image with its low bits replaced by the index), and the ``n``
best come from ``n`` plain min-reductions along the leading candidate axis (the ``i``-th
takes the minimum over keys above the ``(i-1)``-th). Scores keep ``23 - index bits`` ≥ 11
mantissa bits for ranking; the selected candidates' losses are then recomputed exactly.
Large codebooks (2^16) are scanned in blocks with the running best carried, so memory
stays bounded.

``search_group`` (a beam confined to one group, with an arbitrary metric) is what
PV-Tuning's V step uses to re-encode single groups.
"""

from __future__ import annotations

from typing import NamedTuple

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


# Packed selection keys keep at most this many index bits, so scores keep ≥ 11 mantissa
# bits for ranking; codebooks with more candidates are scanned in blocks.
_KEY_INDEX_BITS = 12
_INT32_MAX = np.iinfo(np.int32).max


def _sortable(x: jax.Array) -> jax.Array:
    """Order-preserving map float32 -> int32 (``a < b`` iff ``f(a) < f(b)``; no NaN)."""
    i = jax.lax.bitcast_convert_type(x, jnp.int32)
    return i ^ ((i >> 31) & jnp.int32(0x7FFFFFFF))


def _unsortable(i: jax.Array) -> jax.Array:
    """Inverse of ``_sortable``."""
    return jax.lax.bitcast_convert_type(i ^ ((i >> 31) & jnp.int32(0x7FFFFFFF)), jnp.float32)


def index_bits(n: int) -> int:
    """Bits needed to number ``n`` candidates."""
    return max(1, (n - 1).bit_length())


def pack_keys(scores: jax.Array, bits: int) -> jax.Array:
    """Keys that order candidates by score, ties to the smaller index along axis 0.

    Args:
        scores: ``[C, R]`` float32 without NaN, ``C <= 2**bits``.
        bits: index bits (static).

    Returns:
        ``[C, R]`` int32 keys, unique within each column.
    """
    iota = jax.lax.broadcasted_iota(jnp.int32, scores.shape, 0)
    return (_sortable(scores) & jnp.int32(~((1 << bits) - 1))) | iota


def min0(x: jax.Array) -> jax.Array:
    """``min`` over axis 0 as a halving chain of elementwise minima.

    XLA:CPU fuses the chain into one vectorised loop over the trailing axes; its
    ``reduce`` along a leading axis runs about 3× slower.
    """
    n = x.shape[0]
    size = 1 << (n - 1).bit_length()
    if size != n:  # pad to a power of two with the identity of min
        fill = jnp.iinfo(x.dtype).max if jnp.issubdtype(x.dtype, jnp.integer) else jnp.inf
        x = jnp.concatenate([x, jnp.full((size - n, *x.shape[1:]), fill, x.dtype)])
    while x.shape[0] > 1:
        half = x.shape[0] // 2
        x = jnp.minimum(x[:half], x[half:])
    return x[0]


def _passes(keys: jax.Array, n: int) -> jax.Array:
    """``n`` smallest of unique keys along axis 0 by ``n`` min-reductions, ascending."""
    keys = jax.lax.optimization_barrier(keys)  # every pass must read the same keys
    out = [jnp.min(keys, axis=0)]
    for _ in range(1, n):  # n is the beam width: small and static
        out.append(jnp.min(jnp.where(keys > out[-1][None, :], keys, jnp.int32(_INT32_MAX)), axis=0))
    return jnp.stack(out)


_BLOCK = 16


def smallest_keys(keys: jax.Array, n: int, bits: int) -> jax.Array:
    """The ``n`` smallest of unique packed keys along axis 0, ascending: ``[C, R] -> [n, R]``.

    ``n = 1`` is one ``min0``. Otherwise the candidates are cut into blocks of 16: the
    ``n`` best blocks by their minimum hold the ``n`` best candidates (at most ``n``
    blocks have a minimum at or below the ``n``-th best key), so ``n`` passes over the
    block minima and ``n`` over those blocks' members replace ``n`` passes over all
    candidates. XLA:CPU runs ``top_k``/``argmin`` over the candidate axis far slower.

    Args:
        keys: ``[C, R]`` int32 from ``pack_keys`` (the low ``bits`` bits are the index).
        n: how many to keep (static, ``<= C``).
        bits: index bits of the keys (static).
    """
    c, rows = keys.shape
    if n == 1:
        return min0(keys)[None]
    keys = jax.lax.optimization_barrier(keys)  # read twice below: materialise once
    if c < 4 * n * _BLOCK:
        return _passes(keys, n)
    n_blocks = -(-c // _BLOCK)
    if n_blocks * _BLOCK != c:
        keys = jnp.concatenate([keys, jnp.full((n_blocks * _BLOCK - c, rows), _INT32_MAX, jnp.int32)])
    blocks = keys.reshape(n_blocks, _BLOCK, rows)
    best_blocks = _passes(jnp.min(blocks, axis=1), n)  # their keys name their best member
    which = (best_blocks & jnp.int32((1 << bits) - 1)) // _BLOCK  # [n, R]
    members = jnp.take_along_axis(blocks, which[:, None, :], axis=0, mode="promise_in_bounds")
    return _passes(members.reshape(n * _BLOCK, rows), n)


def _pick(x: jax.Array, parent: jax.Array) -> jax.Array:
    """``x[..., parent[b, r], r]`` for ``x [..., B, R]`` and ``parent [B2, R]`` -> ``[..., B2, R]``.

    A chain of selects (B is small) instead of a gather: it fuses into one loop.
    """
    n = x.shape[-2]
    if n == 1:
        return jnp.broadcast_to(x, (*x.shape[:-2], parent.shape[0], x.shape[-1]))
    out = x[..., :1, :]
    for b in range(1, n):
        out = jnp.where(parent == b, x[..., b : b + 1, :], out)
    return out


def codeword_block(codebook_size: int, beam_size: int) -> int:
    """Codewords scored at once: all of them when ``K · beam`` fits the key's index bits,
    else the largest power of two that leaves room for the carried beam."""
    if codebook_size * beam_size <= 1 << _KEY_INDEX_BITS:
        return codebook_size
    block = 1
    while (2 * block + 1) * beam_size <= 1 << _KEY_INDEX_BITS and 2 * block <= codebook_size:
        block *= 2
    return block


def _best_extensions(
    book_t: jax.Array, q_m: jax.Array, v: jax.Array, base: jax.Array, s: jax.Array, beam_size: int, block: int
) -> tuple[jax.Array, jax.Array]:
    """The ``beam_size`` best (codeword, hypothesis) pairs of one (group, codebook) slot.

    The score of codeword ``k`` for hypothesis ``b`` is ``base_b + s² q_k + 2 s a_k·v_b``.

    Args:
        book_t: ``[D, K]`` codewords as columns.
        q_m: ``[K]`` codeword Gram terms ``a_kᵀ G_j a_k``.
        v: ``[D, B, R]``.
        base: ``[B, R]`` (``+inf`` for empty hypotheses).
        s: ``[R]`` scales.
        beam_size: survivors kept (static).
        block: codewords scored at once (static, divides ``K``).

    Returns:
        ``(codes [beam_size, R] int32, parents [beam_size, R] int32)``, best first.
    """
    d, k = book_t.shape
    n_hyp, rows = base.shape
    vv = v.reshape(d, n_hyp * rows)

    def scores(book_blk: jax.Array, q_blk: jax.Array) -> jax.Array:
        av = (book_blk.T @ vv).reshape(-1, n_hyp, rows)
        out = (s * s) * q_blk[:, None, None] + (2.0 * s) * av + base[None]
        return out.reshape(-1, rows)  # candidate c = code * B + parent

    if block == k:
        bits = index_bits(k * n_hyp)
        c = smallest_keys(pack_keys(scores(book_t, q_m), bits), beam_size, bits) & jnp.int32((1 << bits) - 1)
        return c // n_hyp, c % n_hyp

    n_cand = block * n_hyp
    bits = index_bits(n_cand + beam_size)
    low = jnp.int32((1 << bits) - 1)

    def step(i: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        best, codes, parents = carry  # best: [beam, R] approximate scores of the carried survivors
        book_blk = jax.lax.dynamic_slice_in_dim(book_t, i * block, block, axis=1)
        q_blk = jax.lax.dynamic_slice_in_dim(q_m, i * block, block)
        both = jnp.concatenate([scores(book_blk, q_blk), best])  # carried survivors are candidates n_cand + slot
        keys = smallest_keys(pack_keys(both, bits), beam_size, bits)
        c = keys & low
        from_carry = c >= n_cand
        slot = jnp.clip(c - n_cand, 0, beam_size - 1)
        new_codes = jnp.where(from_carry, _pick(codes, slot), i * block + c // n_hyp)
        new_parents = jnp.where(from_carry, _pick(parents, slot), c % n_hyp)
        return _unsortable(keys & ~low), new_codes, new_parents

    zeros = jnp.zeros((beam_size, rows), jnp.int32)
    init = (jnp.full((beam_size, rows), jnp.inf, jnp.float32), zeros, zeros)
    _, codes, parents = jax.lax.fori_loop(0, k // block, step, init)
    return codes, parents


def search_rows(
    w_t: jax.Array,
    codes_t: jax.Array,
    s: jax.Array,
    books_t: jax.Array,
    h: jax.Array,
    gblocks: jax.Array,
    q: jax.Array,
    group_order: jax.Array,
    codebook_order: jax.Array,
    beam_size: int,
    block: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One full-row beam-search pass over every input group for a chunk of rows (rows last).

    Args:
        w_t: ``[d_in, og, R]`` the weight's output groups, rows last.
        codes_t: ``[n_ig, M, R]`` int32 current codes (the beam's start).
        s: ``[R]`` scales.
        books_t: ``[M, D, K]`` from ``flat_codebooks``.
        h: ``[d_in, d_in]``.
        gblocks: ``[n_ig, D, D]`` from ``diag_blocks``.
        q: ``[n_ig, M, K]`` from ``codeword_gram``.
        group_order: ``[n_ig]`` permutation of the input groups.
        codebook_order: ``[n_ig, M]`` codebook visiting order per group.
        beam_size: hypotheses kept per row.
        block: codewords scored at once (default ``codeword_block``).

    Returns:
        ``(new codes [n_ig, M, R] int32, loss change of the pass (≤ 0) float32)``.
    """
    d_in, og, rows = w_t.shape
    n_ig, num_codebooks, _ = codes_t.shape
    ig = d_in // n_ig
    d = ig * og
    k = books_t.shape[2]
    nb = beam_size
    block = codeword_block(k, nb) if block is None else block
    s2 = s * s

    resid = tiles_to_rows_t(books_t, codes_t, og) * s - w_t  # [d_in, og, R]
    g0 = (h @ resid.reshape(d_in, og * rows)).reshape(d_in * og, 1, rows)  # H symmetric: rows of (ŵ-w)H
    hyp = jax.lax.broadcasted_iota(jnp.int32, (nb, rows), 0)
    # Hypothesis 0 is the current code; the others start empty (+inf) and fill at step 1.
    loss = jnp.where(hyp == 0, jnp.float32(0.0), jnp.float32(jnp.inf))  # change w.r.t. the start
    book_ids = jax.lax.broadcasted_iota(jnp.int32, (num_codebooks, 1, 1), 0)

    def group(i: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        codes, g, loss = carry  # [n_ig, M, B, R], [d_in*og, B, R], [B, R]
        j = group_order[i]
        g_j = gblocks[j]
        cur = codes[j]  # [M, B, R]
        t = tile_sums(books_t, cur)  # [D, B, R]
        t_start = t
        gj = jax.lax.dynamic_slice_in_dim(g, j * d, d, axis=0)  # [D, B, R]
        root = hyp  # each survivor's ancestor at the group's start
        for step in range(num_codebooks):  # M is small and static
            m = codebook_order[j, step]
            book_t = books_t[m]
            a_old = _column(book_t, cur[m])  # [D, B, R]
            ga = (g_j @ a_old.reshape(d, nb * rows)).reshape(d, nb, rows)
            v = gj - s * ga
            base = loss - 2.0 * s * jnp.sum(a_old * gj, axis=0) + s2 * jnp.sum(a_old * ga, axis=0)
            code, parent = _best_extensions(book_t, q[j, m], v, base, s, nb, block)
            if nb > 1:
                cur, t, gj, root = (_pick(x, parent) for x in (cur, t, gj, root))
                a_old, v, base = _pick(a_old, parent), _pick(v, parent), _pick(base, parent)
            a_new = _column(book_t, code)
            # Exact loss of each survivor (the keys only ranked them).
            loss = base + s2 * q[j, m].at[code].get(mode="promise_in_bounds") + 2.0 * s * jnp.sum(a_new * v, axis=0)
            delta = a_new - a_old
            t = t + delta
            gj = gj + s * (g_j @ delta.reshape(d, nb * rows)).reshape(d, nb, rows)
            cur = jnp.where(book_ids == m, code[None], cur)
        # The survivors' full g: their ancestors' plus the rank-ig update of this group.
        dt = (t - _pick(t_start, root)) * s  # [D, B, R] = [ig, og, B, R]
        h_rows = jax.lax.dynamic_slice_in_dim(h, j * ig, ig, axis=0)  # [ig, d_in] = H[:, block]ᵀ
        g = _pick(g, root) + (h_rows.T @ dt.reshape(ig, og * nb * rows)).reshape(d_in * og, nb, rows)
        codes = jax.lax.dynamic_update_index_in_dim(_pick(codes, root), cur, j, axis=0)
        return codes, g, loss

    # The first group widens the beam from 1 to B hypotheses; the loop body needs a fixed
    # width, so the start is broadcast (the +inf losses keep the copies out of the beam).
    codes = jnp.broadcast_to(codes_t[:, :, None, :], (n_ig, num_codebooks, nb, rows))
    g = jnp.broadcast_to(g0, (d_in * og, nb, rows))
    codes, _, loss = jax.lax.fori_loop(0, n_ig, group, (codes, g, loss))
    best = jnp.min(loss, axis=0)
    which = jnp.min(jnp.where(loss == best[None], hyp, jnp.int32(nb)), axis=0)
    better = best < 0
    new = jnp.where(better[None, None], _pick(codes, which[None])[:, :, 0, :], codes_t)
    return new, jnp.sum(jnp.where(better, best, jnp.float32(0.0)))


class SearchInputs(NamedTuple):
    """What one beam-search pass reads; the XLA and the native search take the same.

    Attributes:
        w: ``[R, og, d_in]`` float32 target rows.
        codes: ``[R, n_ig, M]`` int32 in ``[0, K)``, the codes the search starts from.
        scales: ``[R]`` per-row scales.
        codebooks: ``[M, K, og, ig]``.
        h: ``[d_in, d_in]`` symmetric ``XᵀX``.
        group_order: ``[n_ig]`` int32 permutation: the order input groups are visited in
            (the same for every chunk and device).
        codebook_order: ``[n_ig, M]`` int32: per group, the order of its codebooks.
    """

    w: jax.Array
    codes: jax.Array
    scales: jax.Array
    codebooks: jax.Array
    h: jax.Array
    group_order: jax.Array
    codebook_order: jax.Array


def beam_search(
    inputs: SearchInputs,
    *,
    beam_size: int,
    chunk_rows: int,
    block: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Beam-search pass over all (local) output groups, ``chunk_rows`` at a time.

    Args:
        inputs: the rows (``R`` a multiple of ``chunk_rows``), codes, scales, codebooks,
            ``XᵀX`` and visiting orders.
        beam_size: hypotheses kept per row.
        chunk_rows: rows searched at once.
        block: codewords scored at once (default ``codeword_block``).

    Returns:
        ``(codes [R, n_ig, M] int32, loss change float32)``.
    """
    w, codes, scales, codebooks, h, group_order, codebook_order = inputs
    rows, og, d_in = w.shape
    num_codebooks, _, _, ig = codebooks.shape
    n_ig = d_in // ig
    books_t = flat_codebooks(codebooks)
    gblocks = diag_blocks(h, ig, og)
    q = codeword_gram(books_t, gblocks)
    n_chunks = rows // chunk_rows

    def one(args: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        w_c, codes_c, s_c = args
        new_t, dloss = search_rows(
            w_c.transpose(2, 1, 0), codes_c.transpose(1, 2, 0), s_c, books_t, h, gblocks, q,
            group_order, codebook_order, beam_size, block,
        )
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


def search_orders(rng: np.random.Generator, n_groups: int, num_codebooks: int) -> tuple[np.ndarray, np.ndarray]:
    """Random order of input groups and, per group, of codebooks for one round.

    Drawn on the host: threefry under ``jit`` costs seconds of XLA:CPU compile time.
    """
    group_order = rng.permutation(n_groups).astype(np.int32)
    codebook_order = np.argsort(rng.random((n_groups, num_codebooks)), axis=1).astype(np.int32)
    return group_order, codebook_order


def tiles_to_rows_t(books_t: jax.Array, codes_t: jax.Array, og: int) -> jax.Array:
    """Unscaled decoded weight, rows last: ``[M, D, K], [n_ig, M, R] -> [d_in, og, R]``."""
    n_ig, num_codebooks, rows = codes_t.shape
    d = books_t.shape[1]
    out = _column(books_t[0], codes_t[:, 0, :])  # [D, n_ig, R]
    for m in range(1, num_codebooks):
        out = out + _column(books_t[m], codes_t[:, m, :])
    ig = d // og
    return out.reshape(ig, og, n_ig, rows).transpose(2, 0, 1, 3).reshape(n_ig * ig, og, rows)
