"""Matrix products with dense or quantized weights: one entry point, ``matmul``."""

from jaxquant.ops.dispatch import matmul, record_matmul_inputs

__all__ = ["matmul", "record_matmul_inputs"]
