"""SpQR: the compiled loop against a plain column-by-column numpy reference, the array
type's decoding and bits, and the method through the package's entry points."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant import ops
from jaxquant.methods.spqr import SpQRQuantized
from jaxquant.methods.spqr.quantize import quantize_spqr
from jaxquant.problems import relative_output_error

KEY = jax.random.key(0)
# The paper's setting: small groups, so that small test weights hold several.
PAPER = jq.SpQR(bits=3, group_size=16, stat_group=16, outlier_threshold=0.2)


def _problem(rng, d_out, d_in, dead=()):
    w = rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)
    w[rng.random(w.shape) < 0.01] *= 8.0  # a few large weights: outlier candidates
    mix = rng.standard_normal((d_in, d_in)) / np.sqrt(d_in)
    x = (rng.standard_normal((4 * d_in, d_in)) * (1.0 / np.sqrt(np.arange(d_in) + 1.0))) @ mix
    x[:, list(dead)] = 0.0
    return w, x, x.T @ x / len(x)


# --------------------------------------------------------------------------- the reference
def _minmax(x, bits):
    lo, hi = x.min(-1), x.max(-1)
    flat = lo == hi
    lo, hi = np.where(flat, -1.0, lo), np.where(flat, 1.0, hi)
    step = (hi - lo) / (2**bits - 1)
    return step, -lo / step


def _round_trip(x, step, zero, bits):
    return (np.clip(np.round(x / step[..., None] + zero[..., None]), 0, 2**bits - 1) - zero[..., None]) * step[..., None]


def _stat_grid(values, bits, group):
    """Values as decoded from ``bits`` codes on float16 min/max grids over ``group`` entries."""
    groups = values.reshape(-1, group)
    step, zero = _minmax(groups, bits)
    step, zero = step.astype(np.float16).astype(np.float64), zero.astype(np.float16).astype(np.float64)
    return _round_trip(groups, step, zero, bits).reshape(-1)


def numpy_spqr(w, h, *, bits, group, stat_bits, stat_group, relative, act_order, damp):
    """SpQR one column at a time with an explicit inverse, as the paper describes it.

    Returns the kept weights (decoded codes, outliers at their values) and the outlier mask,
    both in the original column order.
    """
    w, h = w.astype(np.float64).copy(), h.astype(np.float64).copy()
    d_out, d_in = w.shape
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(d_in)
    w, h = w[:, order], h[order][:, order]
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * np.mean(np.diag(h)) * np.eye(d_in)
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper, UᵀU = H⁻¹
    threshold = relative * np.mean(np.var(w, axis=0, ddof=1) / np.diag(u) ** 2)
    kept, outliers = np.zeros_like(w), np.zeros(w.shape, bool)
    for j in range(d_in):
        if j % group == 0:
            block, ud = w[:, j:j + group], np.diag(u)[j:j + group]
            # Leave-one-out: the error without weight k on a grid fitted without it.
            gain = np.zeros_like(block)
            step, zero = _minmax(block, bits)
            base = (((_round_trip(block, step, zero, bits) - block) / ud) ** 2).sum(-1)
            for k in range(group):
                rest, urest = np.delete(block, k, axis=1), np.delete(ud, k)
                step, zero = _minmax(rest, bits)
                gain[:, k] = base - (((_round_trip(rest, step, zero, bits) - rest) / urest) ** 2).sum(-1)
            keep = gain <= threshold
            mean = (block * keep).sum(1) / np.maximum(keep.sum(1), 1)
            step, zero = _minmax(np.where(keep, block, mean[:, None]), bits)
            scale = np.maximum(_stat_grid(step, stat_bits, stat_group), 1e-9)
            zero = _stat_grid(zero, stat_bits, stat_group)
        x = w[:, j].copy()
        q = (np.clip(np.round(x / scale + zero), 0, 2**bits - 1) - zero) * scale
        err = (x - q) / u[j, j]
        outlier = err**2 > threshold
        q, err = np.where(outlier, x, q), np.where(outlier, 0.0, err)
        kept[:, j], outliers[:, j] = q, outlier
        w[:, j:] -= np.outer(err, u[j, j:])
    back = np.argsort(order)
    return kept[:, back], outliers[:, back]


def _outlier_mask(q: SpQRQuantized) -> np.ndarray:
    mask = np.zeros((q.d_out, q.d_in), bool)
    starts, cols = np.asarray(q.outlier_row_starts), np.asarray(q.outlier_columns)
    for o in range(q.d_out):
        mask[o, cols[starts[o]:starts[o + 1]]] = True
    return mask if q.column_positions is None else mask[:, np.asarray(q.column_positions)]


@pytest.mark.parametrize("act_order", [True, False])
def test_matches_numpy_reference_float64(rng, act_order):
    # 80 columns with blocks of 32 (rounded to 32, a multiple of the group of 16) need padding.
    w, _, h = _problem(rng, 32, 80, dead=(7,))
    recipe = jq.SpQR(bits=3, group_size=16, stat_bits=3, stat_group=16, outlier_threshold=0.2,
                     act_order=act_order, block_size=32)
    kept, outliers = numpy_spqr(w, h, bits=3, group=16, stat_bits=3, stat_group=16, relative=0.2,
                                act_order=act_order, damp=0.01)
    with jax.enable_x64(True):
        q = quantize_spqr(jnp.asarray(w, jnp.float64), jnp.asarray(h, jnp.float64), recipe, KEY)
        decoded = np.asarray(q.decode(jnp.float64))
    assert 0 < outliers.sum() < 0.1 * outliers.size  # the reference found some, as the problem intends
    np.testing.assert_array_equal(_outlier_mask(q), outliers)
    # Elsewhere the same codes, decoded in float32; outliers are stored in float16.
    np.testing.assert_allclose(decoded[~outliers], kept[~outliers], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(decoded[outliers], kept[outliers], rtol=1e-3, atol=1e-4)


def test_without_outliers_it_is_grouped_gptq_with_quantized_statistics(rng, tmp_path):
    w, x, h = _problem(rng, 32, 64)
    q = quantize_spqr(jnp.asarray(w), jnp.asarray(h), dataclasses.replace(PAPER, outlier_threshold=float("inf")), KEY)
    assert q.num_outliers == 0
    back = jq.io.load(jq.io.save(tmp_path / "ck", {"w": q}))["w"]  # zero-size outlier arrays
    np.testing.assert_array_equal(np.asarray(back.decode()), np.asarray(q.decode()))
    gptq = jq.quantize_weight(jnp.asarray(w), jnp.asarray(h), jq.GPTQ(bits=3, group_size=16, act_order=False))
    # Quantized statistics cost a little accuracy against float16 ones, not much.
    assert relative_output_error(w, q.decode(), x) < 1.5 * relative_output_error(w, gptq.decode(), x)


# --------------------------------------------------------------------------- the array type
@pytest.fixture(scope="module")
def spqr_array():
    w, _, h = _problem(np.random.default_rng(3), 48, 64)
    return quantize_spqr(jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32), PAPER, KEY)


def test_bits_are_counted_honestly(spqr_array):
    q = spqr_array
    groups, nnz = 64 // 16, q.num_outliers
    want = (48 * 64 * 3  # codes
            + 2 * 48 * groups * 3  # scale and zero codes
            + 2 * (48 // 16) * groups * 2 * 16  # their float16 steps and zero points
            + nnz * (16 + 16)  # float16 values and uint16 columns
            + 49 * 16  # row starts (uint16: fewer than 65536 outliers)
            + 64 * 16)  # the column positions (uint16)
    assert q.storage_bits == want and nnz > 0
    assert jq.tree_bits({"w": q})["bits_per_weight"] == pytest.approx(want / (48 * 64))


def test_decode_rows_and_matmul_match_decode(rng):
    from array_checks import check_decode_rows_and_matmul  # noqa: PLC0415

    w, _, h = _problem(rng, 48, 64)
    check_decode_rows_and_matmul(w, h, PAPER, rng)


def test_save_and_load_round_trip(tmp_path, spqr_array):
    jq.io.save(tmp_path / "ck", {"w": spqr_array})
    back = jq.io.load(tmp_path / "ck")["w"]
    assert isinstance(back, SpQRQuantized)
    np.testing.assert_array_equal(np.asarray(back.decode()), np.asarray(spqr_array.decode()))


# --------------------------------------------------------------------------- the method
def test_named_recipes_and_errors():
    assert jq.named_recipe("spqr-4") == jq.SpQR(bits=4) and jq.SpQR().group_size == 64
    assert jq.named_recipe("spqr-3-g32") == jq.SpQR(bits=3, group_size=32)
    assert jq.recipe_from_dict(jq.recipe_to_dict(jq.SpQR(stat_bits=2))) == jq.SpQR(stat_bits=2)
    with pytest.raises(ValueError, match="stat_bits=9"):
        jq.SpQR(stat_bits=9)
    with pytest.raises(ValueError, match=r"d_out=40 is not divisible by stat_group=16 at layer/w"):
        jq.quantize_weight(jnp.ones((40, 32)), jnp.eye(32), PAPER, path="layer/w")
    with pytest.raises(ValueError, match="needs XᵀX"):
        jq.quantize_weight(jnp.ones((32, 32)), None, PAPER, path="layer/w")


def test_fewer_bits_and_lower_error_than_gptq(rng):
    w, x, h = _problem(rng, 128, 256)
    spqr = jq.quantize_weight(jnp.asarray(w), jnp.asarray(h), jq.SpQR(bits=3))
    gptq = jq.quantize_weight(jnp.asarray(w), jnp.asarray(h), jq.GPTQ(bits=3, group_size=64))
    assert spqr.bits_per_weight < gptq.bits_per_weight
    assert relative_output_error(w, spqr.decode(), x) < relative_output_error(w, gptq.decode(), x)


# --------------------------------------------------------------------------- fine-tuning
def _dense_grid(q: SpQRQuantized) -> tuple[np.ndarray, np.ndarray]:
    """Per-weight scale and zero ``[d_out, d_in]`` in the weight's own column order."""
    from jaxquant.methods.spqr.array import grid_of  # noqa: PLC0415

    scale, zero = (np.repeat(np.asarray(a), q.group_size, axis=1)
                   for a in grid_of(q.scale_codes, q.zero_codes, q.scale_stats, q.zero_stats, q.stat_group))
    positions = np.asarray(q.column_positions)
    return scale[:, positions], zero[:, positions]


