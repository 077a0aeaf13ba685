"""VPTQ: the compiled column loop against a plain column-by-column numpy reference, the
weighted k-means, the array type's decoding and bits, re-encoding, and the method through
the package's entry points."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant import ops
from jaxquant.methods.aqlm.kmeans import lloyd
from jaxquant.methods.vptq import VPTQQuantized
from jaxquant.methods.vptq.quantize import quantize_vptq
from jaxquant.methods.vptq.reencode import reencode_vptq
from jaxquant.problems import relative_output_error

KEY = jax.random.key(0)
# Every part at once: a residual codebook, outlier columns with their own codebook, scales.
FULL = jq.VPTQ(vector_size=4, codebook_bits=5, residual_bits=3, outlier_fraction=0.1, block_size=32)


def _problem(rng, d_out, d_in, dead=()):
    w = rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)
    w[:, rng.choice(d_in, 3, replace=False)] *= 5.0  # a few large columns
    mix = rng.standard_normal((d_in, d_in)) / np.sqrt(d_in)
    x = (rng.standard_normal((4 * d_in, d_in)) * (1.0 / np.sqrt(np.arange(d_in) + 1.0))) @ mix
    x[:, list(dead)] = 0.0
    return w, x, x.T @ x / len(x)


# --------------------------------------------------------------------------- the reference
def numpy_vptq_codes(q: VPTQQuantized, w, h, *, act_order, damp):
    """The column loop in float64, one column at a time with an explicit inverse, on the
    codebooks and scales of ``q``. Returns ``(codes, residual codes)`` ``[d_out / v, d_in]``."""
    f64 = lambda a: None if a is None else np.asarray(a, np.float64)  # noqa: E731
    book, outlier_book, residual_book, scales = (f64(q.codebook), f64(q.outlier_codebook),
                                                 f64(q.residual_codebook), f64(q.column_scales))
    outlier = np.asarray(q.outlier_mask())
    w, h = w.astype(np.float64).copy(), h.astype(np.float64).copy()
    d_out, d_in = w.shape
    v = q.vector_size
    dead = np.diag(h) == 0
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(d_in)
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    w, h = w[:, order], h[order][:, order]
    h += damp * np.mean(np.diag(h)) * np.eye(d_in)
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper, UᵀU = H⁻¹

    def nearest(points, codebook):
        return np.argmin(((points[:, None, :] - codebook[None]) ** 2).sum(-1), axis=1)

    codes, residual = np.zeros((d_out // v, d_in), int), np.zeros((d_out // v, d_in), int)
    for j in range(d_in):
        col = order[j]
        s = 1.0 if scales is None else scales[col]
        points = w[:, j].reshape(-1, v) / s
        first_book = outlier_book if outlier[col] else book
        codes[:, col] = nearest(points, first_book)
        decoded = first_book[codes[:, col]]
        if residual_book is not None:
            residual[:, col] = nearest(points - decoded, residual_book)
            decoded = decoded + residual_book[residual[:, col]]
        err = (w[:, j] - decoded.reshape(-1) * s) / u[j, j]
        w[:, j:] -= np.outer(err, u[j, j:])
    return codes, residual


@pytest.mark.parametrize("act_order", [True, False])
def test_codes_match_the_numpy_reference_float64(rng, act_order):
    # 80 columns in blocks of 32: the last block is padded.
    w, _, h = _problem(rng, 32, 80, dead=(7,))
    recipe = jq.VPTQ(vector_size=4, codebook_bits=5, residual_bits=3, outlier_fraction=0.1, act_order=act_order,
                     block_size=32)
    with jax.enable_x64(True):
        q = quantize_vptq(jnp.asarray(w, jnp.float64), jnp.asarray(h, jnp.float64), recipe, KEY)
    codes, residual = numpy_vptq_codes(q, w, h, act_order=act_order, damp=recipe.damp)
    assert q.outlier_columns.shape == (8,) and q.codebook.dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(q.codes), codes)
    np.testing.assert_array_equal(np.asarray(q.residual_codes), residual)


def test_weighted_kmeans_moves_centroids_to_weighted_means(rng):
    points = jnp.asarray(rng.standard_normal((200, 3)), jnp.float32)
    weights = jnp.asarray(rng.random(200) * (rng.random(200) > 0.2), jnp.float32)  # some zero weights
    init = points[:5]
    got = np.asarray(lloyd(points, init, 1, weights))
    p, wt, c = np.asarray(points, np.float64), np.asarray(weights, np.float64), np.asarray(init, np.float64)
    assign = np.argmin(((p[:, None] - c[None]) ** 2).sum(-1), axis=1)
    for k in range(5):
        mine = assign == k
        want = (p[mine] * wt[mine, None]).sum(0) / wt[mine].sum() if wt[mine].sum() > 0 else c[k]
        np.testing.assert_allclose(got[k], want, rtol=1e-5, atol=1e-6)
    # All weights zero: every centroid keeps its place.
    np.testing.assert_array_equal(np.asarray(lloyd(points, init, 3, jnp.zeros(200))), np.asarray(init))


def test_the_same_key_gives_the_same_codes(rng):
    w, _, h = _problem(rng, 32, 64)
    args = (jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32), FULL)
    a, b, c = quantize_vptq(*args, KEY), quantize_vptq(*args, KEY), quantize_vptq(*args, jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
    np.testing.assert_array_equal(np.asarray(a.codebook), np.asarray(b.codebook))
    assert not np.array_equal(np.asarray(a.codebook), np.asarray(c.codebook))


# --------------------------------------------------------------------------- the array type
@pytest.fixture(scope="module")
def vptq_array():
    w, _, h = _problem(np.random.default_rng(3), 48, 64)
    return quantize_vptq(jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32), FULL, KEY)


def test_bits_are_counted_honestly(vptq_array):
    q = vptq_array
    vectors = (48 // 4) * 64
    want = (vectors * (5 + 3)  # codes and residual codes
            + 2 * 32 * 4 * 16 + 8 * 4 * 16  # main and outlier codebooks, residual codebook (float16)
            + 6 * 16  # the outlier columns (int16): 10% of 64, rounded
            + 64 * 16)  # the column scales (float16)
    assert q.storage_bits == want
    assert jq.tree_bits({"w": q})["bits_per_weight"] == pytest.approx(want / (48 * 64))


def test_decode_rows_and_matmul_match_decode(rng):
    from array_checks import check_decode_rows_and_matmul  # noqa: PLC0415

    w, _, h = _problem(rng, 48, 64)
    check_decode_rows_and_matmul(w, h, FULL, rng)


def test_decoding_follows_the_format(vptq_array):
    """``W[r·v + t, i] = s_i · (C_i[codes[r, i], t] + R[residual[r, i], t])``, written out."""
    q = vptq_array
    book, other, res = (np.asarray(a, np.float32) for a in (q.codebook, q.outlier_codebook, q.residual_codebook))
    codes, residual, scales = np.asarray(q.codes), np.asarray(q.residual_codes), np.asarray(q.column_scales, np.float32)
    outlier = set(np.asarray(q.outlier_columns).tolist())
    want = np.zeros((48, 64), np.float32)
    for r in range(12):
        for i in range(64):
            first = other if i in outlier else book
            want[4 * r:4 * r + 4, i] = scales[i] * (first[codes[r, i]] + res[residual[r, i]])
    np.testing.assert_allclose(np.asarray(q.decode_out_in()), want, rtol=1e-6, atol=1e-7)


def test_save_and_load_round_trip(tmp_path, vptq_array, rng):
    w, _, h = _problem(rng, 32, 64)
    plain_recipe = jq.VPTQ(vector_size=4, residual_bits=0, normalize=False)
    plain = quantize_vptq(jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32), plain_recipe, KEY)
    jq.io.save(tmp_path / "ck", {"full": vptq_array, "plain": plain})
    back = jq.io.load(tmp_path / "ck")
    for name, q in (("full", vptq_array), ("plain", plain)):
        assert isinstance(back[name], VPTQQuantized)
        np.testing.assert_array_equal(np.asarray(back[name].decode()), np.asarray(q.decode()))
    assert back["plain"].residual_codes is None and back["plain"].column_scales is None


# --------------------------------------------------------------------------- the method
def test_named_recipes_and_errors():
    assert jq.named_recipe("vptq-8x8r8") == jq.VPTQ()
    assert jq.named_recipe("vptq-4x8") == jq.VPTQ(vector_size=4, codebook_bits=8, residual_bits=0)
    assert jq.recipe_from_dict(jq.recipe_to_dict(jq.VPTQ(outlier_fraction=0.02))) == jq.VPTQ(outlier_fraction=0.02)
    with pytest.raises(ValueError, match="outlier_fraction=0.6"):
        jq.VPTQ(outlier_fraction=0.6)
    with pytest.raises(ValueError, match="codebook_bits=17"):
        jq.VPTQ(codebook_bits=17)
    with pytest.raises(ValueError, match=r"d_out=42 is not divisible by vector_size=8 at layer/w"):
        jq.quantize_weight(jnp.ones((42, 32)), jnp.eye(32), jq.VPTQ(), path="layer/w")
    with pytest.raises(ValueError, match=r"VPTQ needs XᵀX.*layer/w"):
        jq.quantize_weight(jnp.ones((32, 32)), None, jq.VPTQ(), path="layer/w")
    with pytest.raises(ValueError, match=r"needs XᵀX of shape \(32, 32\) for the weight at layer/w, got \(8, 8\)"):
        quantize_vptq(jnp.ones((32, 32)), jnp.eye(8), jq.VPTQ(), KEY, path="layer/w")


def test_lower_error_than_gptq_2_bit_at_fewer_bits(rng):
    w, x, h = _problem(rng, 128, 256)
    # 16 pairs of weights: 2 bits of codes, a codebook small enough for this small layer.
    small = jq.VPTQ(vector_size=2, codebook_bits=4, residual_bits=0, kmeans_iters=20)
    vptq = jq.quantize_weight(jnp.asarray(w), jnp.asarray(h), small)
    gptq = jq.quantize_weight(jnp.asarray(w), jnp.asarray(h), jq.GPTQ(bits=2, group_size=64))
    assert vptq.bits_per_weight < gptq.bits_per_weight
    assert relative_output_error(w, vptq.decode(), x) < 0.5 * relative_output_error(w, gptq.decode(), x)


# --------------------------------------------------------------------------- fine-tuning
def test_v_step_takes_the_greedy_nearest_codes(vptq_array, rng):
    q = vptq_array
    target = jnp.asarray(np.asarray(q.decode_out_in()) + rng.standard_normal((48, 64)) * 0.1, jnp.float32)
    every = jnp.arange(12 * 64, dtype=jnp.int32)
    out = jax.jit(lambda q, t: reencode_vptq(q, t, every))(q, target)
    t = np.asarray(target).reshape(12, 4, 64).transpose(0, 2, 1) / np.asarray(q.column_scales, np.float32)[None, :, None]
    book, other, res = (np.asarray(a, np.float32) for a in (q.codebook, q.outlier_codebook, q.residual_codebook))
    outlier = np.asarray(q.outlier_mask())
    old_codes, new_codes = np.asarray(q.codes), np.asarray(out.codes)
    for r in range(12):
        for i in range(64):
            first = other if outlier[i] else book
            c1 = np.argmin(((first - t[r, i]) ** 2).sum(-1))
            c2 = np.argmin(((res - (t[r, i] - first[c1])) ** 2).sum(-1))
            changed = new_codes[r, i] != old_codes[r, i] or out.residual_codes[r, i] != q.residual_codes[r, i]
            if changed:  # a change is to the greedy choice
                assert (new_codes[r, i], int(out.residual_codes[r, i])) == (c1, c2)
    before = np.sum((np.asarray(q.decode_out_in()) - np.asarray(target)) ** 2)
    after = np.sum((np.asarray(out.decode_out_in()) - np.asarray(target)) ** 2)
    assert after < before and np.mean(new_codes != old_codes) > 0.1


def test_forced_v_step_moves_every_vector_toward_its_target(vptq_array, rng):
    q = vptq_array
    w0 = np.asarray(q.decode_out_in())
    target = jnp.asarray(w0 + rng.standard_normal((48, 64)) * 1e-3, jnp.float32)  # too close for a plain step
    every = jnp.arange(12 * 64, dtype=jnp.int32)
    assert np.array_equal(np.asarray(reencode_vptq(q, target, every).codes), np.asarray(q.codes))
    w1 = np.asarray(reencode_vptq(q, target, every, force=True).decode_out_in())
    moved = lambda a: a.reshape(12, 4, 64).transpose(0, 2, 1)  # noqa: E731
    step, toward = moved(w1 - w0), moved(np.asarray(target) - w0)
    changed = np.abs(step).sum(-1) > 0
    assert changed.mean() > 0.5
    assert np.all((step * toward).sum(-1)[changed] > 0)


@pytest.mark.parametrize("trust_ratio", [0.05, 0.1])  # a tighter bound admits no vector of this small array
def test_pv_tuning_on_vptq_bounds_the_v_step(vptq_array, trust_ratio):
    from array_checks import bounded_v_step_ratio  # noqa: PLC0415

    assert 0 < bounded_v_step_ratio(vptq_array, trust_ratio) <= trust_ratio * (1 + 1e-5)
    # The P step's part: the three codebooks and the column scales.
    cont, _ = jq.split({"w": vptq_array})
    assert {x.shape for x in jax.tree.leaves(cont)} == {(32, 4), (8, 4), (64,)}


# --------------------------------------------------------------------------- the CPU kernel
def _random_vptq(rng, d_out, d_in, v, bits, residual_bits, outliers, scales):
    """A VPTQ array with random codes and codebooks (any combination of the optional parts)."""
    k = 2**bits
    codes = rng.integers(0, k, (d_out // v, d_in)).astype(np.uint8 if bits <= 8 else np.uint16)
    book = lambda n: jnp.asarray(rng.standard_normal((n, v)), jnp.float16)  # noqa: E731
    return VPTQQuantized(
        codes=jnp.asarray(codes), codebook=book(k),
        residual_codes=jnp.asarray(rng.integers(0, 2**residual_bits, codes.shape).astype(np.uint8))
        if residual_bits else None,
        residual_codebook=book(2**residual_bits) if residual_bits else None,
        outlier_codebook=book(k) if outliers else None,
        outlier_columns=jnp.asarray(np.sort(rng.choice(d_in, outliers, replace=False)).astype(np.int16))
        if outliers else None,
        column_scales=jnp.asarray(rng.random(d_in) + 0.5, jnp.float16) if scales else None,
        codebook_bits=bits, residual_bits=residual_bits, shape=(d_out, d_in), layout="out_in",
    )


@pytest.mark.parametrize(("v", "bits", "residual_bits", "outliers", "scales", "d_in"), [
    (4, 8, 0, 0, True, 64), (8, 8, 8, 3, True, 67), (2, 10, 4, 0, False, 33), (6, 5, 0, 5, True, 64),
])
def test_native_kernel_matches_the_decoded_product(rng, v, bits, residual_bits, outliers, scales, d_in):
    from jaxquant.methods.vptq import kernel  # noqa: PLC0415

    if not kernel.LIBRARY.available():
        pytest.skip(f"native kernel unavailable: {kernel.LIBRARY.unavailable_reason()}")
    w = _random_vptq(rng, 48, d_in, v, bits, residual_bits, outliers, scales)
    dense = np.asarray(w.decode_out_in(), np.float64)
    for rows in (1, 2, 4):
        x = rng.standard_normal((rows, d_in)).astype(np.float32)
        want = x.astype(np.float64) @ dense.T
        np.testing.assert_allclose(np.asarray(kernel.matmul(jnp.asarray(x), w)), want, rtol=1e-4, atol=1e-4)
    assert ops.dispatch.select_impl(jnp.zeros((1, d_in)), w) == "own_kernel"
    assert ops.dispatch.select_impl(jnp.zeros((5, d_in)), w) == "xla_decode"  # more rows: decode once


def test_block_finetuning_lowers_the_error_and_keeps_the_codes(rng):
    from jaxquant.finetune import block as fb  # noqa: PLC0415

    w, _, h = _problem(rng, 32, 64)
    q = {"w": jq.quantize_weight(jnp.asarray(w.T, jnp.float32), jnp.asarray(h, jnp.float32), FULL, layout="in_out")}
    x = rng.standard_normal((16, 8, 64)).astype(np.float32) * (1.0 / np.sqrt(np.arange(64) + 1.0))
    y = (x @ w.T).astype(np.float32)

    def fn(p, x):
        return ops.matmul(x, p["w"])

    before = fb.relative_error(fn, q, x, y)
    config = fb.BlockFinetuneConfig(lr=1e-3, batch_size=4, max_epochs=8, holdout=0.25, patience=3)
    tuned, _ = fb.finetune_block(fn, q, x, y, config, key=jax.random.key(0))
    assert fb.relative_error(fn, tuned, x, y) < 0.9 * before
    np.testing.assert_array_equal(np.asarray(tuned["w"].codes), np.asarray(q["w"].codes))
    assert not np.array_equal(np.asarray(tuned["w"].codebook), np.asarray(q["w"].codebook))
    assert tuned["w"].codebook.dtype == jnp.float16
