"""AQLM: additive multi-codebook quantization (Egiazarian et al., ICML 2024).

``quantize_aqlm(w, xtx, recipe, key, *, layout, path)`` is the method entry point
(see ``jaxquant.methods``); the submodules hold its parts: ``kmeans`` (residual k-means
init), ``beam_search`` (code search through ``XᵀX``), ``codebooks`` (Adam updates),
``native_kernels`` and ``native_grads`` (their CPU kernels) and ``quantize`` (the
alternation loop).
"""

from jaxquant.methods.aqlm.quantize import quantize_aqlm

__all__ = ["quantize_aqlm"]
