"""Pyramid vector quantization: group directions on the pyramid lattice, amplitudes on a
fitted grid, chosen column by column with GPTQ's error feedback.

``quantize_pvq(w, xtx, recipe, key, *, layout, path)`` is the method entry point;
``PVQQuantized`` is the array type it makes; ``lattice`` holds the pulse search and the
enumeration of lattice points.
"""

from jaxquant.methods.pvq.array import PVQQuantized

__all__ = ["PVQQuantized"]
