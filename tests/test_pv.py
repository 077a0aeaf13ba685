"""PV-Tuning transform: V-step subspace and trust region, P step, STE mode, no retrace."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxquant.finetune import pv
from jaxquant.methods.aqlm import reencode as aqlm_reencode
from jaxquant.methods.aqlm.reencode import reencode_additive
from jaxquant.methods.scalar_reencode import reencode_scalar
from jaxquant.qarray import AdditiveQuantized, ScalarQuantized, dequantize


def make_additive(w_out_in: jax.Array, m: int, b: int, g: int, seed: int = 0, layout: str = "out_in",
                  og: int = 1) -> AdditiveQuantized:
    """A small AQLM array fit to ``w`` by sampling codewords from its tiles and encoding."""
    d_out, d_in = w_out_in.shape
    rng = np.random.default_rng(seed)
    tiles = np.asarray(w_out_in).reshape(d_out // og, og, d_in // g, g).transpose(0, 2, 1, 3).reshape(-1, og, g)
    books = tiles[rng.integers(0, len(tiles), size=(m, 2**b))] / m
    codes = jnp.asarray(rng.integers(0, 2**b, size=(d_out // og, d_in // g, m)), jnp.uint8)
    shape = (d_out, d_in) if layout == "out_in" else (d_in, d_out)
    q = AdditiveQuantized(codes, jnp.asarray(books, jnp.float32), jnp.ones((d_out // og, 1, 1, 1), jnp.float32),
                          b, shape, layout)
    idx = jnp.arange(pv.num_groups(q), dtype=jnp.int32)
    for _ in range(2):
        q = _reencode(q, w_out_in, idx)
    return q


_reencode = jax.jit(lambda q, w, idx: reencode_additive(q, w, idx, beam_size=4))


def changed_groups(a: AdditiveQuantized, b: AdditiveQuantized) -> np.ndarray:
    return np.asarray(jnp.any(a.codes != b.codes, axis=-1)).reshape(-1)


def mse_problem(seed: int = 0, layout: str = "out_in"):
    key = jax.random.key(seed)
    w = jax.random.normal(key, (32, 48), jnp.float32) / 7.0
    q = make_additive(w, 2, 4, 4, seed=seed, layout=layout)
    x = jax.random.normal(jax.random.key(seed + 1), (64, 48), jnp.float32)
    y = x @ w.T
    params = {"w": q, "b": jnp.zeros((32,), jnp.float32)}

    def loss_fn(p, x, y):
        wt = p["w"] if layout == "out_in" else p["w"].T
        return jnp.mean((x @ wt.T + p["b"] - y) ** 2)

    return params, loss_fn, x, y


def make_step(tuner, loss_fn, max_traces=None):
    """A jit'd training step; with ``max_traces`` it fails when traced more often than that.

    chex keys its trace count by the call stack at wrapping time, so each test that asks
    for a check counts its own traces (a parametrized test must not ask twice).
    """
    def step(params, state, x, y):
        loss, grads = pv.decoded_value_and_grad(loss_fn)(params, x, y)
        params, state = tuner.update(grads, state, params)
        return params, state, loss

    return jax.jit(step if max_traces is None else chex.assert_max_traces(step, n=max_traces))


# ----------------------------------------------------------------------------- re-encoding


def test_reencode_single_codebook_is_exact_nearest(rng):
    """With M = 1 the beam search is exhaustive: it must return the nearest scaled codeword."""
    books = jnp.asarray(rng.standard_normal((1, 16, 1, 4)), jnp.float32)
    scales = jnp.asarray(rng.uniform(0.5, 2.0, (8, 1, 1, 1)), jnp.float32)
    codes = jnp.asarray(rng.integers(0, 16, (8, 6, 1)), jnp.uint8)
    q = AdditiveQuantized(codes, books, scales, 4, (8, 24))
    target = jnp.asarray(rng.standard_normal((8, 24)), jnp.float32)
    out = jax.jit(lambda q, t: reencode_additive(q, t, jnp.arange(48, dtype=jnp.int32), beam_size=2))(q, target)
    # Reference: brute force over the 16 codewords for every tile.
    t = np.asarray(target).reshape(8, 6, 4)
    cand = np.asarray(scales).reshape(8, 1, 1, 1) * np.asarray(books)[0, :, 0][None, None]  # [8, 1, 16, 4]
    err = ((t[:, :, None, :] - cand) ** 2).sum(-1)
    ref = err.argmin(-1)
    np.testing.assert_array_equal(np.asarray(out.codes)[..., 0], ref)


def test_reencode_subset_only_touches_subset_and_never_worsens(rng):
    w = jnp.asarray(rng.standard_normal((16, 32)) / 5, jnp.float32)
    q = make_additive(w, 2, 4, 4, og=2)
    target = w + jnp.asarray(rng.standard_normal((16, 32)) * 0.05, jnp.float32)
    idx = jnp.asarray([0, 5, 9, 30, 31], jnp.int32)
    out = _reencode(q, target, idx)
    changed = np.flatnonzero(changed_groups(q, out))
    assert set(changed.tolist()) <= set(np.asarray(idx).tolist())
    dist = jax.jit(pv.group_distances)
    before = np.asarray(dist(q, target))
    after = np.asarray(dist(out, target))
    assert np.all(after <= before + 1e-6)
    assert after[changed].sum() < before[changed].sum() or len(changed) == 0


@pytest.mark.parametrize("force", [False, True])
def test_reencode_in_chunks_matches_one_piece(rng, monkeypatch, force):
    """Groups are searched SEARCH_CHUNK at a time (padded): the codes must not depend on it."""
    w = jnp.asarray(rng.standard_normal((24, 64)) / 5, jnp.float32)
    q = make_additive(w, 2, 4, 4, og=2)  # 12 x 16 = 192 groups
    target = w + jnp.asarray(rng.standard_normal((24, 64)) * 0.1, jnp.float32)
    idx = jnp.asarray(rng.permutation(192)[:150], jnp.int32)

    def run():  # a fresh trace each time: the chunk size is read when tracing
        return jax.jit(lambda q, t, i: reencode_additive(q, t, i, beam_size=4, force=force))(q, target, idx)

    whole = run()
    monkeypatch.setattr(aqlm_reencode, "SEARCH_CHUNK", 64)  # 150 groups: 3 chunks, the last one padded
    chunked = run()
    np.testing.assert_array_equal(np.asarray(chunked.codes), np.asarray(whole.codes))
    assert changed_groups(q, whole).any()  # the comparison is not between two no-ops


def test_reencode_scalar_matches_rounding(rng):
    codes = jnp.asarray(rng.integers(0, 4, (4, 16)), jnp.uint8)
    scales = jnp.asarray(rng.uniform(0.1, 0.3, (4, 2)), jnp.float32)
    zeros = jnp.asarray(rng.uniform(0.5, 2.5, (4, 2)), jnp.float32)
    q = ScalarQuantized(codes, scales, zeros, 2, 8, (4, 16))
    target = jnp.asarray(rng.standard_normal((4, 16)) * 0.3, jnp.float32)
    out = jax.jit(lambda q, t: reencode_scalar(q, t, jnp.arange(64, dtype=jnp.int32)))(q, target)
    s = np.repeat(np.asarray(scales), 8, 1)
    z = np.repeat(np.asarray(zeros), 8, 1)
    ref = np.clip(np.round(np.asarray(target) / s + z), 0, 3)
    # Where rounding ties the old code, either is fine; elsewhere the nearest grid point.
    dec = lambda c: (c - z) * s  # noqa: E731
    np.testing.assert_allclose(np.abs(dec(np.asarray(out.codes, np.float64)) - np.asarray(target)),
                               np.abs(dec(ref) - np.asarray(target)), atol=1e-6)


def _brute_directional_move(q, target, idx):
    """Reference for ``force``: over every one-code change of each tile whose change has a
    positive inner product with ``target - Ŵ``, the one closest to ``target`` (None: none)."""
    m, k_book, og, ig = q.codebooks.shape
    books = np.asarray(q.codebooks, np.float64)
    codes = np.asarray(q.codes).reshape(-1, m)
    scales = np.asarray(q.scales, np.float64).reshape(-1)
    n_ig = q.d_in // ig
    tiles = np.asarray(target, np.float64).reshape(q.d_out // og, og, n_ig, ig)
    tiles = tiles.transpose(0, 2, 1, 3).reshape(-1, og, ig)
    out = {}
    for g in np.asarray(idx).tolist():
        s, t, cur = scales[g // n_ig], tiles[g], codes[g]
        old = s * sum(books[j, cur[j]] for j in range(m))
        best = None
        for j in range(m):
            for a in range(k_book):
                if a == cur[j]:
                    continue
                new = old + s * (books[j, a] - books[j, cur[j]])
                if np.sum((new - old) * (t - old)) > 0:
                    err = np.sum((new - t) ** 2)
                    if best is None or err < best[0]:
                        best = (err, j, a)
        out[g] = best
    return out


def test_directional_move_matches_brute_force(rng):
    """Single codebook: ``force`` must give exactly the closest codeword on the buffer's
    side; two codebooks: the result moves along the direction and is at least as close to
    the target as the best one-code move (the beam search may find a two-code one)."""
    for m in (1, 2):
        books = jnp.asarray(rng.standard_normal((m, 16, 1, 4)) / m, jnp.float32)
        scales = jnp.asarray(rng.uniform(0.5, 2.0, (8, 1, 1, 1)) * rng.choice([-1, 1], (8, 1, 1, 1)), jnp.float32)
        codes = jnp.asarray(rng.integers(0, 16, (8, 6, m)), jnp.uint8)
        q = AdditiveQuantized(codes, books, scales, 4, (8, 24))
        # A small step from the current decoding: the old codes are almost always the nearest.
        target = q.decode_out_in() + jnp.asarray(rng.standard_normal((8, 24)) * 0.05, jnp.float32)
        idx = jnp.arange(48, dtype=jnp.int32)
        out = jax.jit(lambda q, t, i: reencode_additive(q, t, i, beam_size=4, force=True))(q, target, idx)
        plain = jax.jit(lambda q, t, i: reencode_additive(q, t, i, beam_size=4))(q, target, idx)
        ref = _brute_directional_move(q, target, idx)
        old_tiles = np.asarray(q.decode_out_in()).reshape(8, 6, 4)
        new_tiles = np.asarray(out.decode_out_in()).reshape(8, 6, 4)
        t = np.asarray(target).reshape(8, 6, 4)
        new_codes = np.asarray(out.codes).reshape(48, m)
        for g, best in ref.items():
            o, i = divmod(g, 6)
            if best is None:
                np.testing.assert_array_equal(new_codes[g], np.asarray(q.codes).reshape(48, m)[g])
                continue
            delta = new_tiles[o, i] - old_tiles[o, i]
            assert np.sum(delta * (t[o, i] - old_tiles[o, i])) > 0, g
            err = np.sum((new_tiles[o, i] - t[o, i]) ** 2)
            if m == 1:
                assert new_codes[g, 0] == best[2], g
            assert err <= best[0] + 1e-5, (g, err, best[0])
        moved = changed_groups(q, out).sum()
        assert moved > changed_groups(q, plain).sum()  # forcing moves what plain search keeps
        assert moved >= 40  # nearly every tile has a codeword on the buffer's side


def test_forced_scalar_moves_at_least_one_step_toward_target(rng):
    codes = jnp.asarray(rng.integers(0, 4, (4, 16)), jnp.uint8)
    scales = jnp.asarray(rng.uniform(0.1, 0.3, (4, 2)) * rng.choice([-1, 1], (4, 2)), jnp.float32)
    zeros = jnp.asarray(rng.uniform(0.5, 2.5, (4, 2)), jnp.float32)
    q = ScalarQuantized(codes, scales, zeros, 2, 8, (4, 16))
    w = q.decode_out_in()
    target = w + jnp.asarray(rng.standard_normal((4, 16)) * 0.01, jnp.float32)  # less than half a step
    out = jax.jit(lambda q, t: reencode_scalar(q, t, jnp.arange(64, dtype=jnp.int32), force=True))(q, target)
    old, new = np.asarray(codes, np.int64), np.asarray(out.codes, np.int64)
    level = (np.asarray(target) / np.repeat(np.asarray(scales), 8, 1)) + np.repeat(np.asarray(zeros), 8, 1)
    want = np.clip(old + np.sign(level - old).astype(np.int64), 0, 3)  # one grid step, stopped at the ends
    np.testing.assert_array_equal(new, want)
    moved = new != old
    assert moved.sum() > 32
    # Every move goes along target - Ŵ in weight space, whatever the scale's sign.
    assert np.all((np.asarray(out.decode_out_in() - w) * np.asarray(target - w))[moved] > 0)


# ----------------------------------------------------------------------------- V step


@pytest.mark.parametrize("fraction", [0.02, 0.1])
def test_v_step_changes_at_most_fraction(fraction):
    params, loss_fn, x, y = mse_problem()
    n = pv.num_groups(params["w"])
    k = pv.num_selected(n, fraction)
    # A frozen P step isolates the V step; a large buffer step makes many groups want to move.
    tuner = pv.pv_tuning(optax.sgd(0.0), optax.sgd(20.0), pv.VStep(update_fraction=fraction))
    state = tuner.init(params)
    step = make_step(tuner, loss_fn)
    total = 0
    for _ in range(4):
        new, state, _ = step(params, state, x, y)
        changed = changed_groups(params["w"], new["w"])
        assert changed.sum() <= k, (changed.sum(), k)
        total += changed.sum()
        params = new
    assert total > 0  # the V step did act


def test_v_step_changes_only_furthest_moved_groups():
    params, loss_fn, x, y = mse_problem()
    tuner = pv.pv_tuning(optax.sgd(0.0), optax.sgd(20.0), pv.VStep(update_fraction=0.05))
    state = tuner.init(params)
    _, grads = pv.decoded_value_and_grad(loss_fn)(params, x, y)
    buffer = state.buffers["w"][0] - 20.0 * grads["w"]
    k = pv.num_selected(pv.num_groups(params["w"]), 0.05)
    top = set(np.argsort(-np.asarray(pv.group_distances(params["w"], buffer)))[:k].tolist())
    new, _ = jax.jit(tuner.update)(grads, state, params)
    changed = set(np.flatnonzero(changed_groups(params["w"], new["w"])).tolist())
    assert changed and changed <= top


@pytest.mark.parametrize("trust_ratio", [0.02, 0.05])
def test_trust_ratio_bounds_the_change(trust_ratio):
    params, loss_fn, x, y = mse_problem()
    free = pv.pv_tuning(optax.sgd(0.0), optax.sgd(50.0), pv.VStep(update_fraction=0.5))
    bound = pv.pv_tuning(optax.sgd(0.0), optax.sgd(50.0), pv.VStep(update_fraction=0.5, trust_ratio=trust_ratio))
    w0 = params["w"].decode_out_in()
    norm0 = float(jnp.linalg.norm(w0))
    _, grads = pv.decoded_value_and_grad(loss_fn)(params, x, y)
    unbounded, _ = jax.jit(free.update)(grads, free.init(params), params)
    bounded, _ = jax.jit(bound.update)(grads, bound.init(params), params)
    free_ratio = float(jnp.linalg.norm(unbounded["w"].decode_out_in() - w0)) / norm0
    ratio = float(jnp.linalg.norm(bounded["w"].decode_out_in() - w0)) / norm0
    assert free_ratio > trust_ratio  # the bound is active in this test
    assert ratio <= trust_ratio * (1 + 1e-5)
    assert changed_groups(params["w"], bounded["w"]).sum() >= 1


@pytest.mark.parametrize("trust_ratio", [None, 0.1])
def test_forced_v_step_moves_small_steps_within_fraction_and_trust_ratio(trust_ratio):
    """With a buffer step too small for the plain V step to move any code, ``force_update``
    still moves selected groups: only the furthest-moved ones, at most the fraction, each
    along the buffer's direction, within the trust ratio; buffers reset (decay 1)."""
    params, loss_fn, x, y = mse_problem()
    kwargs = dict(update_fraction=0.1, trust_ratio=trust_ratio, buffer_decay=1.0)
    plain = pv.pv_tuning(optax.sgd(0.0), optax.sgd(1e-3), pv.VStep(**kwargs))
    forced = pv.pv_tuning(optax.sgd(0.0), optax.sgd(1e-3), pv.VStep(force_update=True, **kwargs))
    _, grads = pv.decoded_value_and_grad(loss_fn)(params, x, y)
    state = forced.init(params)
    w0 = params["w"].decode_out_in()
    buffer = state.buffers["w"][0] - 1e-3 * grads["w"]
    n = pv.num_groups(params["w"])
    k = pv.num_selected(n, 0.1)
    top = set(np.argsort(-np.asarray(pv.group_distances(params["w"], buffer)))[:k].tolist())
    kept, _ = jax.jit(plain.update)(grads, plain.init(params), params)
    new, state = jax.jit(forced.update)(grads, state, params)
    assert changed_groups(params["w"], kept["w"]).sum() == 0  # the plain V step keeps every code
    changed = np.flatnonzero(changed_groups(params["w"], new["w"]))
    assert 1 <= len(changed) <= k and set(changed.tolist()) <= top
    w1 = new["w"].decode_out_in()
    delta, direction = np.asarray(w1 - w0), np.asarray(buffer - w0)
    for g in changed:  # tiles of 1 x 4 in a 32 x 48 layer: 12 per row
        o, i = divmod(int(g), 12)
        assert np.sum(delta[o, 4 * i:4 * i + 4] * direction[o, 4 * i:4 * i + 4]) > 0
    if trust_ratio is not None:
        assert len(changed) < k  # the bound is active
        assert float(jnp.linalg.norm(w1 - w0)) <= trust_ratio * float(jnp.linalg.norm(w0)) * (1 + 1e-5)
    np.testing.assert_allclose(np.asarray(state.buffers["w"][0]), np.asarray(w1), atol=1e-6)


