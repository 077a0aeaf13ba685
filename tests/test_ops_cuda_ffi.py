"""CUDA kernels (two lookup-table kernels, a warp-per-row decode): what a machine without a GPU can check.

Their numerics are checked on a GPU by ``benchmarks/gpu_kernels.py`` (stage ``numerics``:
every kernel against a float64 reference on fresh random inputs; results in
``benchmarks/results/gpu_kernels_h200_cuda2.json``). Here: the source builds with nvcc for
Hopper and exports every handler, the chunking arithmetic, eligibility, argument checks,
and that neither the entry points nor the dispatcher use them off a GPU.
"""

import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant import native_build
from jaxquant.ops import cuda_ffi, dispatch
from test_ops_xla import random_aq


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
    # The loads-first kernel takes the same weights but needs at least 4 codewords.
    assert cuda_ffi.prefetch_eligible(w, 1)
    assert not cuda_ffi.prefetch_eligible(random_aq(rng, 32, 64, 1, 1, 8), 1)  # 2 codewords
    assert not cuda_ffi.prefetch_eligible(random_aq(rng, 32, 64, 1, 16, 8), 1)


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


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_source_builds_for_hopper_and_exports_every_handler(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    lib = native_build.build("aq_lut_cuda_check", cuda_ffi.SOURCE_FILE, "CUDA", cuda_arch="sm_90")
    assert len(cuda_ffi.LIBRARY.targets) == 4  # two table kernels, the decode kernel for uint8 and uint16 codes
    for symbol in cuda_ffi.LIBRARY.targets.values():
        assert hasattr(lib, symbol), symbol
    assert list((tmp_path / "jaxquant" / "ffi").glob("aq_lut_cuda_check_*.so"))


def test_decode_kernel_eligibility(rng):
    assert cuda_ffi.decode_eligible(random_aq(rng, 32, 64, 1, 16, 8), 1)  # 1x16: uint16 codes
    assert cuda_ffi.decode_eligible(random_aq(rng, 32, 64, 2, 8, 8), cuda_ffi.MAX_ROWS)
    assert not cuda_ffi.decode_eligible(random_aq(rng, 32, 64, 2, 8, 8), cuda_ffi.MAX_ROWS + 1)
    assert not cuda_ffi.decode_eligible(random_aq(rng, 32, 64, 1, 16, 4), 1)  # groups of 4
    assert not cuda_ffi.decode_eligible(random_aq(rng, 32, 64, 3, 8, 8), 1)  # three codebooks
    assert not cuda_ffi.decode_eligible(jnp.ones((32, 64)), 1)


@pytest.mark.parametrize(("m", "bits"), [(2, 8), (1, 16)])
def test_every_entry_point_refuses_off_gpu(rng, m, bits):
    w = random_aq(rng, 32, 64, m, bits, 8)
    x = jnp.asarray(rng.standard_normal((1, 64)).astype(np.float32))
    entries = [cuda_ffi.matmul_cuda, cuda_ffi.decode_warp_matmul_cuda]
    if bits == 8:
        entries += [cuda_ffi.lut_matmul_cuda, cuda_ffi.lut_prefetch_matmul_cuda]
    for entry in entries:
        with pytest.raises(NotImplementedError, match="backend is not gpu"):
            entry(x, w)


def test_matmul_cuda_names_what_it_needs_for_an_ineligible_weight(rng):
    w = random_aq(rng, 32, 64, 1, 16, 4)  # uint16 codes in groups of 4: no kernel takes it
    with pytest.raises(NotImplementedError, match="uint16 codes with 1 or 2 codebooks and groups of 8"):
        cuda_ffi.matmul_cuda(jnp.ones((1, 64), jnp.float32), w)


@pytest.mark.parametrize(
    ("entry", "kwargs", "named"),
    [
        ("lut_prefetch_matmul_cuda", {"threads": 48}, "threads=48"),
        ("lut_prefetch_matmul_cuda", {"threads": 1024}, "threads=1024"),
        ("lut_prefetch_matmul_cuda", {"rows_per_thread": 3}, "rows_per_thread=3"),
        ("lut_prefetch_matmul_cuda", {"lut_floats": 0}, "lut_floats=0"),
        ("decode_warp_matmul_cuda", {"warps_per_block": 9}, "warps_per_block=9"),
        ("decode_warp_matmul_cuda", {"unroll": 2}, "unroll=2"),
    ],
)
def test_bad_kernel_settings_name_the_argument_and_value(rng, entry, kwargs, named):
    w = random_aq(rng, 32, 64, 2, 8, 8)
    with pytest.raises(ValueError, match=named):
        getattr(cuda_ffi, entry)(jnp.ones((1, 64), jnp.float32), w, **kwargs)


def test_prefetch_threads_follow_the_measured_defaults():
    # benchmarks/results/gpu_kernels_h200_cuda2.json: 1024 rows per block won with two
    # codebooks, 512 with one.
    assert cuda_ffi.prefetch_threads(2) == 512
    assert cuda_ffi.prefetch_threads(1) == 256


def test_table_chunk_stays_within_the_group_count_and_shared_memory(rng):
    w = random_aq(rng, 32, 96, 2, 8, 8)  # 12 groups
    assert cuda_ffi._table_chunk(w, 1, cuda_ffi.LUT_FLOATS_ONE_ROW) == 12  # 16 fit the budget, 12 exist
    assert cuda_ffi._table_chunk(w, 1, 512) == 1
    with pytest.raises(ValueError, match=r"lut_floats=1048576 .* shared memory"):
        cuda_ffi._table_chunk(random_aq(rng, 32, 1024, 2, 8, 8), 4, 2**20)
