"""XLA implementations (LUT GEMV, tile-wise decode) against decode-then-matmul."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxquant.ops import xla
from jaxquant.qarray import AdditiveQuantized, ScalarQuantized, code_dtype


def random_aq(rng, d_out, d_in, m, bits, ig, og=1, layout="out_in"):
    k = 2**bits
    codes = rng.integers(0, k, (d_out // og, d_in // ig, m)).astype(code_dtype(bits))
    cb = rng.standard_normal((m, k, og, ig)).astype(np.float32)
    scales = (rng.random((d_out // og, 1, 1, 1)) + 0.5).astype(np.float32)
    shape = (d_out, d_in) if layout == "out_in" else (d_in, d_out)
    return AdditiveQuantized(jnp.asarray(codes), jnp.asarray(cb), jnp.asarray(scales), bits, shape, layout)


@st.composite
def aq_with_input(draw, *, max_in_groups: int, max_d_out: int, rows: st.SearchStrategy[int]):
    """A random 1-4 codebook, 1-8 bit ``AdditiveQuantized`` in either layout, and an input batch for it."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    ig = draw(st.sampled_from([1, 2, 4, 8]))
    d_in = draw(st.integers(1, max_in_groups)) * ig
    w = random_aq(rng, draw(st.integers(1, max_d_out)), d_in, draw(st.integers(1, 4)), draw(st.integers(1, 8)), ig,
                  layout=draw(st.sampled_from(["out_in", "in_out"])))
    x = jnp.asarray(rng.standard_normal((draw(rows), d_in)).astype(np.float32))
    return w, x


def random_sq(rng, d_out, d_in, bits, group, symmetric, layout="out_in"):
    codes = rng.integers(0, 2**bits, (d_out, d_in)).astype(np.uint8)
    scales = (rng.random((d_out, d_in // group)) + 0.1).astype(np.float32)
    zeros = None if symmetric else jnp.asarray(rng.integers(0, 2**bits, (d_out, d_in // group)).astype(np.float32))
    shape = (d_out, d_in) if layout == "out_in" else (d_in, d_out)
    return ScalarQuantized(jnp.asarray(codes), jnp.asarray(scales), zeros, bits, group, shape, layout)


def _close(a, b, scale):
    err = float(jnp.max(jnp.abs(a - b)))
    assert err <= 1e-5 * scale + 1e-5, err


@settings(max_examples=8, deadline=None)
@given(case=aq_with_input(max_in_groups=24, max_d_out=40, rows=st.integers(1, 5)), step=st.sampled_from([None, 1, 3, 16]))
def test_lut_matches_reference(case, step):
    w, x = case
    ref = xla.reference_matmul(x, w)
    got = xla.lut_matmul(x, w, codes_per_step=step)
    assert got.shape == (x.shape[0], w.d_out) and got.dtype == jnp.float32
    _close(got, ref, float(jnp.max(jnp.abs(ref))))


@settings(max_examples=6, deadline=None)
@given(
    m=st.integers(1, 3),
    bits=st.sampled_from([4, 8, 12, 16]),
    ig=st.sampled_from([1, 4, 8]),
    og=st.sampled_from([1, 2]),
    n_out_groups=st.integers(1, 12),
    rows=st.integers(1, 20),
    tile=st.sampled_from([None, 1, 4, 7]),
    seed=st.integers(0, 2**16),
)
def test_decode_matches_reference_additive(m, bits, ig, og, n_out_groups, rows, tile, seed):
    rng = np.random.default_rng(seed)
    w = random_aq(rng, n_out_groups * og, 4 * ig, m, bits, ig, og=og)
    x = jnp.asarray(rng.standard_normal((rows, w.d_in)).astype(np.float32))
    ref = xla.reference_matmul(x, w)
    _close(xla.decode_matmul(x, w, tile_rows=tile), ref, float(jnp.max(jnp.abs(ref))))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits,group", [(2, 8), (4, 16), (3, 32)])
def test_decode_matches_reference_scalar(rng, symmetric, bits, group):
    w = random_sq(rng, 48, 64, bits, group, symmetric)
    x = jnp.asarray(rng.standard_normal((3, 64)).astype(np.float32))
    ref = xla.reference_matmul(x, w)
    dense = x @ w.decode_out_in().T
    _close(ref, dense, float(jnp.max(jnp.abs(dense))))
    _close(xla.decode_matmul(x, w, tile_rows=8), ref, float(jnp.max(jnp.abs(ref))))


def test_lut_rejects_ineligible(rng):
    with pytest.raises(NotImplementedError):
        xla.lut_matmul(jnp.ones((1, 16), jnp.float32), random_aq(rng, 8, 16, 1, 10, 8))
    with pytest.raises(NotImplementedError):
        xla.lut_matmul(jnp.ones((1, 16), jnp.float32), random_aq(rng, 8, 16, 1, 8, 8, og=2))
    with pytest.raises(NotImplementedError):
        xla.lut_matmul(jnp.ones((1, 16), jnp.float32), random_sq(rng, 8, 16, 2, 8, True))
    with pytest.raises(ValueError, match="d_in=16"):
        xla.lut_matmul(jnp.ones((1, 15), jnp.float32), random_aq(rng, 8, 16, 1, 8, 8))


def test_lut_2x8_llama_like_shape_and_bf16_input(rng):
    w = random_aq(rng, 256, 1024, 2, 8, 8)
    x = jnp.asarray(rng.standard_normal((1, 1024)).astype(np.float32))
    ref = xla.reference_matmul(x, w)
    got = jax.jit(xla.lut_matmul)(x, w)
    _close(got, ref, float(jnp.max(jnp.abs(ref))))
    got_bf16 = xla.lut_matmul(x.astype(jnp.bfloat16), w)
    rel = float(jnp.linalg.norm(got_bf16 - ref) / jnp.linalg.norm(ref))
    assert rel < 1e-2