@pytest.mark.parametrize("decay", [0.0, 0.3, 1.0])
def test_buffer_decay_pulls_buffers_to_the_new_decoding(decay):
    params, loss_fn, x, y = mse_problem()
    tuner = pv.pv_tuning(optax.sgd(0.0), optax.sgd(20.0), pv.VStep(update_fraction=0.1, buffer_decay=decay))
    state = tuner.init(params)
    _, grads = pv.decoded_value_and_grad(loss_fn)(params, x, y)
    moved = state.buffers["w"][0] - 20.0 * grads["w"]  # the buffer before the V step
    new, state = jax.jit(tuner.update)(grads, state, params)
    assert changed_groups(params["w"], new["w"]).sum() > 0
    decoded = new["w"].decode_out_in()
    want = decoded + (1.0 - decay) * (moved - decoded)
    np.testing.assert_allclose(np.asarray(state.buffers["w"][0]), np.asarray(want), atol=1e-6)


def test_p_step_alone_leaves_codes_unchanged():
    params, loss_fn, x, y = mse_problem()
    tuner = pv.pv_tuning(optax.adam(1e-2), optax.adam(1e-2), every=1000)
    state = tuner.init(params)
    step = make_step(tuner, loss_fn)
    codes0, books0 = params["w"].codes, params["w"].codebooks
    losses = []
    for _ in range(10):
        params, state, loss = step(params, state, x, y)
        losses.append(float(loss))
    np.testing.assert_array_equal(np.asarray(params["w"].codes), np.asarray(codes0))
    assert float(jnp.max(jnp.abs(params["w"].codebooks - books0))) > 1e-3
    assert losses[-1] < 0.8 * losses[0]


