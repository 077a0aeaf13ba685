"""Pallas kernels for quantized matrix products (GPU Triton backend, TPU Mosaic).

This package imports only JAX. Each kernel has a pure-JAX reference twin with the
same signature (``reference_aqlm_matmul``) that the tests compare it against in
``interpret=True`` mode, and a cross-lowering test proves the real CUDA/TPU lowerings
accept it.
"""

from pallas_kernels.aqlm_gpu import aqlm_matmul_gpu, aqlm_matmul_gpu_lut, gpu_eligible, lut_eligible
from pallas_kernels.aqlm_tpu import aqlm_matmul_tpu, tpu_eligible
from pallas_kernels.reference import reference_aqlm_matmul

__all__ = [
    "aqlm_matmul_gpu",
    "aqlm_matmul_gpu_lut",
    "aqlm_matmul_tpu",
    "gpu_eligible",
    "lut_eligible",
    "reference_aqlm_matmul",
    "tpu_eligible",
]
