"""Pallas kernels: interpret-mode numerics against the XLA path, and cross-lowering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.ops import xla
from pallas_kernels import aqlm_matmul_gpu, aqlm_matmul_gpu_lut, aqlm_matmul_tpu, reference_aqlm_matmul
from test_ops_xla import random_aq

# (d_out, d_in, M, bits, ig, rows): 2x8, 1x8, 1x16 and a non-power-of-two group count.
GPU_CONFIGS = [(64, 128, 2, 8, 8, 1), (48, 96, 1, 8, 8, 3), (32, 64, 1, 16, 8, 2), (32, 88, 2, 8, 8, 1)]
LUT_CONFIGS = [c for c in GPU_CONFIGS if c[3] <= 8]
TPU_CONFIGS = [(64, 128, 2, 8, 8, 1), (16, 2048, 1, 8, 8, 2), (24, 96, 2, 8, 8, 3)]


def _inputs(cfg, seed=0):
    d_out, d_in, m, bits, ig, rows = cfg
    rng = np.random.default_rng(seed)
    w = random_aq(rng, d_out, d_in, m, bits, ig)
    x = jnp.asarray(rng.standard_normal((rows, d_in)).astype(np.float32))
    return x, w


def _check(got, x, w):
    want = xla.decode_matmul(x, w)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * float(jnp.max(jnp.abs(want))))
    np.testing.assert_allclose(
        reference_aqlm_matmul(x, w.codes, w.codebooks, w.scales), want, rtol=1e-5, atol=1e-4
    )


@pytest.mark.parametrize("cfg", GPU_CONFIGS)
def test_gpu_kernel_interpret(cfg):
    x, w = _inputs(cfg)
    _check(aqlm_matmul_gpu(x, w.codes, w.codebooks, w.scales, interpret=True), x, w)


@pytest.mark.parametrize("cfg", LUT_CONFIGS)
@pytest.mark.parametrize("blocks", [(64, 64), (16, 4)])
def test_gpu_lut_kernel_interpret(cfg, blocks):
    x, w = _inputs(cfg, seed=1)
    got = aqlm_matmul_gpu_lut(
        x, w.codes, w.codebooks, w.scales, block_out=blocks[0], block_groups=blocks[1], interpret=True
    )
    _check(got, x, w)


@pytest.mark.parametrize("cfg", TPU_CONFIGS)
def test_tpu_kernel_interpret(cfg):
    x, w = _inputs(cfg)
    _check(aqlm_matmul_tpu(x, w.codes, w.codebooks, w.scales, interpret=True), x, w)


def _lowered_text(fn, x, w, platform):
    f = jax.jit(lambda x, c, b, s: fn(x, c, b, s))
    return f.trace(x, w.codes, w.codebooks, w.scales).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("cfg", GPU_CONFIGS)
def test_gpu_kernel_lowers_for_cuda_triton(cfg):
    x, w = _inputs(cfg)
    text = _lowered_text(aqlm_matmul_gpu, x, w, "cuda")
    assert "__gpu$xla.gpu.triton" in text


@pytest.mark.parametrize("cfg", LUT_CONFIGS)
def test_gpu_lut_kernel_lowers_for_cuda_triton(cfg):
    x, w = _inputs(cfg)
    assert "__gpu$xla.gpu.triton" in _lowered_text(aqlm_matmul_gpu_lut, x, w, "cuda")


@pytest.mark.parametrize("cfg", TPU_CONFIGS)
def test_tpu_kernel_lowers_for_tpu(cfg):
    x, w = _inputs(cfg)
    assert "tpu_custom_call" in _lowered_text(aqlm_matmul_tpu, x, w, "tpu")


def test_kernels_reject_ineligible():
    x, w = _inputs((32, 64, 1, 16, 8, 1))
    with pytest.raises(NotImplementedError):
        aqlm_matmul_tpu(x, w.codes, w.codebooks, w.scales, interpret=True)
    x, w = _inputs((20, 64, 1, 8, 8, 1))  # d_out not a multiple of 16
    with pytest.raises(NotImplementedError):
        aqlm_matmul_gpu(x, w.codes, w.codebooks, w.scales, interpret=True)
    x, w = _inputs((32, 64, 1, 16, 8, 1))  # 2^16 codewords: the table would not fit in cache
    with pytest.raises(NotImplementedError):
        aqlm_matmul_gpu_lut(x, w.codes, w.codebooks, w.scales, interpret=True)