def test_p_gradients_match_autodiff_through_decode():
    params, loss_fn, x, y = mse_problem(layout="in_out")
    _, grads = pv.decoded_value_and_grad(loss_fn)(params, x, y)
    got = pv.continuous_grads(grads, params)

    def direct(books, scales, b):
        q = params["w"]
        q = AdditiveQuantized(q.codes, books, scales, q.codebook_bits, q.shape, q.layout)
        return loss_fn({"w": q.decode(), "b": b}, x, y)

    ref = jax.grad(direct, argnums=(0, 1, 2))(params["w"].codebooks, params["w"].scales, params["b"])
    chex.assert_trees_all_close((got["w"].codebooks, got["w"].scales, got["b"]), ref, rtol=1e-5, atol=1e-7)
    assert got["w"].codes is None


def test_ste_mode_reencodes_every_group_from_buffer(rng):
    w = jnp.asarray(rng.standard_normal((8, 16)) / 4, jnp.float32)
    books = jnp.asarray(rng.standard_normal((1, 16, 1, 4)) / 4, jnp.float32)
    q = AdditiveQuantized(jnp.zeros((8, 4, 1), jnp.uint8), books, jnp.ones((8, 1, 1, 1), jnp.float32), 4, (8, 16))
    params = {"w": q}
    grads = {"w": jnp.asarray(rng.standard_normal((8, 16)), jnp.float32)}
    tuner = pv.pv_tuning(optax.sgd(0.0), optax.sgd(0.3), pv.VStep(mode="ste"))
    state = tuner.init(params)
    new, state = jax.jit(tuner.update)(grads, state, params)
    buffer = q.decode_out_in() - 0.3 * grads["w"]
    np.testing.assert_allclose(np.asarray(state.buffers["w"][0]), np.asarray(buffer), atol=1e-6)
    ref = jax.jit(lambda q, b: reencode_additive(q, b, jnp.arange(32, dtype=jnp.int32), beam_size=8))(q, buffer)
    np.testing.assert_array_equal(np.asarray(new["w"].codes), np.asarray(ref.codes))
    assert changed_groups(q, new["w"]).sum() > 16  # far more than any 1% subspace
    del w


