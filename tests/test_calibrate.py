"""Calibration: XᵀX equals the explicit product of captured inputs, on 1 and 4 devices."""

from __future__ import annotations

import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant.calibrate import calibrate
from jaxquant.stats import LayerStats

D_IN, D_HID, D_OUT = 6, 8, 5


def _np_xtx(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    return x.T @ x


def _batches(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> list[np.ndarray]:
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]


def _assert_stats(stats: dict[str, LayerStats], expected: dict[str, np.ndarray], tokens: dict[str, int]) -> None:
    assert sorted(stats) == sorted(expected)
    for path, xtx in expected.items():
        np.testing.assert_allclose(np.asarray(stats[path].xtx, np.float64), xtx, rtol=2e-5, atol=2e-4, err_msg=path)
        assert int(stats[path].count) == tokens[path], path
        assert stats[path].xtx.dtype == jnp.float32


# --- NNX ---------------------------------------------------------------------------


class NNXMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.up = nnx.Linear(D_IN, D_HID, rngs=rngs)
        self.down = nnx.Linear(D_HID, D_OUT, rngs=rngs)
        self.norm = nnx.LayerNorm(D_IN, rngs=rngs)

    def hidden(self, x: jax.Array) -> jax.Array:
        return jax.nn.gelu(self.up(self.norm(x)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(self.hidden(x))


def _nnx_expected(model: NNXMLP, batches: list[np.ndarray]) -> tuple[dict, dict]:
    xs_up = [np.asarray(model.norm(jnp.asarray(b))) for b in batches]
    xs_down = [np.asarray(model.hidden(jnp.asarray(b))) for b in batches]
    expected = {
        "up/kernel": sum(_np_xtx(x) for x in xs_up),
        "down/kernel": sum(_np_xtx(x) for x in xs_down),
    }
    tokens = sum(int(np.prod(b.shape[:-1])) for b in batches)
    return expected, {"up/kernel": tokens, "down/kernel": tokens}


def test_nnx_mlp_matches_numpy(rng):
    model = NNXMLP(nnx.Rngs(0))
    batches = _batches(rng, 3, (8, 3, D_IN))  # leading dims (batch, seq) are flattened
    stats = calibrate(model, batches)
    expected, tokens = _nnx_expected(model, batches)
    _assert_stats(stats, expected, tokens)
    # Keys are paths within nnx.state(model): they address the kernels there.
    state_paths = {p for p, _ in jq.select.flatten_with_paths(nnx.state(model))}
    assert set(stats) <= state_paths


def test_nnx_module_as_params_with_custom_call(rng):
    model = NNXMLP(nnx.Rngs(1))
    batches = _batches(rng, 2, (4, D_IN))
    stats = calibrate(lambda m, b: m(b), model, batches)
    expected, tokens = _nnx_expected(model, batches)
    _assert_stats(stats, expected, tokens)


def test_nnx_linear_general_flattens_contracted_axes(rng):
    # Contract axes (1, 2) of a [B, 3, 4, 2] input: d_in = 12, in kernel order (3, 4).
    layer = nnx.LinearGeneral((3, 4), 5, axis=(1, 2), rngs=nnx.Rngs(0))
    batches = _batches(rng, 2, (4, 3, 4, 2))
    stats = calibrate(layer, batches, where=lambda p, leaf: p == "kernel")
    xs = [np.transpose(b, (0, 3, 1, 2)).reshape(-1, 12) for b in batches]
    _assert_stats(stats, {"kernel": sum(_np_xtx(x) for x in xs)}, {"kernel": 16})


# --- Linen -------------------------------------------------------------------------


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.gelu(nn.Dense(D_HID, name="up")(x))
        h = nn.DenseGeneral(D_HID, axis=-1, name="gate")(h)
        return nn.Dense(D_OUT, name="down")(jnp.tanh(h))


def test_linen_mlp_dense_and_dense_general(rng):
    module = LinenMLP()
    variables = module.init(jax.random.key(0), jnp.zeros((1, D_IN), jnp.float32))
    batches = _batches(rng, 3, (4, 2, D_IN))
    stats = calibrate(lambda v, b: module.apply(v, b), variables, batches)

    p = variables["params"]
    expected = {"params/up/kernel": 0.0, "params/gate/kernel": 0.0, "params/down/kernel": 0.0}
    for b in batches:
        h = jax.nn.gelu(b @ p["up"]["kernel"] + p["up"]["bias"])
        g = h @ p["gate"]["kernel"] + p["gate"]["bias"]
        expected["params/up/kernel"] += _np_xtx(b)
        expected["params/gate/kernel"] += _np_xtx(np.asarray(h))
        expected["params/down/kernel"] += _np_xtx(np.asarray(jnp.tanh(g)))
    _assert_stats(stats, expected, dict.fromkeys(expected, 24))


def test_linen_dense_general_multi_axis(rng):
    # Contract axes (1, 3) of a [B, 3, 2, 4] input; the 3-D kernel (3, 4, 5) is chosen by `where`.
    module = nn.DenseGeneral(5, axis=(1, 3))
    variables = module.init(jax.random.key(0), jnp.zeros((1, 3, 2, 4), jnp.float32))
    batches = _batches(rng, 2, (4, 3, 2, 4))
    stats = calibrate(lambda v, b: module.apply(v, b), variables, batches, where="kernel", progress=True)
    xs = [np.transpose(b, (0, 2, 1, 3)).reshape(-1, 12) for b in batches]
    _assert_stats(stats, {"params/kernel": sum(_np_xtx(x) for x in xs)}, {"params/kernel": 16})


def test_linen_params_subtree_keys(rng):
    # Handing only variables["params"] gives keys relative to it.
    module = LinenMLP()
    params = module.init(jax.random.key(0), jnp.zeros((1, D_IN), jnp.float32))["params"]
    stats = calibrate(lambda p, b: module.apply({"params": p}, b), params, _batches(rng, 1, (4, D_IN)))
    assert sorted(stats) == ["down/kernel", "gate/kernel", "up/kernel"]


# --- jaxquant.ops.matmul ---------------------------------------------------------


def _ops_model(params: dict, x: jax.Array) -> jax.Array:
    h = jax.nn.relu(jq.ops.matmul(x, params["w1"]))
    h = jq.ops.matmul(h, params["w1b"])  # same input shape, different kernel
    return jq.ops.matmul(h, params["w2"])


class OpsLinear(nnx.Linear):
    """An nnx.Linear that computes through ops.matmul and also calls super(): counted once."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jq.ops.matmul(x, self.kernel[...]) + 0.0 * super().__call__(x)


def test_ops_matmul_model(rng):
    params = {
        "w1": jnp.asarray(rng.standard_normal((D_IN, D_HID)), jnp.float32),
        "w1b": jnp.asarray(rng.standard_normal((D_HID, D_HID)), jnp.float32),
        "w2": jnp.asarray(rng.standard_normal((D_HID, D_OUT)), jnp.float32),
    }
    batches = _batches(rng, 3, (4, 3, D_IN))
    stats = calibrate(_ops_model, params, batches, where=lambda p, leaf: leaf.ndim == 2)
    expected = {"w1": 0.0, "w1b": 0.0, "w2": 0.0}
    for b in batches:
        h = np.maximum(b @ np.asarray(params["w1"]), 0)
        expected["w1"] += _np_xtx(b)
        expected["w1b"] += _np_xtx(h)
        expected["w2"] += _np_xtx(h @ np.asarray(params["w1b"]))
    _assert_stats(stats, expected, dict.fromkeys(expected, 36))


def test_layer_captured_by_hook_and_matmul_counts_once(rng):
    layer = OpsLinear(D_IN, D_OUT, rngs=nnx.Rngs(0))
    batches = _batches(rng, 2, (4, D_IN))
    stats = calibrate(layer, batches)
    _assert_stats(stats, {"kernel": sum(_np_xtx(b) for b in batches)}, {"kernel": 8})


def test_token_mask_counts_only_the_marked_rows(rng):
    w = jnp.asarray(rng.standard_normal((D_IN, D_OUT)), jnp.float32)
    batches = _batches(rng, 2, (4, 3, D_IN))

    def fn(p, x):
        mask = x[..., 0] > 0  # rows whose first feature is positive, as a router might pick them
        with jq.ops.token_mask(mask):
            return jq.ops.matmul(x, p["w"])

    stats = calibrate(fn, {"w": w}, batches, where="w")
    kept = [b.reshape(-1, D_IN)[b.reshape(-1, D_IN)[:, 0] > 0] for b in batches]
    _assert_stats(stats, {"w": sum(_np_xtx(k) for k in kept)}, {"w": sum(len(k) for k in kept)})
    assert jq.ops.current_token_mask() is None


def test_layer_called_twice_sums_both_inputs(rng):
    w = jnp.asarray(rng.standard_normal((D_IN, D_IN)), jnp.float32)
    batches = _batches(rng, 2, (4, D_IN))
    stats = calibrate(lambda p, x: jq.ops.matmul(jq.ops.matmul(x, p["w"]), p["w"]), {"w": w}, batches,
                      where="w")
    expected = sum(_np_xtx(b) + _np_xtx(b @ np.asarray(w)) for b in batches)
    _assert_stats(stats, {"w": expected}, {"w": 16})


# --- devices, retracing, dtypes --------------------------------------------------


def test_one_device_equals_four_devices_and_no_retrace(rng):
    assert jax.local_device_count() == 4
    chex.clear_trace_counter()
    model = NNXMLP(nnx.Rngs(0))
    batches = _batches(rng, 5, (8, 4, D_IN))
    # Each Python call of the wrapped function is one trace of the compiled step.
    call4 = chex.assert_max_traces(lambda m, b: m(b), n=1)
    stats4 = calibrate(call4, model, batches)
    call1 = chex.assert_max_traces(lambda m, b: m(b), n=1)
    stats1 = calibrate(call1, model, batches, devices=jax.local_devices()[:1])
    for p in stats1:
        np.testing.assert_allclose(np.asarray(stats4[p].xtx), np.asarray(stats1[p].xtx), rtol=1e-5, atol=1e-4)
        assert int(stats4[p].count) == int(stats1[p].count) == 5 * 32
    assert len(stats4["up/kernel"].xtx.sharding.device_set) == 4
    assert len(stats1["up/kernel"].xtx.sharding.device_set) == 1


def test_gptq_after_four_device_calibration_runs_where_the_weight_is(rng):
    # Regression: statistics replicated over 4 forced host devices made GPTQ run replicated,
    # which hung XLA:CPU after a sharded calibration (the API-tour notebook under CI).
    model = NNXMLP(nnx.Rngs(0))
    batches = _batches(rng, 4, (8, 4, D_IN))
    stats4 = calibrate(model, batches)
    stats1 = calibrate(model, batches, devices=jax.local_devices()[:1])
    assert len(stats4["up/kernel"].xtx.sharding.device_set) == 4
    state = nnx.state(model)
    recipe = jq.GPTQ(bits=3, group_size=D_IN)
    q4 = jq.quantize(state, stats4, recipe, where="up/kernel")["up"]["kernel"].get_value()
    q1 = jq.quantize(state, stats1, recipe, where="up/kernel")["up"]["kernel"].get_value()
    assert q4.codes.sharding.device_set == state["up"]["kernel"].get_value().sharding.device_set
    np.testing.assert_array_equal(np.asarray(q4.codes), np.asarray(q1.codes))


def test_indivisible_batch_falls_back_with_warning(rng):
    model = NNXMLP(nnx.Rngs(0))
    batches = _batches(rng, 2, (8, D_IN)) + _batches(rng, 1, (6, D_IN))
    with pytest.warns(UserWarning, match="does not divide over 4 devices"):
        stats = calibrate(model, batches)
    expected, tokens = _nnx_expected(model, batches)
    _assert_stats(stats, expected, tokens)


def test_no_warning_when_batches_divide(rng):
    model = NNXMLP(nnx.Rngs(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibrate(model, _batches(rng, 2, (4, D_IN)))


def test_float64_accumulation(rng):
    model = NNXMLP(nnx.Rngs(0))
    batches = _batches(rng, 2, (4, D_IN))
    with pytest.raises(ValueError, match="jax_enable_x64"):
        calibrate(model, batches, dtype=jnp.float64)
    with pytest.raises(ValueError, match="dtype=bfloat16"):
        calibrate(model, batches, dtype=jnp.bfloat16)
    with jax.enable_x64(True):
        stats = calibrate(model, batches, dtype=jnp.float64)
        assert stats["up/kernel"].xtx.dtype == jnp.float64
    expected, _ = _nnx_expected(model, batches)
    np.testing.assert_allclose(np.asarray(stats["up/kernel"].xtx), expected["up/kernel"], rtol=1e-5, atol=1e-4)


# --- errors ------------------------------------------------------------------------


def test_unused_selected_layer_is_named(rng):
    params = {"used": jnp.ones((D_IN, D_OUT), jnp.float32), "unused": jnp.ones((D_IN, D_OUT), jnp.float32)}
    with pytest.raises(ValueError, match=r"\['unused'\] received no input"):
        calibrate(lambda p, x: jq.ops.matmul(x, p["used"]), params, _batches(rng, 1, (4, D_IN)),
                  where=lambda p, leaf: True)


def test_cast_copy_of_kernel_is_not_seen(rng):
    params = {"w": jnp.ones((D_IN, D_OUT), jnp.float32)}
    with pytest.raises(ValueError, match="received no input"):
        calibrate(lambda p, x: jq.ops.matmul(x, p["w"] * 2.0), params, _batches(rng, 1, (4, D_IN)), where="w")


def test_non_finite_inputs_name_the_path(rng):
    model = NNXMLP(nnx.Rngs(0))
    bad = _batches(rng, 1, (4, D_IN))[0]
    bad[1, 2] = np.inf
    with pytest.raises(ValueError, match="NaN/Inf.*up/kernel"):
        calibrate(model, [bad])


def test_empty_batches_and_selector_matching_nothing(rng):
    model = NNXMLP(nnx.Rngs(0))
    with pytest.raises(ValueError, match="batches is empty"):
        calibrate(model, [])
    with pytest.raises(ValueError, match="matched no leaf"):
        calibrate(model, _batches(rng, 1, (4, D_IN)), where="no_such_layer")


def test_nnx_patch_is_removed_after_calibration(rng):
    original = nnx.Linear.__dict__["__call__"]
    calibrate(NNXMLP(nnx.Rngs(0)), _batches(rng, 1, (4, D_IN)))
    assert nnx.Linear.__dict__["__call__"] is original


def test_exported_from_package():
    assert jq.calibrate is calibrate
