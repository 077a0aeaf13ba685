"""Run third-party Flax models on quantized parameters without rewriting them.

Two entry points, one per Flax API:

- ``quantized_linen_interceptor``: a Linen method interceptor. Inside
  ``with nn.intercept_methods(quantized_linen_interceptor):`` every ``nn.Dense``,
  ``nn.DenseGeneral`` and ``nn.Einsum`` whose ``kernel`` parameter is a quantized array
  computes through ``jaxquant.ops.matmul`` (the dense weight is never materialised);
  layers with dense kernels run their own code untouched.
- ``swap_linear``: an NNX module swap. It replaces, in place, every ``nnx.Linear``
  whose kernel holds a quantized array by a ``QuantizedLinear`` that calls
  ``ops.matmul``.

A quantized leaf always stands for a 2-D weight. ``DenseGeneral``/``Einsum`` kernels
of more dimensions are quantized as their 2-D flattening ``(prod(in axes),
prod(out axes))``; the interceptor reshapes ``x`` and the output around the product.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxquant.ops.dispatch import matmul
from jaxquant.qarray import is_quantized

_LINEN_TYPES = (nn.Dense, nn.DenseGeneral, nn.Einsum)


def _inputs(args: tuple, kwargs: dict) -> jax.Array:
    if args:
        return args[0]
    if "inputs" in kwargs:
        return kwargs["inputs"]
    raise TypeError("intercepted layer called without inputs")


def _add_bias(module: nn.Module, y: jax.Array, out_shape: tuple[int, ...]) -> jax.Array:
    if not getattr(module, "use_bias", False) or not module.has_variable("params", "bias"):
        return y
    bias = jnp.asarray(module.get_variable("params", "bias")).astype(y.dtype)
    return y + bias.reshape(out_shape)


def _compute_dtype(module: nn.Module, x: jax.Array) -> Any:
    return module.dtype if getattr(module, "dtype", None) is not None else x.dtype


def _dense(module: nn.Dense, x: jax.Array, w: Any) -> jax.Array:
    x = x.astype(_compute_dtype(module, x))
    return _add_bias(module, matmul(x, w), (w.d_out,))


def _dense_general(module: nn.DenseGeneral, x: jax.Array, w: Any) -> jax.Array:
    if module.batch_dims:
        raise NotImplementedError("quantized DenseGeneral with batch_dims is not supported")
    axes = module.axis if isinstance(module.axis, tuple) else (module.axis,)
    axes = tuple(a % x.ndim for a in axes)
    features = module.features if isinstance(module.features, tuple) else (module.features,)
    x = x.astype(_compute_dtype(module, x))
    # Move the contracted axes to the end (in the kernel's order), then flatten them.
    x = jnp.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))
    lead = x.shape[: x.ndim - len(axes)]
    d_in = math.prod(x.shape[len(lead) :])
    if d_in != w.d_in or math.prod(features) != w.d_out:
        raise ValueError(
            f"quantized DenseGeneral kernel is ({w.d_in}, {w.d_out}); layer needs "
            f"({d_in}, {math.prod(features)}) at {'/'.join(module.path)}"
        )
    y = matmul(x.reshape(*lead, d_in), w).reshape(*lead, *features)
    return _add_bias(module, y, features)


def _einsum_as_matmul(eq: str, x_ndim: int) -> tuple[int, int] | None:
    """``(n_contracted, n_kernel_out)`` if ``eq`` contracts x's trailing axes with the
    kernel's leading axes and appends the kernel's other axes; ``None`` otherwise."""
    eq = eq.replace(" ", "")
    if "->" not in eq or eq.count(",") != 1:
        return None
    lhs, out = eq.split("->")
    xs, ks = lhs.split(",")
    if "." in ks or len(set(ks)) != len(ks):
        return None
    n_c = next((n for n in range(len(ks), 0, -1) if xs.endswith(ks[:n])), 0)
    if n_c == 0:
        return None
    batch = xs[: len(xs) - n_c]
    if out != batch + ks[n_c:] or any(c in batch for c in ks):
        return None
    return n_c, len(ks) - n_c


def _einsum(module: nn.Einsum, x: jax.Array, w: Any) -> jax.Array:
    x = x.astype(_compute_dtype(module, x))
    kshape = tuple(module.shape)
    split = _einsum_as_matmul(module.einsum_str, x.ndim)
    if split is None:
        # Not a plain contraction: decode (materialises this one kernel) and use einsum.
        y = jnp.einsum(module.einsum_str, x, w.decode(x.dtype).reshape(kshape))
    else:
        n_c, _ = split
        lead = x.shape[: x.ndim - n_c]
        out_dims = kshape[n_c:]
        y = matmul(x.reshape(*lead, math.prod(x.shape[len(lead) :])), w).reshape(*lead, *out_dims)
    if getattr(module, "use_bias", False) and module.has_variable("params", "bias"):
        bias = jnp.asarray(module.get_variable("params", "bias")).astype(y.dtype)
        y = y + bias
    return y


def quantized_linen_interceptor(next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
    """Linen interceptor routing quantized ``Dense``/``DenseGeneral``/``Einsum`` to ``ops.matmul``.

    Use as ``with nn.intercept_methods(quantized_linen_interceptor): model.apply(...)``.
    """
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, _LINEN_TYPES):
        return next_fun(*args, **kwargs)
    if not module.has_variable("params", "kernel"):
        return next_fun(*args, **kwargs)
    w = module.get_variable("params", "kernel")
    if not is_quantized(w):
        return next_fun(*args, **kwargs)
    x = jnp.asarray(_inputs(args, kwargs))
    if isinstance(module, nn.Einsum):
        return _einsum(module, x, w)
    if isinstance(module, nn.DenseGeneral):
        return _dense_general(module, x, w)
    return _dense(module, x, w)


class QuantizedLinear(nnx.Module):
    """An ``nnx.Linear`` replacement whose kernel may be a quantized array.

    Attributes:
        kernel: ``nnx.Param`` holding a quantized array (or a dense ``(d_in, d_out)``).
        bias: ``nnx.Param`` of shape ``(d_out,)`` or ``None``.
        impl: implementation name forwarded to ``ops.matmul`` (``None``: automatic).
    """

    def __init__(self, kernel: Any, bias: jax.Array | None, *, dtype: Any = None, impl: str | None = None):
        self.kernel = nnx.Param(kernel)
        self.bias = None if bias is None else nnx.Param(bias)
        self.dtype = dtype
        self.impl = impl

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.dtype is not None:
            x = x.astype(self.dtype)
        y = matmul(x, self.kernel.get_value(), impl=self.impl)
        if self.bias is not None:
            y = y + self.bias.get_value().astype(y.dtype)
        return y


def _parent_and_key(root: Any, path: tuple) -> tuple[Any, Any]:
    parent = root
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    return parent, path[-1]


def swap_linear(model: nnx.Module, *, impl: str | None = None, only_quantized: bool = True) -> int:
    """Replace ``nnx.Linear`` layers of ``model`` in place by ``QuantizedLinear``.

    Args:
        model: an NNX module tree, typically after ``nnx.update(model, quantized_state)``.
        impl: implementation name for every swapped layer (``None``: automatic).
        only_quantized: swap only layers whose kernel is a quantized array.

    Returns:
        The number of layers replaced.
    """
    targets = []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Linear) and path:
            kernel = node.kernel.get_value()
            if is_quantized(kernel) or not only_quantized:
                targets.append((path, node))
    for path, node in targets:
        bias = None if node.bias is None else node.bias.get_value()
        new = QuantizedLinear(node.kernel.get_value(), bias, dtype=node.dtype, impl=impl)
        parent, key = _parent_and_key(model, tuple(path))
        if isinstance(key, int):
            parent[key] = new
        else:
            setattr(parent, key, new)
    return len(targets)


__all__ = ["QuantizedLinear", "quantized_linen_interceptor", "swap_linear"]