def test_scalar_v_step_changes_at_most_fraction(rng):
    codes = jnp.asarray(rng.integers(0, 4, (16, 32)), jnp.uint8)
    q = ScalarQuantized(codes, jnp.full((16, 2), 0.1, jnp.float32), None, 2, 16, (32, 16), "in_out")
    params = {"k": q}
    grads = {"k": jnp.asarray(rng.standard_normal((32, 16)), jnp.float32)}
    tuner = pv.pv_tuning(optax.sgd(0.0), optax.sgd(1.0), pv.VStep(update_fraction=0.05))
    new, _ = jax.jit(tuner.update)(grads, tuner.init(params), params)
    n_changed = int(jnp.sum(new["k"].codes != codes))
    assert 0 < n_changed <= pv.num_selected(512, 0.05)


def test_every_and_no_retrace():
    params, loss_fn, x, y = mse_problem()
    tuner = pv.pv_tuning(optax.adam(1e-3), optax.adam(1e-2), pv.VStep(update_fraction=0.05), every=2)
    state = tuner.init(params)
    step = make_step(tuner, loss_fn, max_traces=1)

    changes = []
    for _ in range(6):
        new, state, _ = step(params, state, x, y)
        changes.append(int(changed_groups(params["w"], new["w"]).sum()))
        params = new
    assert int(state.count) == 6
    assert changes[0] == changes[2] == changes[4] == 0  # V step on updates 2, 4, 6 only
    assert sum(changes) > 0


