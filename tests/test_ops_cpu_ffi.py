"""Native CPU kernels (XLA FFI): LUT GEMV and tile decode against the decode-then-matmul oracle."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxquant.ops import cpu_ffi, dispatch, matmul, xla
from test_ops_xla import aq_with_input, random_aq, random_sq

pytestmark = pytest.mark.skipif(not cpu_ffi.available(), reason=f"FFI kernel unavailable: {cpu_ffi.unavailable_reason()}")


def _close(a, b):
    scale = float(jnp.max(jnp.abs(b)))
    err = float(jnp.max(jnp.abs(a - b)))
    assert err <= 1e-5 * scale + 1e-5, (err, scale)


@settings(max_examples=12, deadline=None)
@given(
    # d_out up to 300 crosses the 256-row work block.
    case=aq_with_input(max_in_groups=40, max_d_out=300, rows=st.sampled_from([1, 2, 4, 5, 16])),
    col_block_bytes=st.sampled_from([1, 4096, cpu_ffi.COL_BLOCK_BYTES]),  # 1 -> 32-column blocks
    block_rows=st.sampled_from([1, 7, cpu_ffi.BLOCK_ROWS]),
)
def test_lut_ffi_matches_reference(case, col_block_bytes, block_rows):
    w, x = case
    got = cpu_ffi.lut_matmul_ffi(x, w, col_block_bytes=col_block_bytes, block_rows=block_rows)
    assert got.shape == (x.shape[0], w.d_out) and got.dtype == jnp.float32
    _close(got, xla.reference_matmul(x, w))


@pytest.mark.parametrize("col_block_bytes", [1, 200_000, cpu_ffi.COL_BLOCK_BYTES])
def test_lut_ffi_rows_do_not_depend_on_the_batch(rng, col_block_bytes):
    """A row's result is bit-identical whatever batch it came in (the column blocking
    depends on the batch size): data-parallel runs on 1 and 4 devices must agree exactly."""
    w = random_aq(rng, 96, 8 * 83, 2, 8, 8)  # 166 code columns: blocks and a ragged tail
    x = jnp.asarray(rng.standard_normal((23, w.d_in)).astype(np.float32))
    full = np.asarray(cpu_ffi.lut_matmul_ffi(x, w, col_block_bytes=col_block_bytes))
    for lo, hi in ((0, 1), (3, 9), (5, 23), (0, 16)):
        part = np.asarray(cpu_ffi.lut_matmul_ffi(x[lo:hi], w, col_block_bytes=col_block_bytes))
        np.testing.assert_array_equal(part, full[lo:hi])


@pytest.mark.parametrize("rows", [1, 4, 16])
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_lut_ffi_2x8_llama_block(rng, rows, layout):
    w = random_aq(rng, 512, 1024, 2, 8, 8, layout=layout)
    x = jnp.asarray(rng.standard_normal((rows, 1024)).astype(np.float32))
    got = jax.jit(lambda x, w: matmul(x, w, impl="cpu_ffi"))(x, w)
    kernel = w.decode() if layout == "in_out" else w.decode().T
    want = jnp.einsum("ri,io->ro", x, kernel, precision=jax.lax.Precision.HIGHEST)
    _close(got, want)


@settings(max_examples=10, deadline=None)
@given(
    m=st.integers(1, 3),
    bits=st.sampled_from([2, 8, 12, 16]),
    ig=st.sampled_from([1, 4, 8, 16]),
    og=st.sampled_from([1, 2]),
    n_out_groups=st.integers(1, 12),
    n_in_groups=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_decode_ffi_matches_qarray_decode(m, bits, ig, og, n_out_groups, n_in_groups, seed):
    rng = np.random.default_rng(seed)
    w = random_aq(rng, n_out_groups * og, n_in_groups * ig, m, bits, ig, og=og)
    dense = w.decode_out_in(jnp.float32)
    start = int(rng.integers(0, n_out_groups))
    n = int(rng.integers(1, n_out_groups - start + 1))
    got = jax.jit(cpu_ffi.decode_rows_ffi, static_argnums=2)(w, jnp.int32(start), n)
    np.testing.assert_allclose(got, dense[start * og : (start + n) * og], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits,og", [(8, 1), (16, 1), (8, 2)])
def test_decode_matmul_native_equals_xla(rng, bits, og):
    w = random_aq(rng, 64, 64, 2 if bits == 8 else 1, bits, 8, og=og)
    x = jnp.asarray(rng.standard_normal((20, 64)).astype(np.float32))
    ref = xla.reference_matmul(x, w)
    _close(xla.decode_matmul(x, w, tile_rows=16, native=True), ref)
    _close(xla.decode_matmul(x, w, tile_rows=16, native=False), ref)


def test_dispatch_prefers_cpu_ffi_and_falls_back(rng, monkeypatch):
    w = random_aq(rng, 32, 64, 2, 8, 8)
    x = jnp.ones((1, 64), jnp.float32)
    assert dispatch.select_impl(x, w) == "cpu_ffi"
    assert dispatch.select_impl(jnp.ones((17, 64), jnp.float32), w) == "xla_decode"
    assert dispatch.select_impl(x, random_aq(rng, 32, 64, 1, 16, 8)) == "xla_decode"  # uint16 codes
    assert dispatch.select_impl(x, random_sq(rng, 32, 64, 4, 16, True)) == "xla_decode"
    # No compiler: the kernel reports unavailable and the XLA LUT takes over.
    monkeypatch.setattr(cpu_ffi.LIBRARY, "state", {"ok": False, "error": "no C++ compiler found"})
    assert dispatch.select_impl(x, w) == "xla_lut"
    with pytest.raises(NotImplementedError, match="no C\\+\\+ compiler"):
        cpu_ffi.lut_matmul_ffi(x, w)


def test_bad_input(rng):
    w = random_aq(rng, 16, 32, 2, 8, 8)
    with pytest.raises(ValueError, match="d_in=32"):
        cpu_ffi.lut_matmul_ffi(jnp.ones((1, 31), jnp.float32), w)
    with pytest.raises(NotImplementedError, match="og == 1"):
        cpu_ffi.lut_matmul_ffi(jnp.ones((1, 32), jnp.float32), random_aq(rng, 16, 32, 2, 8, 8, og=2))


def test_no_retrace_across_values(rng):
    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(x, w):
        return matmul(x, w, impl="cpu_ffi")

    for seed in range(3):
        r = np.random.default_rng(seed)
        w = random_aq(r, 40, 64, 2, 8, 8)
        x = jnp.asarray(r.standard_normal((2, 64)).astype(np.float32))
        _close(f(x, w), xla.reference_matmul(x, w))
