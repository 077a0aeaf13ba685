"""GPTQ (Frantar et al., 2023) as one jit-compiled blocked column loop.

Columns of ``W`` are rounded one at a time; the rounding error of each column is
spread over the columns not yet rounded through the upper Cholesky factor ``U`` of
``H⁻¹`` (``H = XᵀX + λI``), which minimises the layer's output error given the choices
made so far. The loop is the "lazy batch" form, on two levels: the rank-1 updates
touch only a 16-column sub-block (cache-resident); the rest of the ``B``-column block
receives each sub-block's errors as one matmul; and each block starts from a
left-looking update built from the finished blocks' errors (matmuls). Everything runs
under ``jax.jit`` with ``lax.fori_loop`` over blocks and columns, so one compiled
program serves every call with the same shapes and recipe.

Conventions (the reference implementation's):
- Dead inputs (``diag(H) == 0``: the input never fires) get ``H[i, i] = 1`` and their
  weight column is zeroed, since it cannot affect the output.
- Damping ``λ = damp · mean(diag(H))``.
- ``act_order`` processes columns by decreasing ``diag(H)``. With groups, the grids are
  then fitted up front on the original ``W`` ("static groups") so that groups stay
  contiguous in the stored layout. Without ``act_order``, each group's grid is fitted
  when the loop reaches the group's first column, on the error-updated weights (the
  reference behaviour); the block size is rounded to a multiple of the group size so
  a group never straddles two blocks. Per-row grids (``group_size=None``) are always
  fitted up front.

A damped ``XᵀX`` that is still not positive definite (only possible for statistics that
are not a Gram matrix, or overflow) raises a ``ValueError`` naming the leaf path; no
silent retry.

``H⁻¹`` is never formed. One Cholesky factorisation of the index-reversed ``H``,
``P H P = L Lᵀ`` (``P`` reverses indices), gives ``H = V Vᵀ`` with ``V = P L P`` upper
triangular, and ``U = V⁻¹`` is exactly the reference's upper Cholesky factor of
``H⁻¹``. Since ``W − Q = E U`` (``E`` the scaled column errors), block ``b`` starts from
``W_b + (W − Q)_{<b} V_{<b,b} U_bb``: it needs ``V`` and the small diagonal blocks
``U_bb = V_bb⁻¹`` only. This replaces the reference's Cholesky + inverse + Cholesky
(about ``7n³/3`` flops for ``n = d_in``) by one Cholesky (``n³/3``), and the block
updates touch only the triangle (``d_out · n²`` flops in all).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.methods import _grid
from jaxquant.qarray import ScalarQuantized
from jaxquant.recipes import GPTQ


def hessian_factor(h: jax.Array) -> jax.Array:
    """Upper-triangular ``V`` with ``V Vᵀ = h`` (NaN when ``h`` is not positive definite).

    ``V = P L P`` for the Cholesky factor ``L`` of the index-reversed ``P h P``; then
    ``U = V⁻¹`` is GPTQ's upper Cholesky factor of ``h⁻¹`` (``UᵀU = h⁻¹``).
    """
    return jnp.linalg.cholesky(h[::-1, ::-1])[::-1, ::-1]


def effective_block_size(block_size: int, group_size: int, d_in: int, dynamic_groups: bool) -> int:
    """Block size actually used: a multiple of the group size when groups are fitted in-loop."""
    if dynamic_groups:
        return group_size * max(1, block_size // group_size)
    return max(1, min(block_size, d_in))


# Rows per inner sub-block of the column loop: its rank-1 updates stay in cache.
_SUB_BLOCK = 16

_STATIC_ARGNAMES = (
    "group_size", "symmetric", "act_order", "block_size", "clip_search", "param_dtype", "group_grid",
    "find_outliers", "column_rounder",
)


@dataclasses.dataclass(frozen=True)
class MinMaxGrid:
    """GPTQ's group grid: min/max (or clipped) per row of the group, in ``param_dtype``.

    A group grid is called with the group's error-updated weights ``[g, d_out]`` (one row
    per input column), the matching diagonal of ``U`` (``[g]``), the outlier threshold and
    the (traced) code width, and returns ``(scale, zero, record)``: the grid every row's
    codes are rounded on, and what the method stores for the group (any pytree of
    ``[d_out, ...]`` arrays). It is a static argument of the compiled loop, so it is a
    frozen (hashable) dataclass.
    """

    symmetric: bool
    param_dtype: str
    clip_search: bool

    def fit(self, groups: jax.Array, bits: Any) -> tuple[jax.Array, jax.Array]:
        """``(scale, zero)`` of every row of ``groups [..., g]``."""
        return _grid.fit_grid(groups, bits, symmetric=self.symmetric, param_dtype=self.param_dtype,
                              clip_search=self.clip_search)

    def __call__(self, rows: jax.Array, u_diag: jax.Array, threshold: jax.Array, bits: Any) -> tuple[Any, ...]:
        del u_diag, threshold
        s, z = self.fit(rows.T, bits)
        return s, z, (s, z)


def _scalar_rounding(bits: Any, params: Any) -> Any:
    """Rounding of a column on the scalar grid ``params(column) -> (scale, zero)``."""

    def round_column(x: jax.Array, column: jax.Array) -> tuple[jax.Array, jax.Array]:
        s, z = params(column)
        code = _grid.quantize_codes(x, s, z, bits)
        return code, _grid.dequantize_codes(code, s, z)

    return round_column


def _gptq_impl(
    w: jax.Array,
    h: jax.Array,
    damp: jax.Array,
    bits: jax.Array,
    outlier_relative: jax.Array | None = None,
    rounder_params: Any = None,
    *,
    group_size: int,
    symmetric: bool,
    act_order: bool,
    block_size: int,
    clip_search: bool,
    param_dtype: str,
    group_grid: Any = None,
    find_outliers: bool = False,
    column_rounder: Any = None,
) -> tuple[Any, ...]:
    """Core GPTQ. Returns ``(codes, records, outlier_deltas, ok)``.

    ``bits`` is traced, like ``damp``: one compiled program serves every code width.

    ``records`` is the group grid's record per group, stacked on a leading group axis
    (for ``MinMaxGrid``: ``(scale, zero)``, each ``[groups, d_out]``); ``ok`` is False
    when the damped H is not PD. ``group_grid`` (default ``MinMaxGrid`` of the other
    arguments) fits each group's grid when the loop reaches it; it needs dynamic groups
    (no ``act_order``, ``group_size < d_in``).

    The outlier threshold is ``outlier_relative`` times the mean over columns of
    ``var(W[:, j]) / U_jj²`` (SpQR's scale). With ``find_outliers``, a weight whose
    scaled rounding error ``((w - q) / U_ii)²`` exceeds it keeps its error-updated value:
    it passes no error on, and ``outlier_deltas`` ``[d_out, d_in]`` holds value minus
    decoded code there (zero elsewhere). Without it ``outlier_deltas`` is None.

    A ``column_rounder`` (static, hashable) replaces the scalar grids: it is called as
    ``column_rounder(x, j, rounder_params)`` with the error-updated column ``x [d_out]``
    at processing position ``j`` and returns ``(codes [column_rounder.code_width(d_out)],
    decoded [d_out])``; ``codes`` is then ``[code_width, d_in]`` and ``records`` is
    ``()``. It needs ``act_order=False`` and ``group_size=d_in`` (no grids to fit).
    """
    dt = w.dtype
    d_out, d_in = w.shape
    g = group_size
    n_groups = d_in // g
    if group_grid is None:
        group_grid = MinMaxGrid(symmetric, param_dtype, clip_search)
    bits = jnp.asarray(bits, jnp.int32)

    h = h.astype(dt)
    dead = jnp.diagonal(h) == 0.0
    h = h + jnp.diag(dead.astype(dt))
    w = jnp.where(dead[None, :], 0.0, w)

    dynamic_groups = not act_order and g < d_in
    if column_rounder is not None:
        if act_order or g != d_in:
            raise ValueError("a column_rounder needs act_order=False and group_size=d_in")
        code_width = column_rounder.code_width(d_out)
    else:
        code_width = d_out
    if not dynamic_groups and column_rounder is None:
        if not isinstance(group_grid, MinMaxGrid):
            raise ValueError("a custom group_grid needs groups fitted in the loop: act_order=False, group_size < d_in")
        scale0, zero0 = group_grid.fit(w.reshape(d_out, n_groups, g), bits)  # [d_out, n_groups]

    if act_order:
        perm = jnp.argsort(-jnp.diagonal(h), stable=True)
        w = w[:, perm]
        h = h[perm][:, perm]
    else:
        perm = jnp.arange(d_in)

    h = h + (damp.astype(dt) * jnp.mean(jnp.diagonal(h))) * jnp.eye(d_in, dtype=dt)
    v = hessian_factor(h)  # upper, V Vᵀ = H, so U = V⁻¹ is GPTQ's factor of H⁻¹
    ok = jnp.all(jnp.isfinite(v))
    v = jnp.where(ok, v, jnp.eye(d_in, dtype=dt))  # keep the loop NaN-free; the caller raises
    # U = V⁻¹ is upper triangular, so U_jj = 1 / V_jj.
    outlier_scale = jnp.mean(jnp.var(w, axis=0, ddof=1) * jnp.diagonal(v) ** 2)
    threshold = jnp.inf if outlier_relative is None else outlier_relative.astype(dt) * outlier_scale

    bsz = effective_block_size(block_size, g, d_in, dynamic_groups)
    n_blocks = -(-d_in // bsz)
    n = n_blocks * bsz
    pad = n - d_in
    # Work on Wᵀ so that a column of W is a contiguous row. Padding columns have zero
    # weight and an identity factor: they are decoupled from the real columns.
    wt = jnp.pad(w.T, ((0, pad), (0, 0)))
    v = jnp.pad(v, ((0, pad), (0, pad))) + jnp.diag(
        jnp.concatenate([jnp.zeros((d_in,), dt), jnp.ones((pad,), dt)])
    )
    gidx = jnp.pad(perm // g, (0, pad))  # group of each processed column (static grids)
    if dynamic_groups:
        # One record per group, padding groups included, shaped as the grid returns it.
        shapes = jax.eval_shape(group_grid, jnp.zeros((g, d_out), dt), jnp.zeros((g,), dt), threshold, bits)[2]
        records_t = jax.tree.map(lambda a: jnp.zeros((n // g, *a.shape), a.dtype), shapes)
    elif column_rounder is not None:
        records_t = ()
    else:
        records_t = (scale0.T, zero0.T)  # [groups, d_out] each
    codes_t = jnp.zeros((n, code_width), dt)
    deltas_t = jnp.zeros((n, d_out), dt) if find_outliers else None
    # Dᵀ = (W - Q)ᵀ of the blocks done so far (zero for the rest). With W - Q = E U
    # (E the scaled errors of the column loop) we get E = D V, and the weights of block
    # b as the column loop would find them are W_b + D_{<b} V_{<b,b} U_bb: a
    # left-looking update that needs V (one Cholesky) and only the small diagonal
    # blocks U_bb = V_bb⁻¹, never the whole of H⁻¹.
    dt_done = jnp.zeros((n, d_out), dt)
    # All diagonal blocks U_bb = V_bb⁻¹ in one batched triangular solve, before the loop.
    v_diag = jnp.diagonal(v.reshape(n_blocks, bsz, n_blocks, bsz), axis1=0, axis2=2).transpose(2, 0, 1)
    u_diag = jax.scipy.linalg.solve_triangular(
        v_diag, jnp.broadcast_to(jnp.eye(bsz, dtype=dt), v_diag.shape), lower=False
    )

    def columns(w1, q1, c1, d1, u1, start, count, round_column):
        """Round rows ``[start, start + count)`` of the block ``w1`` one at a time.

        Two-level lazy batching: the rank-1 updates run on a small sub-block (``sb``
        rows, cache-resident), and the rest of the block gets each sub-block's errors
        as one ``(B × sb) @ (sb × d_out)`` matmul. ``round_column(x, row)`` gives the
        codes and decoded values of row ``row`` of the block. ``q1``
        holds the kept values (the decoded code, or at an outlier the weight itself),
        ``c1`` the codes and ``d1`` (None without ``find_outliers``) kept minus decoded.
        """
        sb = math.gcd(count, _SUB_BLOCK)

        def sub(j, carry):
            w1, q1, c1, d1 = carry
            r0 = start + j * sb
            ws = jax.lax.dynamic_slice_in_dim(w1, r0, sb, axis=0)
            us = jax.lax.dynamic_slice(u1, (r0, r0), (sb, sb))

            def col(i, inner):
                ws, es, qs, cs, ds = inner
                x = ws[i]
                code, q = round_column(x, r0 + i)
                err = (x - q) / us[i, i]
                if find_outliers:
                    outlier = err * err > threshold
                    ds = ds.at[i].set(jnp.where(outlier, x - q, 0.0))
                    q = jnp.where(outlier, x, q)
                    err = jnp.where(outlier, 0.0, err)
                # us is upper triangular: row i is zero left of i, so only rows >= i move.
                ws = ws - us[i][:, None] * err[None, :]
                return ws, es.at[i].set(err), qs.at[i].set(q), cs.at[i].set(code), ds

            zeros = jnp.zeros((sb, d_out), dt)
            _, es, qs, cs, ds = jax.lax.fori_loop(
                0, sb, col, (ws, zeros, zeros, jnp.zeros((sb, code_width), dt), zeros if find_outliers else None)
            )
            # Rows before the sub-block have zero coefficients (U is upper triangular);
            # the sub-block's own rows change too but are done (their q is stored).
            w1 = w1 - jax.lax.dynamic_slice_in_dim(u1, r0, sb, axis=0).T @ es
            q1 = jax.lax.dynamic_update_slice_in_dim(q1, qs, r0, axis=0)
            c1 = jax.lax.dynamic_update_slice_in_dim(c1, cs, r0, axis=0)
            if find_outliers:
                d1 = jax.lax.dynamic_update_slice_in_dim(d1, ds, r0, axis=0)
            return w1, q1, c1, d1

        return jax.lax.fori_loop(0, count // sb, sub, (w1, q1, c1, d1))

    # The left-looking sum runs over chunks of `chunk` blocks: bigger matmuls. Chunks
    # that reach into block b or later add zero (D is zero there until written).
    chunk_blocks = next(c for c in (4, 2, 1) if n_blocks % c == 0)
    chunk = chunk_blocks * bsz

    def block(b: jax.Array, state):
        codes_t, deltas_t, dt_done, records_t = state
        i1 = b * bsz
        w_orig = jax.lax.dynamic_slice_in_dim(wt, i1, bsz, axis=0)
        v_cols = jax.lax.dynamic_slice_in_dim(v, i1, bsz, axis=1)  # [n, bsz]

        def accumulate(k, acc):
            vk = jax.lax.dynamic_slice_in_dim(v_cols, k * chunk, chunk, axis=0)
            dk = jax.lax.dynamic_slice_in_dim(dt_done, k * chunk, chunk, axis=0)
            return acc + vk.T @ dk

        n_chunks = (i1 + chunk - 1) // chunk
        acc = jax.lax.fori_loop(0, n_chunks, accumulate, jnp.zeros((bsz, d_out), dt))
        u1 = u_diag[b]
        w1 = w_orig + u1.T @ acc
        q1 = jnp.zeros((bsz, d_out), dt)
        c1 = jnp.zeros((bsz, code_width), dt)
        d1 = jnp.zeros((bsz, d_out), dt) if find_outliers else None
        if dynamic_groups:

            def group(k, inner):
                (w1, q1, c1, d1), records_t = inner
                rows = jax.lax.dynamic_slice_in_dim(w1, k * g, g, axis=0)
                u_diag = jnp.diagonal(jax.lax.dynamic_slice(u1, (k * g, k * g), (g, g)))
                s, z, record = group_grid(rows, u_diag, threshold, bits)  # s, z: [d_out]
                gi = i1 // g + k
                records_t = jax.tree.map(
                    lambda all_, one: jax.lax.dynamic_update_index_in_dim(all_, one, gi, axis=0), records_t, record
                )
                carry = columns(w1, q1, c1, d1, u1, k * g, g, _scalar_rounding(bits, lambda row: (s, z)))
                return carry, records_t

            (w1, q1, c1, d1), records_t = jax.lax.fori_loop(0, bsz // g, group, ((w1, q1, c1, d1), records_t))
        elif column_rounder is not None:

            def round_column(x, row):
                return column_rounder(x, jnp.minimum(i1 + row, d_in - 1), rounder_params)

            w1, q1, c1, d1 = columns(w1, q1, c1, d1, u1, 0, bsz, round_column)
        else:
            scale_t, zero_t = records_t

            def params(row):
                gi = gidx[i1 + row]
                return scale_t[gi], zero_t[gi]

            w1, q1, c1, d1 = columns(w1, q1, c1, d1, u1, 0, bsz, _scalar_rounding(bits, params))
        dt_done = jax.lax.dynamic_update_slice_in_dim(dt_done, w_orig - q1, i1, axis=0)
        codes_t = jax.lax.dynamic_update_slice_in_dim(codes_t, c1, i1, axis=0)
        if find_outliers:
            deltas_t = jax.lax.dynamic_update_slice_in_dim(deltas_t, d1, i1, axis=0)
        return codes_t, deltas_t, dt_done, records_t

    codes_t, deltas_t, _, records_t = jax.lax.fori_loop(0, n_blocks, block, (codes_t, deltas_t, dt_done, records_t))
    codes = codes_t[:d_in].T
    if act_order:
        codes = codes[:, jnp.argsort(perm)]
    records = jax.tree.map(lambda a: a[:n_groups], records_t)
    deltas = None if deltas_t is None else deltas_t[:d_in].T
    return codes, jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), records), deltas, ok


# The compiled loop: one program per (shapes, dtype, static settings, group grid);
# damping, code width and the outlier threshold are traced. GPTQ, SpQR, VPTQ and PVQ run on it.
column_loop = jax.jit(_gptq_impl, static_argnames=_STATIC_ARGNAMES)


def code_columns(w: np.ndarray, h: np.ndarray, rounder: Any, params: Any, *, damp: float, act_order: bool,
                 block_size: int, where: str) -> np.ndarray:
    """Every column of ``w`` coded by a column rounder on the loop, the error of each spread
    over the columns not yet coded (in ``diag(XᵀX)``-decreasing order with ``act_order``).

    Args:
        w: ``[d_out, d_in]`` weight (numpy, float32 or float64).
        h: ``[d_in, d_in]`` input statistics.
        rounder: the column rounder (see ``column_loop``).
        params: its parameters; arrays indexed by column are in *processing* order.
        damp: relative damping; act_order, block_size: as in ``column_loop``.
        where: the leaf path, for the error message.

    Returns:
        ``[rounder.code_width(d_out), d_in]`` codes in the weight's own column order.

    Raises:
        ValueError: ``XᵀX`` is not positive definite even after damping.
    """
    order = processing_order(h, act_order)
    codes, _, _, ok = column_loop(
        w[:, order], h[order][:, order], w.dtype.type(damp), 1, None, params,
        group_size=w.shape[1], symmetric=False, act_order=False, block_size=block_size, clip_search=False,
        param_dtype="float32", column_rounder=rounder)
    if not bool(ok):
        raise ValueError(f"XᵀX at {where} is not positive definite even after damping with damp={damp}")
    return np.asarray(codes)[:, np.argsort(order)]


def processing_order(h: np.ndarray, act_order: bool) -> np.ndarray:
    """The order columns are coded in: ``diag(XᵀX)`` decreasing (stable) with ``act_order``."""
    return np.argsort(-np.diagonal(h), kind="stable") if act_order else np.arange(h.shape[0])


def quantize_gptq(w: jax.Array, xtx: Any, recipe: GPTQ, key: jax.Array, *, layout: str = "out_in",
                  path: str = "") -> ScalarQuantized:
    """GPTQ quantization of one weight: the ``QuantizeFn`` of ``jaxquant.methods``.

    ``xtx`` is the ``(d_in, d_in)`` input second moment (any positive scale); ``key``
    is ignored (GPTQ is deterministic).

    Raises:
        ValueError: missing or mis-shaped ``xtx``, a group size that does not divide
            ``d_in``, or ``xtx`` not positive definite after damping.
    """
    del key
    where = path or "<weight>"
    w = jnp.asarray(w)
    group_size = _grid.checked_group_size(w, recipe, "GPTQ", where)
    d_in = w.shape[1]
    if xtx is None:
        raise ValueError(f"GPTQ needs XᵀX statistics but none were given for {where}")
    xtx = jnp.asarray(xtx)
    if xtx.shape != (d_in, d_in):
        raise ValueError(f"XᵀX has shape {tuple(xtx.shape)}, expected ({d_in}, {d_in}) for the weight at {where}")
    dt = jnp.float64 if w.dtype == jnp.float64 else jnp.float32
    codes, (scale, zero), _, ok = column_loop(
        w.astype(dt),
        xtx.astype(dt),
        jnp.asarray(recipe.damp, dt),
        recipe.bits,
        group_size=group_size,
        symmetric=recipe.symmetric,
        act_order=recipe.act_order,
        block_size=recipe.block_size,
        clip_search=recipe.clip_search,
        param_dtype=recipe.param_dtype,
    )
    if not bool(ok):
        raise ValueError(
            f"XᵀX at {where} is not positive definite even after damping with damp={recipe.damp} "
            "(a fraction of its mean diagonal); the statistics are not a valid Gram matrix, or "
            "increase GPTQ(damp=...)"
        )
    return _grid.to_scalar_quantized(codes, scale, zero, recipe, group_size=group_size, layout=layout)
