"""AQLM: beam search, k-means init, the alternation loop, layout, errors and sharding."""

from __future__ import annotations

import itertools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from reference_decode import additive_decode_np
from jaxquant.methods import method_for
from jaxquant.methods.aqlm import beam_search as bs
from jaxquant.methods.aqlm import codebooks as cb
from jaxquant.methods.aqlm import grad_dtype as grad_dtype_mod
from jaxquant.methods.aqlm import kmeans as km
from jaxquant.methods.aqlm import native_grads, native_kernels
from jaxquant.methods.aqlm import quantize as qm
from jaxquant.methods.aqlm import quantize_aqlm


def _problem(rng: np.random.Generator, d_out: int, d_in: int, n_tokens: int = 256) -> tuple[np.ndarray, np.ndarray]:
    w = rng.standard_normal((d_out, d_in)).astype(np.float32) / np.sqrt(d_in)
    x = rng.standard_normal((n_tokens, d_in)) * np.sqrt(1.0 / (np.arange(d_in) + 1.0))
    x = x @ np.linalg.qr(rng.standard_normal((d_in, d_in)))[0].T
    return w, (x.T @ x / n_tokens).astype(np.float32)


def _objective(w: np.ndarray, w_hat: np.ndarray, xtx: np.ndarray) -> float:
    r = (w - w_hat).astype(np.float64)
    return float(np.sum((r @ xtx.astype(np.float64)) * r))