def test_dtypes_preserved_and_master_is_float32():
    params, loss_fn, x, y = mse_problem()
    q = params["w"]
    params = {"w": AdditiveQuantized(q.codes, q.codebooks.astype(jnp.float16), q.scales.astype(jnp.float16),
                                     q.codebook_bits, q.shape), "b": params["b"]}
    tuner = pv.pv_tuning(optax.adam(1e-3), optax.adam(1e-3))
    state = tuner.init(params)
    assert state.master["w"].codebooks.dtype == jnp.float32
    new, state, _ = make_step(tuner, loss_fn)(params, state, x, y)
    assert new["w"].codebooks.dtype == jnp.float16 and new["w"].codes.dtype == jnp.uint8
    assert jax.tree.structure(new) == jax.tree.structure(params)


def test_p_step_composes_with_optax_wrappers():
    """The P step is an ordinary optax transform: MultiSteps accumulates, apply_if_finite skips."""
    params, loss_fn, x, y = mse_problem()
    _, grads = pv.decoded_value_and_grad(loss_fn)(params, x, y)
    frozen_v = optax.sgd(0.0)

    tuner = pv.pv_tuning(optax.MultiSteps(optax.sgd(0.1), every_k_schedule=2), frozen_v, every=1000)
    state = tuner.init(params)
    first, state = tuner.update(grads, state, params)
    second, state = tuner.update(grads, state, first)
    np.testing.assert_array_equal(np.asarray(first["w"].codebooks), np.asarray(params["w"].codebooks))
    assert not np.array_equal(np.asarray(second["w"].codebooks), np.asarray(params["w"].codebooks))

    tuner = pv.pv_tuning(optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=3), frozen_v, every=1000)
    nan_grads = jax.tree.map(lambda g: g * jnp.nan, grads)
    out, _ = tuner.update(nan_grads, tuner.init(params), params)
    np.testing.assert_array_equal(np.asarray(out["w"].codebooks), np.asarray(params["w"].codebooks))
    np.testing.assert_array_equal(np.asarray(out["b"]), np.asarray(params["b"]))