def test_v_step_rounds_to_the_nearest_grid_point_and_keeps_outliers(spqr_array, rng):
    from jaxquant.methods.spqr.reencode import reencode_spqr  # noqa: PLC0415

    q = spqr_array
    target = jnp.asarray(np.asarray(q.decode_out_in()) + rng.standard_normal((q.d_out, q.d_in)) * 0.05, jnp.float32)
    out = jax.jit(lambda q, t: reencode_spqr(q, t, jnp.arange(q.d_out * q.d_in, dtype=jnp.int32)))(q, target)
    scale, zero = _dense_grid(q)
    nearest = (np.clip(np.round(np.asarray(target) / scale + zero), 0, 7) - zero) * scale
    outliers = _outlier_mask(q)
    got = np.asarray(out.decode_out_in())
    # Non-outliers sit on the grid point nearest their target (or tie with it).
    np.testing.assert_allclose(np.abs(got - target)[~outliers], np.abs(nearest - target)[~outliers], atol=1e-5)
    np.testing.assert_array_equal(got[outliers], np.asarray(q.decode_out_in())[outliers])
    assert np.mean(np.asarray(out.codes) != np.asarray(q.codes)) > 0.1  # the noise moved many codes


@pytest.mark.parametrize("trust_ratio", [0.02, 0.05])
def test_pv_tuning_on_spqr_bounds_the_v_step(spqr_array, trust_ratio):
    from array_checks import bounded_v_step_ratio  # noqa: PLC0415

    assert 0 < bounded_v_step_ratio(spqr_array, trust_ratio) <= trust_ratio * (1 + 1e-5)
    # The continuous part is the P step's: statistics and outlier corrections, not codes.
    cont, _ = jq.split({"w": spqr_array})
    assert all(jnp.issubdtype(x.dtype, jnp.floating) for x in jax.tree.leaves(cont))
    assert {x.shape for x in jax.tree.leaves(cont)} == {spqr_array.scale_stats.shape, spqr_array.outlier_values.shape}