def _search_np_inputs(rng: np.random.Generator, rows: int, og: int, d_in: int, m: int, k: int, ig: int):
    w, h = _problem(rng, rows * og, d_in)
    codebooks = (rng.standard_normal((m, k, og, ig)) * 0.3).astype(np.float32)
    codes = rng.integers(0, k, (rows, d_in // ig, m)).astype(np.int32)
    scales = (1.0 + rng.random(rows)).astype(np.float32)
    return w, h, codebooks, codes, scales


IMPLS = [
    "xla",
    pytest.param(
        "native",
        marks=pytest.mark.skipif(not native_kernels.available(), reason=f"{native_kernels.unavailable_reason()}"),
    ),
]


def _search(w, h, codebooks, codes, scales, beam_size, seed=0, impl="xla"):  # noqa: ANN001, ANN202
    """One beam-search pass through the XLA (``bs.beam_search``) or the native implementation."""
    rows = codes.shape[0]
    og = codebooks.shape[2]
    group_order, codebook_order = bs.search_orders(np.random.default_rng(seed), codes.shape[1], codes.shape[2])
    inputs = bs.SearchInputs(*(jnp.asarray(a) for a in (w.reshape(rows, og, -1), codes, scales, codebooks, h,
                                                        group_order, codebook_order)))
    if impl == "native":
        new, dloss = jax.jit(native_kernels.beam_search, static_argnames=("beam_size",))(inputs, beam_size=beam_size)
    else:
        fn = jax.jit(bs.beam_search, static_argnames=("beam_size", "chunk_rows"))
        new, dloss = fn(inputs, beam_size=beam_size, chunk_rows=rows)
    return np.asarray(new), float(dloss)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("beam_size,og", [(1, 1), (4, 1), (3, 2)])
def test_beam_search_never_increases_objective(rng, beam_size, og, impl):
    w, h, codebooks, codes, scales = _search_np_inputs(rng, rows=12, og=og, d_in=16, m=2, k=8, ig=4)
    s4 = scales.reshape(-1, 1, 1, 1)
    before = _objective(w, additive_decode_np(codes, codebooks, s4), h)
    new, dloss = _search(w, h, codebooks, codes, scales, beam_size, impl=impl)
    after = _objective(w, additive_decode_np(new, codebooks, s4), h)
    assert after <= before * (1 + 1e-6)
    assert after < 0.9 * before  # random codes leave plenty to gain
    # The incrementally tracked change matches the recomputed one.
    np.testing.assert_allclose(dloss, after - before, rtol=1e-3, atol=1e-6 * before)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("d_in", [2, pytest.param(4, marks=pytest.mark.slow)])  # 4: a 64-wide beam compiles slowly
def test_wide_beam_finds_exhaustive_optimum(rng, d_in, impl):
    """M=2, 2^B=4, g=2, 3 rows: a wide full-row beam equals brute force over all code tuples.

    With ``K^(M·n_ig - 1)`` hypotheses the last step scores every code tuple of the row
    (the beam holds every prefix), so the search is exact for any XᵀX.
    """
    m, k, ig, rows = 2, 4, 2, 3
    w, h, codebooks, codes, scales = _search_np_inputs(rng, rows, 1, d_in, m, k, ig)
    n_ig = d_in // ig
    new, _ = _search(w, h, codebooks, codes, scales, beam_size=k ** (m * n_ig - 1), impl=impl)
    for r in range(rows):
        best, best_codes = np.inf, None
        for combo in itertools.product(range(k), repeat=m * n_ig):
            c = np.asarray(combo, np.int32).reshape(1, n_ig, m)
            val = _objective(w[r : r + 1], additive_decode_np(c, codebooks, scales[r].reshape(1, 1, 1, 1)), h)
            if val < best:
                best, best_codes = val, c
        got = _objective(w[r : r + 1], additive_decode_np(new[r : r + 1], codebooks, scales[r].reshape(1, 1, 1, 1)), h)
        np.testing.assert_allclose(got, best, rtol=1e-5)
        np.testing.assert_array_equal(new[r : r + 1], best_codes)


def test_smallest_matches_sort(rng):
    scores = rng.standard_normal((50, 7)).astype(np.float32)
    scores[3, 2] = scores[9, 2]  # a tie goes to the smaller index
    vals, idx = bs.smallest(jnp.asarray(scores), 4)
    order = np.argsort(scores, axis=0, kind="stable")[:4]
    np.testing.assert_array_equal(np.asarray(idx), order)
    np.testing.assert_array_equal(np.asarray(vals), np.take_along_axis(scores, order, axis=0))


@pytest.mark.parametrize("c,n", [(50, 4), (2048, 8), (1000, 3), (300, 1)])
def test_smallest_keys_match_sort(rng, c, n):
    """Packed-key selection (plain passes, the block path and ``min0``) equals a stable sort."""
    scores = rng.standard_normal((c, 7)).astype(np.float32)
    scores[3, 2] = scores[9, 2]  # a tie goes to the smaller index
    bits = bs.index_bits(c)
    keys = bs.pack_keys(jnp.asarray(scores), bits)
    got = np.asarray(bs.smallest_keys(keys, n, bits)) & ((1 << bits) - 1)
    # Ranking keeps 23 - bits mantissa bits: compare with a sort of the same rounding.
    coarse = np.asarray(keys) >> bits
    order = np.lexsort((np.arange(c)[:, None].repeat(7, 1), coarse), axis=0)[:n]
    np.testing.assert_array_equal(got, order)
    np.testing.assert_array_equal(np.sort(scores, axis=0)[0], np.take_along_axis(scores, got[:1], axis=0)[0])


@pytest.mark.parametrize("beam_size", [1, 3])
def test_blocked_codebook_scan_matches_one_block(rng, beam_size):
    """Scanning the codewords in blocks (as for 2^16 codebooks) finds the same codes."""
    w, h, codebooks, codes, scales = _search_np_inputs(rng, rows=8, og=1, d_in=16, m=2, k=64, ig=4)
    group_order, codebook_order = bs.search_orders(np.random.default_rng(0), 4, 2)
    inputs = bs.SearchInputs(*(jnp.asarray(a) for a in (w.reshape(8, 1, 16), codes, scales, codebooks, h,
                                                        group_order, codebook_order)))
    fn = jax.jit(bs.beam_search, static_argnames=("beam_size", "chunk_rows", "block"))
    one, d_one = fn(inputs, beam_size=beam_size, chunk_rows=8, block=64)
    blocked, d_blocked = fn(inputs, beam_size=beam_size, chunk_rows=4, block=8)
    np.testing.assert_array_equal(np.asarray(blocked), np.asarray(one))
    np.testing.assert_allclose(float(d_blocked), float(d_one), rtol=1e-5)


needs_native = pytest.mark.skipif(not native_kernels.available(), reason=f"{native_kernels.unavailable_reason()}")


@needs_native
@pytest.mark.parametrize(
    "og,m,k,ig,beam_size",
    [(1, 2, 256, 8, 1), (1, 2, 256, 8, 8), (2, 3, 16, 4, 4), (1, 1, 1024, 4, 8), (1, 2, 4, 2, 3)],
)
def test_native_search_matches_xla_reference(rng, og, m, k, ig, beam_size):
    """On random inputs the native search reaches the XLA search's loss and mostly its codes.

    They need not agree exactly: the XLA path ranks candidates by packed keys that keep
    ≥ 11 mantissa bits, the native one by the exact float32 score, so near-ties can go
    either way and a row's later choices follow from its earlier ones.
    """
    w, h, codebooks, codes, scales = _search_np_inputs(rng, rows=48, og=og, d_in=32, m=m, k=k, ig=ig)
    s4 = scales.reshape(-1, 1, 1, 1)
    before = _objective(w, additive_decode_np(codes, codebooks, s4), h)
    ref, _ = _search(w, h, codebooks, codes, scales, beam_size, impl="xla")
    got, d_got = _search(w, h, codebooks, codes, scales, beam_size, impl="native")
    after_ref = _objective(w, additive_decode_np(ref, codebooks, s4), h)
    after_got = _objective(w, additive_decode_np(got, codebooks, s4), h)
    assert after_got < before
    np.testing.assert_allclose(d_got, after_got - before, rtol=1e-3, atol=1e-6 * before)  # tracked change is exact
    np.testing.assert_allclose(after_got, after_ref, rtol=0.01)
    assert np.mean(got == ref) > 0.9


needs_native_grads = pytest.mark.skipif(not native_grads.available(), reason=f"{native_grads.unavailable_reason()}")


@needs_native_grads
@pytest.mark.parametrize(
    "rows,og,n_ig,ig,m,k",
    [(37, 1, 16, 8, 2, 256), (20, 2, 5, 4, 3, 16), (9, 1, 4, 8, 1, 4096), (1030, 1, 128, 8, 2, 64)],  # last: row blocks
)
def test_native_grads_match_the_xla_reference(rng, rows, og, n_ig, ig, m, k):
    """The native residual and gradients equal codebooks.loss_and_grads' XLA path."""
    w, h = _problem(rng, rows * og, n_ig * ig)
    w = jnp.asarray(w.reshape(rows, og, n_ig * ig))
    codes = jnp.asarray(rng.integers(0, k, (rows, n_ig, m)).astype(np.int32))
    params = {
        "codebooks": jnp.asarray(rng.standard_normal((m, k, og, ig)).astype(np.float32) * 0.1),
        "scales": jnp.asarray((0.5 + rng.random(rows)).astype(np.float32)),
    }
    run = lambda native: jax.jit(lambda p: cb.loss_and_grads(p, codes, w, jnp.asarray(h), native=native))(params)  # noqa: E731
    (loss_ref, ref), (loss, got) = run(False), run(True)
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-5)
    for name in ("codebooks", "scales"):
        scale = float(jnp.max(jnp.abs(ref[name])))
        np.testing.assert_allclose(np.asarray(got[name]), np.asarray(ref[name]), rtol=1e-4, atol=1e-5 * scale)
    # Results do not depend on how the work was split: a second call is bit-identical.
    chex.assert_trees_all_equal(run(True)[1], got)


@needs_native_grads
def test_native_grads_reject_bad_codes_and_shapes(rng):
    codes = jnp.zeros((4, 2, 1), jnp.int32).at[1, 1, 0].set(16)
    books, scales, w = jnp.zeros((1, 16, 1, 4)), jnp.ones((4,)), jnp.zeros((4, 1, 8))
    with pytest.raises(Exception, match="aqlm_residual: code out of range"):
        native_grads.residual(codes, books, scales, w)
    with pytest.raises(Exception, match="aqlm_codebook_grads: code out of range"):
        native_grads.codebook_grads(w, codes, books, scales)
    with pytest.raises(Exception, match="aqlm_residual: inconsistent shapes"):
        native_grads.residual(codes * 0, books, jnp.ones((3,)), w)


@needs_native
def test_native_search_keeps_zero_rows_and_rejects_bad_codes(rng):
    w, h, codebooks, codes, scales = _search_np_inputs(rng, rows=6, og=1, d_in=16, m=2, k=8, ig=4)
    scales[2] = 0.0  # a padding row: nothing to gain, codes kept
    new, _ = _search(w, h, codebooks, codes, scales, beam_size=2, impl="native")
    np.testing.assert_array_equal(new[2], codes[2])
    assert not np.array_equal(new, codes)
    codes[1, 0, 0] = 8  # out of range for K = 8: the kernel must refuse, not read past the codebook
    with pytest.raises(Exception, match="code out of range"):
        _search(w, h, codebooks, codes, scales, beam_size=2, impl="native")


@needs_native
@pytest.mark.parametrize("n,k,d", [(300, 7, 3), (4096, 256, 8), (50, 33, 16)])
def test_native_nearest_matches_brute_force(rng, n, k, d):
    """The native k-means assignment is the exact argmin (ties to the smaller index)."""
    points = rng.standard_normal((n, d)).astype(np.float32)
    centroids = rng.standard_normal((k, d)).astype(np.float32)
    centroids[5] = centroids[2]  # an exact tie: index 2 must win
    got = np.asarray(jax.jit(native_kernels.nearest)(jnp.asarray(points), jnp.asarray(centroids)))
    scores = np.sum(centroids * centroids, axis=1)[None] - 2.0 * points @ centroids.T
    np.testing.assert_array_equal(got, np.argmin(scores, axis=1))
    assert not np.any(got == 5)
    ref = np.asarray(km.assign_all(jnp.asarray(points), jnp.asarray(centroids)))
    assert np.mean(got == ref) > 0.99  # the XLA path ranks by keys with >= 15 mantissa bits


def test_kmeans_nearest_and_lloyd(rng):
    points = rng.standard_normal((300, 3)).astype(np.float32)
    centroids = rng.standard_normal((7, 3)).astype(np.float32)
    idx = np.asarray(km.assign_all(jnp.asarray(points), jnp.asarray(centroids)))
    dist = ((points[:, None, :] - centroids[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(idx, dist.argmin(1))
    # Lloyd never increases the k-means objective.
    init = jnp.asarray(points[:7])
    fitted = np.asarray(km.lloyd(jnp.asarray(points), init, 5))

    def inertia(c: np.ndarray) -> float:
        return float(((points[:, None, :] - c[None]) ** 2).sum(-1).min(1).sum())

    assert inertia(fitted) < inertia(points[:7])


def _lloyd_np(points: np.ndarray, init: np.ndarray, iters: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact Lloyd in float64: assign every point, move every centroid, repeat."""
    x, c = points.astype(np.float64), init.astype(np.float64)

    def assign(c: np.ndarray) -> np.ndarray:
        return ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)

    for _ in range(iters):
        a = assign(c)
        for j in range(len(c)):
            if np.any(a == j):
                c[j] = x[a == j].mean(0)
    return c, assign(c)


@needs_native
@pytest.mark.parametrize("n,k,d,iters", [(400, 7, 3, 0), (400, 7, 3, 1), (2000, 64, 8, 30), (3000, 300, 4, 12)])
def test_native_lloyd_matches_exact_lloyd(rng, n, k, d, iters):
    """Hamerly's bounds skip distance computations, never change the iterates."""
    centers = rng.standard_normal((k, d)) * 3.0  # clustered data, so most points settle early
    points = (centers[rng.integers(0, k, n)] + rng.standard_normal((n, d))).astype(np.float32)
    init = points[rng.choice(n, k, replace=False)]
    c, a = jax.jit(native_kernels.lloyd, static_argnums=2)(jnp.asarray(points), jnp.asarray(init), iters)
    ref_c, ref_a = _lloyd_np(points, init, iters)
    np.testing.assert_allclose(np.asarray(c), ref_c, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(a), ref_a)
    # The XLA path of kmeans.fit ranks by packed keys, so a near tie may flip: it reaches
    # the same objective, not necessarily bit-identical centroids.
    xla_c, xla_a = km.fit(jnp.asarray(points), jnp.asarray(init), iters)
    inertia = lambda c, a: float(((points - np.asarray(c)[np.asarray(a)]) ** 2).sum())  # noqa: E731
    assert inertia(xla_c, xla_a) == pytest.approx(inertia(ref_c, ref_a), rel=1e-3)


@needs_native
def test_native_lloyd_rejects_bad_shapes(rng):
    points = jnp.asarray(rng.standard_normal((10, 3)).astype(np.float32))
    with pytest.raises(Exception, match="kmeans_lloyd"):
        native_kernels.lloyd(points, jnp.zeros((4, 2), jnp.float32), 3)


@pytest.fixture(scope="module")
def small_problem():
    return _problem(np.random.default_rng(1), 64, 32)


_SMALL = dict(num_codebooks=2, codebook_bits=4, group_size=4, adam_steps=10, lr=1e-3, max_rounds=4, tolerance=0.0)


def test_quantize_layout_bits_and_quality(small_problem):
    w, h = small_problem
    recipe = jq.AQLM(**_SMALL)
    history: list[dict[str, float]] = []
    q = quantize_aqlm(jnp.asarray(w), jnp.asarray(h), recipe, jax.random.key(0), path="blk/0/w", history=history)
    assert isinstance(q, jq.AdditiveQuantized)
    assert q.codes.shape == (64, 8, 2) and q.codes.dtype == jnp.uint8
    assert q.codebooks.shape == (2, 16, 1, 4) and q.codebooks.dtype == jnp.float16
    assert q.scales.shape == (64, 1, 1, 1) and q.scales.dtype == jnp.float16
    # Decode follows the DESIGN layout exactly.
    ref = additive_decode_np(np.asarray(q.codes), np.asarray(q.codebooks), np.asarray(q.scales))
    np.testing.assert_allclose(np.asarray(q.decode()), ref, rtol=1e-6, atol=1e-7)
    # Honest bits: 2 codes of 4 bits per 4 weights + fp16 codebooks + fp16 scales.
    expected = (64 * 8 * 2 * 4 + 2 * 16 * 4 * 16 + 64 * 16) / (64 * 32)
    assert q.bits_per_weight == pytest.approx(expected)
    # The error history is non-increasing, the search helps, and the result is far
    # better than the k-means start; the stored (fp16) result matches the history.
    errs = [e["rel_error"] for e in history]
    assert sum(1 for e in history if not e.get("refit")) == 5  # the initial error + 4 rounds
    assert all(b <= a * (1 + 1e-5) for a, b in zip(errs, errs[1:]))
    assert errs[-1] < 0.8 * errs[0]
    final = _objective(w, ref, h) / _objective(w, np.zeros_like(w), h)
    assert final == pytest.approx(errs[-1], rel=2e-2)


def test_quantize_in_out_layout_and_method_registry(small_problem):
    w, h = small_problem
    recipe = jq.AQLM(**{**_SMALL, "max_rounds": 1})
    fn = method_for(recipe)
    assert fn is quantize_aqlm
    a = fn(jnp.asarray(w), jnp.asarray(h), recipe, jax.random.key(3), layout="out_in", path="p")
    b = fn(jnp.asarray(w), jnp.asarray(h), recipe, jax.random.key(3), layout="in_out", path="p")
    assert b.shape == (32, 64) and b.layout == "in_out"
    np.testing.assert_array_equal(np.asarray(b.decode()), np.asarray(a.decode()).T)


def test_deterministic_for_a_key(small_problem):
    w, h = small_problem
    recipe = jq.AQLM(**_SMALL)
    run = lambda k: quantize_aqlm(jnp.asarray(w), jnp.asarray(h), recipe, k)  # noqa: E731
    a, b, c = run(jax.random.key(7)), run(jax.random.key(7)), run(jax.random.key(8))
    chex.assert_trees_all_equal(a, b)
    assert not np.array_equal(np.asarray(a.codes), np.asarray(c.codes))
    # Raw uint32 keys work too.
    d = quantize_aqlm(jnp.asarray(w), jnp.asarray(h), recipe, jax.random.PRNGKey(7))
    chex.assert_trees_all_equal(a, d)


def test_round_is_traced_once(small_problem, monkeypatch):
    w, h = small_problem
    chex.clear_trace_counter()
    counted = jax.jit(
        chex.assert_max_traces(qm._round_impl, n=1),
        static_argnames=qm.ROUND_STATIC_ARGNAMES,
        donate_argnums=(1, 2, 3),
    )
    monkeypatch.setattr(qm, "_round", counted)
    history: list[dict[str, float]] = []
    recipe = jq.AQLM(**{**_SMALL, "adam_steps": 2, "lr": 1.5e-3})  # a fresh configuration
    quantize_aqlm(jnp.asarray(w), jnp.asarray(h), recipe, jax.random.key(0), history=history)
    rounds = [e for e in history if not e.get("refit")]
    assert len(rounds) == 1 + recipe.max_rounds  # every round (and the refit) ran through the one trace
    # A second weight of the same shape (the next layer) reuses the compiled round.
    quantize_aqlm(jnp.asarray(w[::-1]), jnp.asarray(h), recipe, jax.random.key(1))


def test_final_refit_keeps_codes_and_never_raises_the_error(small_problem):
    """The closing Adam pass changes codebooks and scales only, and only for the better."""
    w, h = small_problem
    runs = {}
    for refit in (False, True):
        history: list[dict[str, float]] = []
        recipe = jq.AQLM(**{**_SMALL, "final_refit": refit})
        q = quantize_aqlm(jnp.asarray(w), jnp.asarray(h), recipe, jax.random.key(2), history=history)
        err = _objective(w, np.asarray(q.decode_out_in(jnp.float32)), h) / _objective(w, 0 * w, h)
        runs[refit] = (q, history, err)
    (q0, h0, e0), (q1, h1, e1) = runs[False], runs[True]
    np.testing.assert_array_equal(np.asarray(q1.codes), np.asarray(q0.codes))
    assert not any(e.get("refit") for e in h0)
    assert h1[: len(h0)] == h0  # the same rounds, then (if it helped) the refit
    if h1[-1].get("refit"):
        assert h1[-1]["rel_error"] <= h0[-1]["rel_error"]
        assert e1 <= e0 * (1 + 1e-3)  # fp16 storage rounding aside
    else:
        chex.assert_trees_all_equal(q1, q0)


@pytest.mark.parametrize("grad_dtype", ["float32", "bfloat16"])
def test_grad_dtype_reaches_the_same_error(small_problem, grad_dtype):
    """A bfloat16 gradient product changes the Adam steps, not where they lead."""
    w, h = small_problem
    errs = {}
    for dtype in ("float32", grad_dtype):
        q = quantize_aqlm(jnp.asarray(w), jnp.asarray(h), jq.AQLM(**{**_SMALL, "grad_dtype": dtype}), jax.random.key(0))
        errs[dtype] = _objective(w, np.asarray(q.decode_out_in(jnp.float32)), h) / _objective(w, 0 * w, h)
    assert errs[grad_dtype] < 0.2
    np.testing.assert_allclose(errs[grad_dtype], errs["float32"], rtol=0.02)
    assert grad_dtype_mod.resolve_grad_dtype("float32", jax.devices()) == "float32"
    assert grad_dtype_mod.resolve_grad_dtype("auto", jax.devices()) in ("float32", "bfloat16")


def test_auto_grad_dtype_is_measured_once_per_machine(tmp_path, monkeypatch):
    """bfloat16 only where measured clearly faster; the measurement is cached, so a
    machine keeps its choice (and its results) from run to run."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(grad_dtype_mod, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    timings = iter([2.0, 1.1])  # float32 / bfloat16 speedups the "measurements" return
    monkeypatch.setattr(grad_dtype_mod, "_time_products", lambda: next(timings))
    cpu = jax.devices("cpu")
    grad_dtype_mod.bf16_product_speedup.cache_clear()
    assert grad_dtype_mod.resolve_grad_dtype("auto", cpu) == "bfloat16"
    cache = grad_dtype_mod._cache_file()
    assert json.loads(cache.read_text())["speedup"] == 2.0
    grad_dtype_mod.bf16_product_speedup.cache_clear()  # a new process reads the cache
    assert grad_dtype_mod.resolve_grad_dtype("auto", cpu) == "bfloat16"
    cache.write_text("{not json")  # a damaged cache is measured again and rewritten
    grad_dtype_mod.bf16_product_speedup.cache_clear()
    assert grad_dtype_mod.resolve_grad_dtype("auto", cpu) == "float32"  # 1.1 < MIN_SPEEDUP
    assert json.loads(cache.read_text())["speedup"] == 1.1
    # Without a bfloat16 feature nothing is measured.
    monkeypatch.setattr(grad_dtype_mod, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr(grad_dtype_mod, "_time_products", lambda: pytest.fail("measured"))
    grad_dtype_mod.bf16_product_speedup.cache_clear()
    assert grad_dtype_mod.resolve_grad_dtype("auto", cpu) == "float32"
    grad_dtype_mod.bf16_product_speedup.cache_clear()


def test_default_recipe_gives_the_same_codes_on_every_cpu(small_problem, tmp_path, monkeypatch):
    """The default grad_dtype does not depend on how fast this machine multiplies bfloat16."""
    w, h = small_problem
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(grad_dtype_mod, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    codes = []
    for speedup in (4.0, 1.0):  # a CPU with AMX, then one without a fast bfloat16 product
        monkeypatch.setattr(grad_dtype_mod, "_time_products", lambda s=speedup: s)
        grad_dtype_mod.bf16_product_speedup.cache_clear()
        for f in tmp_path.rglob("bf16_product_*.json"):
            f.unlink()
        q = quantize_aqlm(jnp.asarray(w), jnp.asarray(h), jq.AQLM(**_SMALL), jax.random.key(0))
        codes.append(np.asarray(q.codes))
    grad_dtype_mod.bf16_product_speedup.cache_clear()
    assert jq.AQLM().grad_dtype == "float32"
    np.testing.assert_array_equal(codes[0], codes[1])


def test_out_groups_and_wide_codes(small_problem):
    w, h = small_problem
    recipe = jq.AQLM(num_codebooks=1, codebook_bits=9, group_size=4, out_group_size=2, max_rounds=1, adam_steps=2)
    q = quantize_aqlm(jnp.asarray(w), jnp.asarray(h), recipe, jax.random.key(0))
    assert q.codes.shape == (32, 8, 1) and q.codes.dtype == jnp.uint16
    assert q.codebooks.shape == (1, 512, 2, 4) and q.scales.shape == (32, 1, 1, 1)
    ref = additive_decode_np(np.asarray(q.codes), np.asarray(q.codebooks), np.asarray(q.scales))
    np.testing.assert_allclose(np.asarray(q.decode()), ref, rtol=1e-6, atol=1e-7)
    assert _objective(w, ref, h) < 0.5 * _objective(w, np.zeros_like(w), h)


def test_same_codes_on_one_and_four_devices(small_problem):
    w, h = small_problem
    assert jax.device_count() == 4
    recipe = jq.AQLM(**{**_SMALL, "max_rounds": 1})
    one = quantize_aqlm(jnp.asarray(w), jnp.asarray(h), recipe, jax.random.key(5), devices=jax.devices()[:1])
    four = quantize_aqlm(jnp.asarray(w), jnp.asarray(h), recipe, jax.random.key(5))
    np.testing.assert_array_equal(np.asarray(one.codes), np.asarray(four.codes))
    chex.assert_trees_all_close(one.codebooks, four.codebooks, rtol=2e-3, atol=1e-4)
    chex.assert_trees_all_close(one.scales, four.scales, rtol=2e-3)


def test_rows_not_divisible_by_devices_are_padded(rng):
    w, h = _problem(rng, 10, 8)  # 10 rows on 4 devices
    recipe = jq.AQLM(num_codebooks=1, codebook_bits=2, group_size=4, max_rounds=2, adam_steps=2, tolerance=0.0)
    q = quantize_aqlm(jnp.asarray(w), jnp.asarray(h), recipe, jax.random.key(0))
    assert q.codes.shape == (10, 2, 1) and np.isfinite(np.asarray(q.decode())).all()


def test_bad_configs_raise_clear_errors(small_problem):
    w, h = small_problem
    with pytest.raises(ValueError, match="codebook_bits=17"):
        jq.AQLM(codebook_bits=17)
    with pytest.raises(ValueError, match="num_codebooks=0"):
        jq.AQLM(num_codebooks=0)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"d_in=32 is not divisible by group_size=5 at layers/3/up"):
        quantize_aqlm(jnp.asarray(w), jnp.asarray(h), jq.AQLM(group_size=5), key, path="layers/3/up")
    with pytest.raises(ValueError, match=r"d_out=64 is not divisible by out_group_size=3"):
        quantize_aqlm(jnp.asarray(w), jnp.asarray(h), jq.AQLM(group_size=4, out_group_size=3), key)
    with pytest.raises(ValueError, match=r"xtx must have shape \(32, 32\)"):
        quantize_aqlm(jnp.asarray(w), jnp.asarray(h[:16, :16]), jq.AQLM(group_size=4), key)
    bad = w.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="weight at x holds NaN or Inf"):
        quantize_aqlm(jnp.asarray(bad), jnp.asarray(h), jq.AQLM(group_size=4), key, path="x")
    with pytest.raises(TypeError, match="AQLM recipe"):
        quantize_aqlm(jnp.asarray(w), jnp.asarray(h), jq.GPTQ(), key)
    with pytest.raises(ValueError, match="layout"):
        quantize_aqlm(jnp.asarray(w), jnp.asarray(h), jq.AQLM(group_size=4), key, layout="oi")
    with pytest.raises(ValueError, match="grad_dtype='float16'"):
        jq.AQLM(grad_dtype="float16")
    with pytest.raises(ValueError, match="kernels must be one of"):
        quantize_aqlm(jnp.asarray(w), jnp.asarray(h), jq.AQLM(group_size=4), key, kernels="fast")


def test_direct_gradients_match_autodiff(rng):
    from jaxquant.methods.aqlm import codebooks as cbk

    w, h, codebooks, codes, scales = _search_np_inputs(rng, rows=6, og=2, d_in=8, m=2, k=4, ig=4)
    params = {"codebooks": jnp.asarray(codebooks), "scales": jnp.asarray(scales)}
    w3, codes_j, h_j = jnp.asarray(w.reshape(6, 2, 8)), jnp.asarray(codes), jnp.asarray(h)

    def trace_loss(p: dict[str, jax.Array]) -> jax.Array:
        w_hat = jq.AdditiveQuantized(
            codes=codes_j, codebooks=p["codebooks"], scales=p["scales"].reshape(-1, 1, 1, 1), codebook_bits=2, shape=(12, 8)
        ).decode()
        r = w_hat - w3.reshape(12, 8)
        return jnp.trace(r @ h_j @ r.T)

    loss, grads = cbk.loss_and_grads(params, codes_j, w3, h_j)
    np.testing.assert_allclose(float(loss), float(trace_loss(params)), rtol=1e-5)
    chex.assert_trees_all_close(grads, jax.grad(trace_loss)(params), rtol=1e-4, atol=1e-6)