def test_v_step_is_a_pure_function_of_the_tree_and_buffers():
    params, loss_fn, x, y = mse_problem()
    _, grads = pv.decoded_value_and_grad(loss_fn)(params, x, y)
    buffers = pv.straight_through_buffers(params)
    buffers = {k: b - 20.0 * grads["w"][None] for k, b in buffers.items()}
    config = pv.VStep(update_fraction=0.05)
    new, same_buffers = jax.jit(pv.v_step, static_argnums=2)(params, buffers, config)
    k = pv.num_selected(pv.num_groups(params["w"]), 0.05)
    changed = changed_groups(params["w"], new["w"])
    assert 0 < changed.sum() <= k
    np.testing.assert_array_equal(np.asarray(new["w"].codebooks), np.asarray(params["w"].codebooks))
    chex.assert_trees_all_equal(same_buffers, buffers)  # no buffer decay
    # The transform's V step is this function: a frozen P step and a buffer step to the same place.
    tuner = pv.pv_tuning(optax.sgd(0.0), optax.sgd(20.0), config)
    via_tuner, _ = jax.jit(tuner.update)(grads, tuner.init(params), params)
    np.testing.assert_array_equal(np.asarray(via_tuner["w"].codes), np.asarray(new["w"].codes))


def test_bad_arguments():
    for kwargs in (dict(update_fraction=0.0), dict(update_fraction=1.5), dict(trust_ratio=0.0),
                   dict(mode="both"), dict(beam_size=0), dict(buffer_decay=2.0),
                   dict(force_update=True, mode="ste")):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            pv.VStep(**kwargs)
    with pytest.raises(ValueError, match="every=0"):
        pv.pv_tuning(optax.sgd(0.1), optax.sgd(0.1), every=0)
    with pytest.raises(TypeError, match="VStep"):
        pv.pv_tuning(optax.sgd(0.1), optax.sgd(0.1), 0.05)
    tuner = pv.pv_tuning(optax.sgd(0.1), optax.sgd(0.1))
    with pytest.raises(ValueError, match="no quantized"):
        tuner.init({"w": jnp.zeros((4, 4), jnp.float32)})
    params, _, _, _ = mse_problem()
    with pytest.raises(ValueError, match="structure"):
        tuner.update({"x": jnp.zeros(3, jnp.float32)}, tuner.init(params), params)


