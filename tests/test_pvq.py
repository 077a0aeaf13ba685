"""PVQ: the pyramid lattice (size, enumeration, pulse search against exhaustive search), the
column loop against a float64 numpy reference, the array type through ``ops.matmul`` and
checkpoints, honest bits, and its error against GPTQ 3-bit."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.methods.pvq import PVQQuantized, lattice
from jaxquant.methods.pvq.quantize import quantize_pvq
from jaxquant.problems import relative_output_error
from jaxquant.recipes_named import named_recipe
from tests.array_checks import check_decode_rows_and_matmul

KEY = jax.random.key(0)


def _all_points(d, k):
    """Every point of the pyramid P(d, K), by brute force."""
    return [p for p in itertools.product(range(-k, k + 1), repeat=d) if sum(map(abs, p)) == k]


def _best_cosine(a, k):
    best = -1.0
    for c in itertools.combinations_with_replacement(range(len(a)), k):
        y = np.bincount(c, minlength=len(a)).astype(np.float64)
        best = max(best, float(a @ y / np.linalg.norm(y)))
    return best


@pytest.mark.parametrize(("d", "k"), [(1, 3), (2, 2), (3, 4), (4, 3), (5, 2), (3, 0)])
def test_count_and_enumeration_round_trip(d, k):
    points = _all_points(d, k)
    assert lattice.count(d, k) == len(points)
    indices = [lattice.index(p) for p in points]
    assert sorted(indices) == list(range(len(points)))  # a bijection onto 0 .. N - 1
    for p, i in zip(points, indices, strict=True):
        assert tuple(lattice.point(i, d, k)) == p


def test_enumeration_round_trips_on_large_pyramids():
    rng = np.random.default_rng(0)
    n = lattice.count(16, 27)
    assert lattice.index_bits(16, 27) == 48 and 2**47 < n <= 2**48
    for i in [0, n - 1, *(int(rng.integers(0, 2**62)) * 7919 % n for _ in range(20))]:
        p = lattice.point(i, 16, 27)
        assert sum(map(abs, p)) == 27 and lattice.index(p) == i
    with pytest.raises(ValueError, match="outside 0"):
        lattice.point(n, 16, 27)


def test_pulse_search_is_the_exact_nearest_point_on_small_cases():
    rng = np.random.default_rng(1)
    search = jax.jit(lattice.nearest_point)  # the pulse count traced: one program per width
    for d in range(2, 7):
        for k in range(1, 9):
            x = rng.standard_t(2, (40, d))
            with jax.enable_x64(True):
                y = np.asarray(search(jnp.asarray(x), jnp.int32(k)))
            assert (np.abs(y).sum(1) == k).all() and (np.sign(y) * np.sign(x) >= 0).all()
            for row, got in zip(x, y, strict=True):
                a = np.abs(row)
                assert a @ np.abs(got) / np.linalg.norm(got) >= _best_cosine(a, k) - 1e-9, (row, got)


def numpy_pvq(q: PVQQuantized, w, h, *, damp):
    """The column loop in float64 with an explicit inverse, directions by exhaustive search,
    on the amplitude grid and column scales of ``q``. Returns the decoded weight."""
    w, h = w.astype(np.float64).copy(), h.astype(np.float64).copy()
    d_out, d_in = w.shape
    d, k = q.group_size, q.pulses_per_group
    grid = np.asarray(q.amplitude_grid, np.float64)
    units = np.asarray(q.column_scales, np.float64) * np.sqrt(d)
    points = np.asarray(_all_points(d, k), np.float64)
    units_of_points = points / np.linalg.norm(points, axis=1, keepdims=True)
    order = np.argsort(-np.diag(h), kind="stable")
    w, h = w[:, order], h[order][:, order]
    h += damp * np.mean(np.diag(h)) * np.eye(d_in)
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    out = np.zeros((d_out, d_in))
    for j in range(d_in):
        col = order[j]
        groups = w[:, j].reshape(-1, d)
        direction = units_of_points[np.argmax(groups @ units_of_points.T, axis=1)]
        amplitude = (groups * direction).sum(1) / units[col]
        level = grid[np.abs(amplitude[:, None] - grid[None]).argmin(1)]
        out[:, col] = (direction * (level * units[col])[:, None]).reshape(-1)
        err = (w[:, j] - out[:, col]) / u[j, j]
        w[:, j:] -= np.outer(err, u[j, j:])
    return out


def _problem(rng, d_out, d_in):
    w = rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)
    x = rng.standard_normal((4 * d_in, d_in)) * np.linspace(0.3, 2.0, d_in)
    return w, x, x.T @ x / len(x)


def test_column_loop_matches_the_numpy_reference_float64():
    rng = np.random.default_rng(2)
    w, _, h = _problem(rng, 16, 40)
    recipe = jq.PVQ(group_size=4, pulses=3, amplitude_bits=3, block_size=16, rotate=False)
    with jax.enable_x64(True):
        q = quantize_pvq(jnp.asarray(w, jnp.float64), jnp.asarray(h, jnp.float64), recipe, KEY)
        got = np.asarray(q.decode_out_in(jnp.float64))
    np.testing.assert_allclose(got, numpy_pvq(q, w, h, damp=recipe.damp), atol=1e-3)


def test_bits_decode_and_matmul():
    rng = np.random.default_rng(3)
    w, _, h = _problem(rng, 32, 48)
    recipe = jq.PVQ(group_size=8, pulses=6, amplitude_bits=2, rotate=False)  # rotated: tests/test_rotations.py
    check_decode_rows_and_matmul(w.astype(np.float32), h.astype(np.float32), recipe, rng, tile=8)
    q = jq.quantize_weight(jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32), recipe)
    assert isinstance(q, PVQQuantized)
    assert q.storage_bits == 4 * 48 * (lattice.index_bits(8, 6) + 2) + 4 * 16 + 48 * 16
    assert "pvq d8 K6 a2" in repr(q)


def test_lower_error_than_gptq_3bit_near_equal_bits():
    rng = np.random.default_rng(4)
    w, x, h = _problem(rng, 64, 128)
    pvq = jq.quantize_weight(jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32), named_recipe("pvq-8x14"))
    gptq = jq.quantize_weight(jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32), jq.GPTQ(bits=3, group_size=64))
    assert pvq.bits_per_weight < gptq.bits_per_weight
    err = {name: relative_output_error(w, np.asarray(q.decode()), x) for name, q in (("pvq", pvq), ("gptq", gptq))}
    assert err["pvq"] < 0.7 * err["gptq"], err


def test_checkpoint_round_trip_and_recipe_checks(tmp_path):
    rng = np.random.default_rng(5)
    w, _, h = _problem(rng, 32, 48)  # the shape and recipe of test_bits_decode_and_matmul: no new compilation
    tree = {"layer": {"kernel": jnp.asarray(w.T, jnp.float32)}}
    recipe = jq.PVQ(group_size=8, pulses=6, amplitude_bits=2, rotate=False)
    q = jq.quantize(tree, {"layer/kernel": jnp.asarray(h, jnp.float32)}, recipe)
    back = jq.io.load(jq.io.save(str(tmp_path / "ck"), q))
    np.testing.assert_array_equal(np.asarray(back["layer"]["kernel"].decode()), np.asarray(q["layer"]["kernel"].decode()))
    assert back["layer"]["kernel"].decode().shape == (48, 32)
    with pytest.raises(ValueError, match="pulses=0"):
        jq.PVQ(pulses=0)
    with pytest.raises(ValueError, match="d_out=12 is not divisible by group_size=8"):
        jq.quantize_weight(jnp.ones((12, 16)), jnp.eye(16), jq.PVQ())
    assert named_recipe("pvq-16x27a3") == jq.PVQ(group_size=16, pulses=27, amplitude_bits=3)


def test_layers_of_one_shape_compile_once():
    from jaxquant import rotations  # noqa: PLC0415
    from jaxquant.methods import gptq  # noqa: PLC0415
    from jaxquant.methods.pvq import quantize as pvq_quantize  # noqa: PLC0415

    rng = np.random.default_rng(6)
    tree, stats = {}, {}
    for name in ("a", "b", "c"):
        w, _, h = _problem(rng, 32, 48)
        tree[name] = {"kernel": jnp.asarray(w.T, jnp.float32)}
        stats[f"{name}/kernel"] = jnp.asarray(h, jnp.float32)
    jitted = (pvq_quantize._amplitude_grid, gptq.column_loop, rotations.rotate_weight, rotations.rotate_statistics)
    before = [f._cache_size() for f in jitted]
    jq.quantize(tree, stats, jq.PVQ(group_size=8, pulses=6, amplitude_bits=2))
    new_programs = [f._cache_size() - b for f, b in zip(jitted, before, strict=True)]
    assert all(n <= 1 for n in new_programs), new_programs  # at most one per function, for three layers
