"""Re-encoding AQLM tiles toward a dense target: the V step of PV-Tuning and straight-through.

A group is one ``og × ig`` tile with its ``M`` codes. Selected tiles get the codes a beam
search (identity metric) finds from their current codes; ``force`` adds a one-code step
along the target's direction for buffers that move less than one codeword.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxquant.methods.aqlm.beam_search import flat_codebooks, search_group, tile_sums
from jaxquant.methods.reencoding import Reencoder, accept_changes
from jaxquant.qarray import AdditiveQuantized


def group_tiles(w_out_in: jax.Array, og: int, ig: int) -> jax.Array:
    """``(d_out, d_in) -> [n_groups, ig*og]``, group ``o*n_ig + j``, tile in (ig, og) order.

    The order matches ``codes.reshape(n_groups, M)`` and the tiles of
    ``beam_search.flat_codebooks``.
    """
    d_out, d_in = w_out_in.shape
    n_og, n_ig = d_out // og, d_in // ig
    return w_out_in.reshape(n_og, og, n_ig, ig).transpose(0, 2, 3, 1).reshape(n_og * n_ig, ig * og)



# Groups searched at once. XLA:CPU's search slows superlinearly with the number of
# columns (its [K, columns] score passes fall out of cache): one 768x256 layer's 24576
# groups took 0.95 s in one piece and take tens of ms in chunks of 1024.
SEARCH_CHUNK = 1024


def _in_chunks(fn: Callable[..., tuple[jax.Array, ...]], *cols: jax.Array) -> tuple[jax.Array, ...]:
    """``fn(*cols)`` over column arrays ``[..., k]`` (scales ``[k]``: padded with 1), run
    ``SEARCH_CHUNK`` columns at a time; ``fn`` returns a tuple of ``[..., k]`` arrays."""
    k = cols[0].shape[-1]
    if k <= SEARCH_CHUNK:
        return fn(*cols)
    n = -(-k // SEARCH_CHUNK)

    def chunks(x: jax.Array) -> jax.Array:
        """``[..., k] -> [n, ..., SEARCH_CHUNK]``; the padded columns are searched on their
        own (columns never interact) and dropped below."""
        fill = 1.0 if x.ndim == 1 else 0  # a padded scale of 1 keeps the padding finite
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n * SEARCH_CHUNK - k)], constant_values=fill)
        return jnp.moveaxis(x.reshape(*x.shape[:-1], n, SEARCH_CHUNK), -2, 0)

    def unchunk(x: jax.Array) -> jax.Array:
        return jnp.moveaxis(x, 0, -2).reshape(*x.shape[1:-1], -1)[..., :k]

    outs = jax.lax.map(lambda args: fn(*args), tuple(chunks(x) for x in cols))
    return tuple(unchunk(x) for x in outs)


def _search_in_chunks(
    t: jax.Array, s: jax.Array, cur: jax.Array, cur_sum: jax.Array, books_t: jax.Array, beam_size: int
) -> tuple[jax.Array, jax.Array]:
    """``search_group`` with the identity metric over ``[D, k]`` targets, starting from the
    codes ``cur`` ``[M, k]`` and their tiles ``cur_sum`` ``[D, k]``, ``SEARCH_CHUNK`` columns
    at a time: ``(codes [M, k], unscaled tiles [D, k])``."""
    m, d, _ = books_t.shape
    q_terms = jnp.sum(books_t * books_t, axis=1)  # [M, K]: ‖a‖², the Gram terms for G = I
    eye = jnp.eye(d, dtype=jnp.float32)
    order = jnp.arange(m, dtype=jnp.int32)

    def search(t: jax.Array, s: jax.Array, cur: jax.Array, cur_sum: jax.Array) -> tuple[jax.Array, jax.Array]:
        return search_group(t, s, cur, cur_sum, books_t, q_terms, eye, order, beam_size)

    return _in_chunks(search, t, s, cur, cur_sum)


def _directional_move(
    t: jax.Array, s: jax.Array, cur: jax.Array, cur_sum: jax.Array, books_t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The closest tile to ``t`` that differs from the current one in exactly one code and
    moves along ``t``'s direction: over every codebook ``j`` and codeword ``a ≠ cur[j]``
    with ``⟨s·(a - cur_j), t - s·cur_sum⟩ > 0``, the one minimising ``‖s·tile - t‖²``.

    Args:
        t: ``[D, k]`` targets; s: ``[k]`` scales.
        cur: ``[M, k]`` int32 current codes; cur_sum: ``[D, k]`` their unscaled tiles.
        books_t: ``[M, D, K]``.

    Returns:
        ``(codes [M, k], unscaled tiles [D, k], found [k])``; where no codeword points along
        the direction (``found`` false) the current codes are returned.
    """
    direction = t - s * cur_sum
    best_err = jnp.full(t.shape[1:], jnp.inf, jnp.float32)
    codes, tiles = cur, cur_sum
    for j in range(books_t.shape[0]):  # M is small and static
        book = books_t[j]  # [D, K]
        rest = cur_sum - book[:, cur[j]]
        resid = t - s * rest  # what codebook j must supply, scaled
        along = book.T @ direction  # [K, k]: ⟨a, direction⟩ for every codeword
        # Strictly positive: the current codeword's own difference is exactly 0 (the same
        # entry of `along`), so it is never a candidate.
        ok = s * (along - jnp.take_along_axis(along, cur[j][None], axis=0)) > 0
        err = s**2 * jnp.sum(book * book, axis=0)[:, None] - 2 * s * (book.T @ resid) + jnp.sum(resid**2, axis=0)
        err = jnp.where(ok, err, jnp.inf)
        a = jnp.argmin(err, axis=0).astype(jnp.int32)
        e = jnp.min(err, axis=0)
        better = e < best_err
        codes = jnp.where(better[None], cur.at[j].set(a), codes)
        tiles = jnp.where(better[None], rest + book[:, a], tiles)
        best_err = jnp.minimum(e, best_err)
    return codes, tiles, jnp.isfinite(best_err)


