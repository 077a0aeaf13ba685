"""SpQR: GPTQ on small groups with quantized statistics and sparse outliers.

``quantize_spqr(w, xtx, recipe, key, *, layout, path)`` is the method entry point;
``SpQRQuantized`` is the array type it makes.
"""

from jaxquant.methods.spqr.array import SpQRQuantized

__all__ = ["SpQRQuantized"]
