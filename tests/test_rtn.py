"""RTN and the shared uniform grid."""

from __future__ import annotations

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.methods import _grid
from jaxquant.methods.rtn import quantize_rtn
from jaxquant.recipes import RTN

KEY = jax.random.key(0)


def _grid_representable(rng, d_out, d_in, g, bits, symmetric):
    """A weight that is exactly ``(codes - zero) * scale`` with each group spanning its grid."""
    maxq = 2**bits - 1
    n_groups = d_in // g
    codes = rng.integers(0, maxq + 1, size=(d_out, n_groups, g))
    codes[..., 0] = 0  # every group reaches both ends of its grid
    codes[..., -1] = maxq
    scale = rng.uniform(0.01, 0.1, size=(d_out, n_groups)).astype(np.float16).astype(np.float64)
    if symmetric:
        zero = np.full((d_out, n_groups), maxq / 2)
    else:
        zero = rng.integers(0, maxq + 1, size=(d_out, n_groups)).astype(np.float64)
    w = (codes - zero[..., None]) * scale[..., None]
    return w.reshape(d_out, d_in), codes.reshape(d_out, d_in), scale, zero


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_exact_on_grid_representable_input(rng, bits, symmetric):
    w, codes, scale, zero = _grid_representable(rng, 8, 64, 16, bits, symmetric)
    q = quantize_rtn(jnp.asarray(w, jnp.float32), None, RTN(bits=bits, group_size=16, symmetric=symmetric), KEY)
    np.testing.assert_array_equal(np.asarray(q.codes), codes)
    np.testing.assert_array_equal(np.asarray(q.scales, np.float64), scale)
    if not symmetric:
        np.testing.assert_array_equal(np.asarray(q.zeros, np.float64), zero)
    np.testing.assert_allclose(np.asarray(q.decode()), w.astype(np.float32), rtol=1e-6, atol=1e-7)


def _np_rtn(w, bits, g, symmetric, param_dtype):
    maxq = 2**bits - 1
    x = w.reshape(w.shape[0], -1, g).astype(np.float64)
    lo, hi = np.minimum(x.min(-1), 0), np.maximum(x.max(-1), 0)
    tiny = float(np.finfo(np.dtype(param_dtype)).tiny)
    if symmetric:
        s = np.maximum(np.maximum(-lo, hi) * 2 / maxq, tiny).astype(param_dtype).astype(np.float64)
        z = np.full_like(s, maxq / 2)
    else:
        s = np.maximum((hi - lo) / maxq, tiny).astype(param_dtype).astype(np.float64)
        z = np.clip(np.round(-lo / s), 0, maxq)
    c = np.clip(np.round(x / s[..., None] + z[..., None]), 0, maxq)
    return c.reshape(w.shape), s, z


@pytest.mark.parametrize("symmetric", [False, True])
def test_matches_numpy_reference(rng, symmetric):
    w = rng.standard_normal((32, 128))
    with jax.enable_x64(True):
        q = quantize_rtn(jnp.asarray(w), None, RTN(bits=3, group_size=32, symmetric=symmetric), KEY)
        codes = np.asarray(q.codes)
    ref_codes, ref_s, ref_z = _np_rtn(w, 3, 32, symmetric, "float16")
    np.testing.assert_array_equal(codes, ref_codes)
    np.testing.assert_array_equal(np.asarray(q.scales, np.float64), ref_s)


def test_codes_use_the_stored_rounded_scales(rng):
    # float16 scales are rounded before rounding the weights: re-quantizing with the
    # stored scales and zeros reproduces the codes exactly.
    w = rng.standard_normal((16, 64)).astype(np.float32)
    q = quantize_rtn(jnp.asarray(w), None, RTN(bits=3, group_size=16), KEY)
    s = np.repeat(np.asarray(q.scales, np.float32), 16, axis=1)
    z = np.repeat(np.asarray(q.zeros, np.float32), 16, axis=1)
    np.testing.assert_array_equal(np.clip(np.round(w / s + z), 0, 7), np.asarray(q.codes))


