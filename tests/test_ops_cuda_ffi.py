"""CUDA lookup-table kernel: what a machine without a GPU can check.

Its numerics are checked on a GPU by ``benchmarks/gpu_kernels.py`` (stage ``numerics``:
every path against a float64 reference; results in
``benchmarks/results/gpu_kernels_h200.json``). Here: the source builds with nvcc for
Hopper and exports its handler, the chunking arithmetic, eligibility, and that the
dispatcher never picks it off a GPU.
"""

import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant import native_build
from jaxquant.ops import cuda_ffi, dispatch
from test_ops_xla import random_aq


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_source_builds_for_hopper_and_exports_its_handler(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    lib = native_build.build("aq_lut_cuda_check", cuda_ffi._SOURCE, "CUDA", cuda_arch="sm_90")
    assert hasattr(lib, "JaxquantAqLutCudaF32")
    assert list((tmp_path / "jaxquant" / "ffi").glob("aq_lut_cuda_check_*.so"))


@pytest.mark.parametrize(
    ("rows", "m", "k", "budget", "want"),
    [(1, 2, 256, 8192, 16), (1, 1, 256, 8192, 32), (4, 2, 256, 16384, 8), (3, 2, 256, 16384, 8), (4, 2, 256, 512, 1)],
)
def test_group_chunk_is_the_largest_power_of_two_that_fits(rows, m, k, budget, want):
    chunk = cuda_ffi.group_chunk(rows, m, k, budget)
    assert chunk == want
    assert chunk * rows * m * k <= budget or chunk == 1  # at least one group, even over budget


def test_eligibility(rng):
    w = random_aq(rng, 32, 64, 2, 8, 8)
    assert cuda_ffi.cuda_eligible(w, 1) and cuda_ffi.cuda_eligible(w, cuda_ffi.MAX_ROWS)
    assert not cuda_ffi.cuda_eligible(w, cuda_ffi.MAX_ROWS + 1)
    assert not cuda_ffi.cuda_eligible(w, 0)
    assert not cuda_ffi.cuda_eligible(random_aq(rng, 32, 64, 1, 16, 8), 1)  # uint16 codes
    assert not cuda_ffi.cuda_eligible(jnp.ones((32, 64)), 1)


def test_not_available_off_gpu_and_dispatcher_skips_it(rng):
    w = random_aq(rng, 32, 64, 2, 8, 8)
    x = jnp.asarray(rng.standard_normal((1, 64)).astype(np.float32))
    assert not cuda_ffi.available()
    assert cuda_ffi.unavailable_reason() == "backend is not gpu"
    with pytest.raises(NotImplementedError, match="backend is not gpu"):
        cuda_ffi.lut_matmul_cuda(x, w)
    assert dispatch.select_impl(x, w) != "cuda_ffi"


@pytest.mark.parametrize("kwargs", [{"out_per_block": 0}, {"lut_floats": 0}])
def test_bad_block_settings_name_the_argument(rng, kwargs):
    w = random_aq(rng, 32, 64, 2, 8, 8)
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        cuda_ffi.lut_matmul_cuda(jnp.ones((1, 64), jnp.float32), w, **kwargs)
