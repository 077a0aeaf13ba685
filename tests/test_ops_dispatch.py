"""Dispatcher: order, forcing by name, NotImplementedError fall-through, shapes, no retrace."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.ops import dispatch, matmul, record_matmul_inputs
from jaxquant.ops import cpu_ffi, xla
from test_ops_xla import random_aq, random_sq


def test_cpu_order_lut_then_decode(rng, monkeypatch):
    w = random_aq(rng, 32, 64, 2, 8, 8)
    monkeypatch.setattr(cpu_ffi.LIBRARY, "state", {"ok": False, "error": "disabled for this test"})
    assert dispatch.select_impl(jnp.ones((1, 64), jnp.float32), w) == "xla_lut"
    assert dispatch.select_impl(jnp.ones((4, 5, 64), jnp.float32), w) == "xla_decode"  # 20 rows > DECODE_BATCH_ROWS
    assert dispatch.select_impl(jnp.ones((2, 64), jnp.float32), random_aq(rng, 32, 64, 1, 16, 8)) == "xla_decode"
    assert dispatch.select_impl(jnp.ones((2, 64), jnp.float32), random_sq(rng, 32, 64, 4, 16, True)) == "xla_decode"


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("lead", [(), (3,), (2, 3), (5, 4)])
def test_matmul_batch_shapes_and_layouts(rng, layout, lead):
    w = random_aq(rng, 24, 32, 2, 8, 8, layout=layout)
    x = jnp.asarray(rng.standard_normal((*lead, 32)).astype(np.float32))
    got = matmul(x, w)
    dense = w.decode()  # leaf layout
    kernel = dense if layout == "in_out" else dense.T  # (d_in, d_out)
    want = jnp.einsum("...i,io->...o", x, kernel, precision=jax.lax.Precision.HIGHEST)
    assert got.shape == (*lead, 24)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_every_impl_by_name_agrees(rng):
    w = random_aq(rng, 40, 64, 2, 8, 8)
    x = jnp.asarray(rng.standard_normal((3, 64)).astype(np.float32))
    ref = matmul(x, w, impl="reference")
    for name in ("cpu_ffi", "xla_lut", "xla_decode"):
        np.testing.assert_allclose(matmul(x, w, impl=name), ref, rtol=1e-5, atol=1e-4)


def test_forcing_ineligible_or_unknown(rng):
    w = random_aq(rng, 16, 32, 2, 8, 8)
    x = jnp.ones((1, 32), jnp.float32)
    with pytest.raises(NotImplementedError, match="backend is not gpu"):
        matmul(x, w, impl="pallas_gpu")
    with pytest.raises(NotImplementedError, match="backend is not gpu"):
        matmul(x, w, impl="cuda_ffi")
    with pytest.raises(NotImplementedError, match="backend is not tpu"):
        matmul(x, w, impl="pallas_tpu")
    with pytest.raises(ValueError, match="nope"):
        matmul(x, w, impl="nope")
    # The row limit is a speed preference of automatic selection, not eligibility: a
    # forced lookup-table kernel runs (correctly) on many rows.
    x17 = jnp.asarray(rng.standard_normal((17, 32)), jnp.float32)
    np.testing.assert_allclose(
        matmul(x17, w, impl="xla_lut"), matmul(x17, w, impl="reference"), rtol=1e-5, atol=1e-5
    )


def test_fall_through_order(rng, monkeypatch):
    calls = []

    def refuse(name):
        def f(x, w):
            calls.append(name)
            raise NotImplementedError(name)
        return f

    for name in ("cuda_ffi", "pallas_gpu", "pallas_tpu", "cpu_ffi", "xla_lut"):
        monkeypatch.setitem(dispatch.IMPLEMENTATIONS, name, refuse(name))
    w = random_aq(rng, 16, 32, 2, 8, 8)
    x = jnp.asarray(rng.standard_normal((1, 32)).astype(np.float32))
    assert dispatch.select_impl(x, w) == "xla_decode"
    assert calls == ["cuda_ffi", "pallas_gpu", "pallas_tpu", "cpu_ffi", "xla_lut"]
    np.testing.assert_allclose(matmul(x, w), xla.reference_matmul(x, w), rtol=1e-5, atol=1e-4)


def test_dense_path_and_dtype(rng):
    x = jnp.asarray(rng.standard_normal((2, 8)).astype(np.float32))
    k = jnp.asarray(rng.standard_normal((8, 5)).astype(np.float32))
    np.testing.assert_allclose(matmul(x, k), np.asarray(x) @ np.asarray(k), rtol=1e-5)
    w = random_aq(rng, 16, 32, 2, 8, 8)
    y = matmul(jnp.ones((1, 32), jnp.bfloat16), w)
    assert y.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="d_in=32"):
        matmul(jnp.ones((1, 31), jnp.float32), w)


def test_recorder_sees_quantized_calls(rng):
    w = random_aq(rng, 16, 32, 2, 8, 8)
    seen = []
    with record_matmul_inputs(lambda x, w: seen.append((x.shape, type(w).__name__))):
        matmul(jnp.ones((2, 32), jnp.float32), w)
    assert seen == [((2, 32), "AdditiveQuantized")]


def test_no_retrace_across_values(rng):
    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(x, w):
        return matmul(x, w)

    for seed in range(3):
        r = np.random.default_rng(seed)
        w = random_aq(r, 16, 32, 2, 8, 8)
        x = jnp.asarray(r.standard_normal((1, 32)).astype(np.float32))
        np.testing.assert_allclose(f(x, w), xla.reference_matmul(x, w), rtol=1e-5, atol=1e-4)


def test_gradients_flow_through_automatic_dispatch(rng):
    # Fine-tuning differentiates x @ W with respect to codebooks and scales through the
    # dispatcher; every automatically chosen path must have a derivative, equal to the
    # one of the plain decode-then-multiply reference.
    from jaxquant.qarray import merge, split

    w = random_aq(rng, 32, 64, 2, 8, 8)
    continuous, discrete = split(w)
    for rows in (1, 40):  # the lookup-table regime and the tile-wise decode regime
        x = jnp.asarray(rng.standard_normal((rows, 64)), jnp.float32)

        def loss(c, impl):
            return jnp.sum(matmul(x, merge(c, discrete), impl=impl) ** 2)

        if rows == 1 and dispatch.select_impl(x, w) == "cpu_ffi":
            continue  # the native kernel is inference-only (documented); training has many rows
        got = jax.grad(loss)(continuous, None)
        want = jax.grad(loss)(continuous, "reference")
        np.testing.assert_allclose(got.codebooks, want.codebooks, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got.scales, want.scales, rtol=1e-4, atol=1e-4)