def test_zero_in_grid_and_all_zero_group():
    w = np.zeros((4, 32), np.float32)
    w[0, :16] = np.linspace(0.1, 1.0, 16)  # a group not straddling zero still represents 0
    q = quantize_rtn(jnp.asarray(w), None, RTN(bits=2, group_size=16), KEY)
    w_hat = np.asarray(q.decode())
    assert np.all(np.isfinite(w_hat))
    np.testing.assert_array_equal(w_hat[1:], 0.0)
    np.testing.assert_array_equal(w_hat[0, 16:], 0.0)


def test_clip_search_never_increases_group_error(rng):
    w = rng.standard_normal((32, 256)).astype(np.float32)
    w[:, 7] *= 8  # outliers make clipping worthwhile
    plain = np.asarray(quantize_rtn(jnp.asarray(w), None, RTN(bits=2, group_size=64), KEY).decode())
    clip = np.asarray(quantize_rtn(jnp.asarray(w), None, RTN(bits=2, group_size=64, clip_search=True), KEY).decode())
    e_plain = ((plain - w) ** 2).reshape(32, 4, 64).sum(-1)
    e_clip = ((clip - w) ** 2).reshape(32, 4, 64).sum(-1)
    assert np.all(e_clip <= e_plain * (1 + 1e-6))
    assert e_clip.sum() < 0.9 * e_plain.sum()


def test_bits_accounting_2bit_g128():
    q = quantize_rtn(jnp.ones((256, 512)), None, RTN(bits=2, group_size=128), KEY)
    assert q.bits_per_weight == 2.25
    assert quantize_rtn(jnp.ones((256, 512)), None, RTN(bits=3, group_size=128), KEY).bits_per_weight == 3.25
    assert quantize_rtn(jnp.ones((8, 512)), None, RTN(bits=4, group_size=None, symmetric=True), KEY).bits_per_weight == 4 + 16 / 512


def test_group_size_error_names_path():
    with pytest.raises(ValueError, match="d_in=60 is not divisible by group_size=16 at x/weight"):
        quantize_rtn(jnp.ones((4, 60)), None, RTN(bits=2, group_size=16), KEY, path="x/weight")


@hypothesis.settings(max_examples=12, deadline=None, derandomize=True)
@hypothesis.given(
    d_out=st.integers(1, 12),
    n_groups=st.integers(1, 4),
    group_size=st.sampled_from([1, 4, 8, 32]),
    bits=st.integers(1, 8),
    symmetric=st.booleans(),
    param_dtype=st.sampled_from(["float16", "bfloat16", "float32"]),
    layout=st.sampled_from(["out_in", "in_out"]),
)
def test_shapes_bits_and_error_bound(d_out, n_groups, group_size, bits, symmetric, param_dtype, layout):
    d_in = n_groups * group_size
    w = np.random.default_rng(d_out * 100 + d_in).standard_normal((d_out, d_in)).astype(np.float32)
    recipe = RTN(bits=bits, group_size=group_size, symmetric=symmetric, param_dtype=param_dtype)
    q = quantize_rtn(jnp.asarray(w), None, recipe, KEY, layout=layout)
    assert q.decode().shape == ((d_out, d_in) if layout == "out_in" else (d_in, d_out))
    assert q.codes.shape == (d_out, d_in) and q.scales.shape == (d_out, n_groups)
    assert q.codes.dtype == jnp.uint8 and int(np.max(np.asarray(q.codes))) < 2**bits
    p_bits = jnp.dtype(param_dtype).itemsize * 8
    assert q.bits_per_weight == bits + p_bits * (1 if symmetric else 2) / group_size
    # Without clipping every weight is within half a step of its decoded value, plus the
    # slack from rounding the step to the storage dtype (the grid may end short of max|w|).
    step = np.repeat(np.asarray(q.scales, np.float32), group_size, axis=1)
    err = np.abs(np.asarray(q.decode_out_in()) - w)
    rel = {"float16": 2**-11, "bfloat16": 2**-8, "float32": 2**-24}[param_dtype]
    slack = np.abs(w) * rel * 2 + 1e-6
    assert np.all(err <= step / 2 + slack)
