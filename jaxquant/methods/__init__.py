"""Quantization methods. Each maps one weight (and its ``XᵀX``) to a quantized array.

Every method module exposes one function with the signature of ``QuantizeFn``:
``fn(w, xtx, recipe, key, *, layout, path) -> quantized array``, where ``w`` is the
weight in ``(d_out, d_in)`` storage order (float32), ``xtx`` the ``(d_in, d_in)``
input statistics (``None`` for data-free methods), ``layout`` the layout of the leaf the
result replaces, and ``path`` the leaf's path, used only in error messages.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

import jax

from jaxquant import recipes


class QuantizeFn(Protocol):
    def __call__(
        self, w: jax.Array, xtx: jax.Array | None, recipe: Any, key: jax.Array, *, layout: str, path: str
    ) -> Any: ...


# recipe type -> (module, function); imported lazily so a method's heavy compile-time
# setup is paid only by users of that method.
_REGISTRY: dict[type, tuple[str, str]] = {
    recipes.RTN: ("jaxquant.methods.rtn", "quantize_rtn"),
    recipes.GPTQ: ("jaxquant.methods.gptq", "quantize_gptq"),
    recipes.AQLM: ("jaxquant.methods.aqlm", "quantize_aqlm"),
}


def method_for(recipe: Any) -> QuantizeFn:
    """The quantize function that implements ``recipe``."""
    try:
        module, name = _REGISTRY[type(recipe)]
    except KeyError:
        raise TypeError(f"recipe {recipe!r} is not a known recipe type ({[t.__name__ for t in _REGISTRY]})") from None
    return getattr(importlib.import_module(module), name)


def needs_statistics(recipe: Any) -> bool:
    """Whether the method uses ``XᵀX`` (RTN does not)."""
    return not isinstance(recipe, recipes.RTN)
