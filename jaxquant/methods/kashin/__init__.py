"""Kashin quantization: each row as two flat factors ``u + Qᵀ v``, each on a tiny grid.

``quantize_kashin(w, xtx, recipe, key, *, layout, path)`` is the method entry point;
``KashinQuantized`` is the array type it makes.
"""

from jaxquant.methods.kashin.array import KashinQuantized

__all__ = ["KashinQuantized"]
