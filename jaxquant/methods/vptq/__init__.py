"""VPTQ: vector quantization of output-row vectors with GPTQ's error feedback.

``quantize_vptq(w, xtx, recipe, key, *, layout, path)`` is the method entry point;
``VPTQQuantized`` is the array type it makes.
"""

from jaxquant.methods.vptq.array import VPTQQuantized

__all__ = ["VPTQQuantized"]