def test_dequantize_tree_matches_grads_structure():
    params, loss_fn, x, y = mse_problem()
    _, grads = pv.decoded_value_and_grad(loss_fn)(params, x, y)
    assert jax.tree.structure(grads) == jax.tree.structure(dequantize(params))


def test_init_state_shares_no_buffer_with_the_tree():
    # A step may donate the tree and the state together: no array may be in both.
    params, loss_fn, x, y = mse_problem()  # "b" is float32, the case asarray would hand back
    state = pv.pv_tuning(optax.adam(1e-3), optax.adam(1e-3)).init(params)
    tree_ptrs = {a.unsafe_buffer_pointer() for a in jax.tree.leaves(params)}
    assert not tree_ptrs & {a.unsafe_buffer_pointer() for a in jax.tree.leaves(state)}
    assert state.master["b"] is None  # a float32 leaf is its own master: no copy of it in the state


def test_adam_without_first_moment_equals_optax_adam_and_keeps_no_first_moment(rng):
    params = {"w": jnp.asarray(rng.standard_normal((8, 6)), jnp.float32)}
    lean, ref = pv.adam(1e-2, b1=0.0, b2=0.95), optax.adam(1e-2, b1=0.0, b2=0.95)
    s_lean, s_ref = lean.init(params), ref.init(params)
    for _ in range(4):
        g = {"w": jnp.asarray(rng.standard_normal((8, 6)), jnp.float32)}
        with jax.numpy_dtype_promotion("standard"):  # as pv_tuning runs its optimizers
            u_lean, s_lean = lean.update(g, s_lean, params)
            u_ref, s_ref = ref.update(g, s_ref, params)
        np.testing.assert_allclose(np.asarray(u_lean["w"]), np.asarray(u_ref["w"]), rtol=1e-5, atol=1e-7)
    state_bytes = {name: sum(x.nbytes for x in jax.tree.leaves(s)) for name, s in (("lean", s_lean), ("ref", s_ref))}
    assert state_bytes["lean"] < 0.6 * state_bytes["ref"], state_bytes  # nu only
    assert optax.tree_utils.tree_get(s_lean, "nu")["w"].shape == (8, 6)  # metric="adam" finds it
    with pytest.raises(ValueError, match="b1"):
        pv.adam(1e-3, b1=1.0)