# --------------------------------------------------------------------------- the CPU kernel
@pytest.mark.parametrize(("recipe", "d_in"), [
    (PAPER, 64),  # permuted columns, outliers
    (jq.SpQR(bits=4, group_size=24, stat_group=16, outlier_threshold=0.5, act_order=False), 72),  # 24: vector tail
    (jq.SpQR(bits=2, group_size=32, stat_group=16, outlier_threshold=float("inf")), 64),  # no outliers
])
def test_native_kernel_matches_the_decoded_product(rng, recipe, d_in):
    from jaxquant.methods.spqr import kernel  # noqa: PLC0415

    if not kernel.LIBRARY.available():
        pytest.skip(f"native kernel unavailable: {kernel.LIBRARY.unavailable_reason()}")
    w, _, h = _problem(rng, 48, d_in)
    q = quantize_spqr(jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32), recipe, KEY)
    assert (q.num_outliers > 0) == (recipe.outlier_threshold < 1.0)
    dense = np.asarray(q.decode_out_in(), np.float64)
    for rows in (1, 2, 4):
        x = rng.standard_normal((rows, d_in)).astype(np.float32)
        got = np.asarray(kernel.matmul(jnp.asarray(x), q))
        np.testing.assert_allclose(got, x.astype(np.float64) @ dense.T, rtol=1e-4, atol=1e-5)
    assert ops.dispatch.select_impl(jnp.zeros((1, d_in)), q) == "own_kernel"