class _AdditiveCandidates(NamedTuple):
    """The searched re-encodings of selected AQLM tiles (``[.., k]`` columns)."""

    t: jax.Array  # [D, k] targets
    s: jax.Array  # [k] scales
    cur: jax.Array  # [M, k] current codes
    cur_sum: jax.Array  # [D, k] their unscaled tiles
    new: jax.Array  # [M, k] searched codes
    new_sum: jax.Array  # [D, k] their unscaled tiles
    books_t: jax.Array  # [M, D, K]

    def err(self, tiles: jax.Array) -> jax.Array:
        """``[k]`` squared error of unscaled ``tiles`` to the targets."""
        return jnp.sum((self.s * tiles - self.t) ** 2, axis=0)


def _additive_candidates(q: AdditiveQuantized, target: jax.Array, idx: jax.Array, *, beam_size: int
                         ) -> _AdditiveCandidates:
    """Search new codes for the tiles ``idx`` of ``q`` toward ``target`` (see ``reencode_additive``)."""
    m, k_book, og, ig = q.codebooks.shape
    n_ig = q.d_in // ig
    books_t = flat_codebooks(q.codebooks.astype(jnp.float32))  # [M, D, K]
    t = group_tiles(target.astype(jnp.float32), og, ig)[idx].T  # [D, k]
    s = q.scales.astype(jnp.float32).reshape(-1)[idx // n_ig]  # [k]
    cur = q.codes.reshape(-1, m)[idx].T.astype(jnp.int32)  # [M, k]
    cur_sum = tile_sums(books_t, cur)
    new, new_sum = _search_in_chunks(t, s, cur, cur_sum, books_t, min(beam_size, k_book))
    return _AdditiveCandidates(t, s, cur, cur_sum, new, new_sum, books_t)


def reencode_additive(
    q: AdditiveQuantized,
    target: jax.Array,
    idx: jax.Array,
    *,
    beam_size: int,
    trust_ratio: float | None = None,
    force: bool = False,
) -> AdditiveQuantized:
    """Re-encode the groups ``idx`` of ``q`` toward ``target`` by beam search.

    Each selected tile gets the codes minimising ``‖s·Σ_m a_m - target_tile‖²`` found by
    a beam search that starts from its current codes (``beam_search.search_group`` with
    an identity metric); a tile keeps its old codes unless the new ones are strictly
    better, and ``trust_ratio`` bounds the layer's total change (see the module doc).

    With ``force`` every selected tile moves unless no codeword points its way: it takes
    the closer to ``target`` of the beam search's result (when that changed the tile along
    ``target - Ŵ``) and ``_directional_move``'s one-code step, even when the old codes are
    closer. A small buffer step then still changes codes, as in the paper's linearized V
    step (buffers reset each step), where the nearest codes are almost always the old ones.

    Args:
        q: the quantized array (its current codebooks and scales are used).
        target: ``(d_out, d_in)`` float32 dense target in storage layout.
        idx: ``[k]`` int32 distinct group indices (``o_group * n_in_groups + in_group``).
        beam_size: beam width.
        trust_ratio: optional bound on ``‖ΔŴ‖_F / ‖Ŵ‖_F``.
        force: move every selected tile along ``target - Ŵ``.

    Returns:
        ``q`` with new codes for (a subset of) the groups ``idx``.
    """
    m = q.codebooks.shape[0]
    codes_flat = q.codes.reshape(-1, m)
    c = _additive_candidates(q, target, idx, beam_size=beam_size)
    t, s, cur, cur_sum, new, new_sum, books_t = c.t, c.s, c.cur, c.cur_sum, c.new, c.new_sum, c.books_t
    err = c.err
    err_new, err_cur = err(new_sum), err(cur_sum)
    if force:
        moved = jnp.any(new != cur, axis=0) & (jnp.sum(s * (new_sum - cur_sum) * (t - s * cur_sum), axis=0) > 0)
        step, step_sum, found = _in_chunks(lambda *a: _directional_move(*a, books_t), t, s, cur, cur_sum)
        use_step = found & ~(moved & (err_new <= err(step_sum)))
        new = jnp.where(use_step[None], step, new)
        new_sum = jnp.where(use_step[None], step_sum, new_sum)
        candidate = moved | found
    else:
        candidate = err_new < err_cur
    delta_sq = jnp.sum((s * (new_sum - cur_sum)) ** 2, axis=0)
    w_sq = jnp.sum(q.decode_out_in(jnp.float32) ** 2)
    keep = accept_changes(candidate, delta_sq, w_sq, trust_ratio)
    chosen = jnp.where(keep[None], new, cur).T.astype(q.codes.dtype)
    codes = codes_flat.at[idx].set(chosen, unique_indices=True).reshape(q.codes.shape)
    return dataclasses.replace(q, codes=codes)


def num_groups_additive(q: AdditiveQuantized) -> int:
    """Tiles of ``q``: ``(d_out / og) · (d_in / ig)``."""
    return (q.d_out // q.out_group_size) * (q.d_in // q.in_group_size)


def group_sums_additive(q: AdditiveQuantized, per_weight: jax.Array) -> jax.Array:
    """A ``(d_out, d_in)`` per-weight quantity summed over each tile: ``[n_groups]``."""
    return jnp.sum(group_tiles(per_weight, q.out_group_size, q.in_group_size), axis=1)


REENCODER = Reencoder(
    num_groups=num_groups_additive,
    group_sums=group_sums_additive,
    reencode=reencode_additive,
)
