"""Matrix products with dense or quantized weights: one entry point, ``matmul``."""

from jaxquant.ops.dispatch import current_token_mask, matmul, record_matmul_inputs, token_mask

__all__ = ["current_token_mask", "matmul", "record_matmul_inputs", "token_mask"]
