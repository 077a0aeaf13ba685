"""Run each CUDA decode kernel a few times on one 4096×4096 layer, for a profiler to read.

Meant to run under Nsight Compute on the lent GPU, which replays each launch to read its
hardware counters (``--clock-control none`` leaves the clocks as they are):

    XLA_PYTHON_CLIENT_PREALLOCATE=false ncu --clock-control none -k regex:Aq python3 benchmarks/cuda_probe.py

(Without ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` JAX takes most of the GPU's memory at
start, and ncu saves and restores all of it around every replay pass: on the H200 the
first kernel did not finish profiling in 110 s.)

It checks nothing and times nothing: ``gpu_kernels.py`` does both.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from gpu_kernels import random_quantized  # noqa: E402

from jaxquant.ops import cuda_ffi  # noqa: E402


def main() -> None:
    x = jax.numpy.asarray(np.random.default_rng(0).standard_normal((1, 4096)).astype(np.float32))
    w28 = random_quantized(jax.random.key(0), 4096, 4096, "2x8")
    w116 = random_quantized(jax.random.key(1), 4096, 4096, "1x16")
    calls = {
        "table 2x8": lambda: cuda_ffi.lut_matmul_cuda(x, w28, lut_floats=8192, out_per_block=512),
        "table, loads first, 2x8": lambda: cuda_ffi.lut_prefetch_matmul_cuda(x, w28, threads=512, rows_per_thread=2),
        "warp decode 2x8": lambda: cuda_ffi.decode_warp_matmul_cuda(x, w28),
        "warp decode 1x16": lambda: cuda_ffi.decode_warp_matmul_cuda(x, w116),
    }
    for name, call in calls.items():
        for _ in range(2):
            call().block_until_ready()
        print(name, "ran", flush=True)


if __name__ == "__main__":
    main()
