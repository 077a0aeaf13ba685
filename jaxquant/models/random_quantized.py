"""Quantized models without dense weights: random AQLM kernels, and a per-model matmul choice.

Benchmarks of memory and decode speed need a quantized model of a given *shape* — a
Llama-2-7B-shaped model does not fit in memory in float32, so it can neither be built
densely nor quantized from dense weights. ``random_quantized_state`` walks a (typically
abstract, ``nnx.eval_shape``) parameter state and puts a random ``AdditiveQuantized``
array where each selected linear kernel is, built directly from random codes and
codebooks; the dense weight never exists. Decode speed does not depend on the values.

``use_matmul_impl`` makes every linear layer of a model call ``ops.matmul`` with a named
implementation (``"cpu_ffi"``, ``"xla_lut"`` …). The model's ``Linear`` layers are
swapped in place for ``ImplLinear``, which keeps the same parameters under the same
names, so a state built for the original model runs unchanged. The name is a static
attribute of the module, hence part of the graph definition: ``jax.jit`` (and
``generate``) compile a separate program per implementation instead of reusing one
traced with another.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant import ops
from jaxquant.models.llama import Linear
from jaxquant.qarray import AdditiveQuantized, check_layout, code_dtype, is_quantized
from jaxquant.select import linear_kernels, path_to_str
from jaxquant.validate import require_positive_int


def _leaf_rng(seed: int, path: str) -> np.random.Generator:
    # A stable per-path stream: the same leaf gets the same values whatever else the tree
    # holds. NumPy, not jax.random: it needs no compilation per shape (seconds each on a
    # small machine) and fills a 7B model's 1.6 GB of codes at memory speed.
    return np.random.default_rng([seed, zlib.crc32(path.encode("utf-8"))])


def random_additive(
    seed: int | np.random.Generator,
    d_in: int,
    d_out: int,
    *,
    num_codebooks: int = 2,
    codebook_bits: int = 8,
    group_size: int = 8,
    weight_std: float | None = None,
    layout: str = "in_out",
    codebook_dtype: Any = jnp.float32,
) -> AdditiveQuantized:
    """A random ``AdditiveQuantized`` weight of logical shape ``d_in × d_out``.

    Codes are uniform over the ``2**codebook_bits`` codewords; codewords are Gaussian with
    variance ``1 / num_codebooks`` so that a sum of ``M`` of them has unit variance, and
    every output row is scaled by ``weight_std``. The decoded weight thus has entries of
    standard deviation ≈ ``weight_std`` (default ``1 / sqrt(d_in)``, which keeps
    activations of order one through a deep random model).

    Args:
        seed: an integer seed or a NumPy generator.
        d_in: input features (a multiple of ``group_size``).
        d_out: output features.
        num_codebooks: ``M``.
        codebook_bits: ``B`` (codes are uint8 for ``B ≤ 8``, uint16 for ``B ≤ 16``).
        group_size: input features per code (``in_group_size``; ``out_group_size`` is 1).
        weight_std: standard deviation of the decoded weight; ``None`` for ``1/sqrt(d_in)``.
        layout: ``"in_out"`` (Flax kernel, the default) or ``"out_in"``.
        codebook_dtype: dtype of codebooks and scales.

    Returns:
        The quantized array; its ``shape`` is ``(d_in, d_out)`` for ``"in_out"``.

    Raises:
        ValueError: a non-positive size, ``d_in`` not divisible by ``group_size``, or
            ``codebook_bits`` outside ``1..16``.
    """
    for name, value in (("d_in", d_in), ("d_out", d_out), ("num_codebooks", num_codebooks), ("group_size", group_size)):
        require_positive_int(name, value)
    if d_in % group_size:
        raise ValueError(f"d_in={d_in} is not divisible by group_size={group_size}")
    if not 1 <= codebook_bits <= 16:
        raise ValueError(f"codebook_bits={codebook_bits} must be in 1..16")
    layout = check_layout(layout)
    std = float(weight_std) if weight_std is not None else 1.0 / float(np.sqrt(d_in))
    if not std > 0.0:
        raise ValueError(f"weight_std={weight_std!r} must be positive")
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2**codebook_bits, (d_out, d_in // group_size, num_codebooks), dtype=code_dtype(codebook_bits))
    books = rng.standard_normal((num_codebooks, 2**codebook_bits, 1, group_size), dtype=np.float32)
    books *= np.float32(1.0 / np.sqrt(num_codebooks))
    scales = np.full((d_out, 1, 1, 1), std, np.float32)
    shape = (d_in, d_out) if layout == "in_out" else (d_out, d_in)
    return AdditiveQuantized(
        jnp.asarray(codes), jnp.asarray(books, codebook_dtype), jnp.asarray(scales, codebook_dtype),
        codebook_bits, shape, layout,
    )


def _random_dense(rng: np.random.Generator, name: str, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    if name == "scale":  # norm gains
        return jnp.ones(shape, dtype)
    if name == "bias":
        return jnp.zeros(shape, dtype)
    # Embeddings and dense kernels: unit-gain Gaussian (std 1/sqrt(fan-in) for a Flax
    # (d_in, d_out) kernel, 1 for an embedding table whose rows are looked up).
    std = 1.0 if name == "embedding" or len(shape) != 2 else 1.0 / float(np.sqrt(shape[0]))
    values = rng.standard_normal(shape, dtype=np.float32)
    values *= np.float32(std)
    return jnp.asarray(values, dtype)


def random_quantized_state(
    state: Any,
    seed: int,
    *,
    num_codebooks: int = 2,
    codebook_bits: int = 8,
    group_size: int = 8,
    where: Callable[[str, Any], bool] = linear_kernels,
    dense_dtype: Any = None,
    abstract: bool = False,
) -> Any:
    """Replace the selected kernels of ``state`` by random AQLM arrays, never dense.

    Args:
        state: an NNX state (or any pytree) of arrays or ``jax.ShapeDtypeStruct`` leaves,
            e.g. ``nnx.split(abstract_model(cfg))[1]``.
        seed: integer seed; each leaf draws from a stream derived from it and its path.
        num_codebooks: ``M`` of the random arrays.
        codebook_bits: ``B`` of the random arrays.
        group_size: input features per code.
        where: predicate ``(path, leaf) -> bool`` choosing the kernels to quantize
            (default: linear-layer kernels, not embeddings, norms or the head). Selected
            leaves must be 2-D Flax ``(d_in, d_out)`` kernels.
        dense_dtype: dtype of the matrices that stay dense (embeddings, an unquantized
            head), e.g. bfloat16 as AQLM checkpoints keep them in 16 bits; vectors (norm
            scales, biases) keep their own dtype. ``None`` keeps every leaf's own.
        abstract: draw nothing; return the tree with ``jax.ShapeDtypeStruct`` arrays (in
            quantized leaves too), to count bytes before allocating anything.

    Returns:
        A tree of the same structure. Selected leaves are ``AdditiveQuantized``
        (``layout="in_out"``); abstract unselected leaves are materialised (norm scales
        ones, biases zeros, matrices Gaussian); concrete unselected leaves are kept
        (matrices cast to ``dense_dtype`` when given).

    Raises:
        ValueError: a selected leaf is not 2-D or its ``d_in`` is not divisible by
            ``group_size`` (the message names the path).
    """

    def one(path_keys: tuple, leaf: Any) -> Any:
        if is_quantized(leaf):
            return leaf
        path = path_to_str(path_keys)
        if where(path, leaf):
            if len(leaf.shape) != 2:
                raise ValueError(f"{path}: selected leaf has shape {tuple(leaf.shape)}, expected a 2-D kernel")
            d_in, d_out = (int(s) for s in leaf.shape)
            if d_in % group_size:
                raise ValueError(f"d_in={d_in} is not divisible by group_size={group_size} at {path}")
            if abstract:
                return AdditiveQuantized(
                    jax.ShapeDtypeStruct((d_out, d_in // group_size, num_codebooks), code_dtype(codebook_bits)),
                    jax.ShapeDtypeStruct((num_codebooks, 2**codebook_bits, 1, group_size), jnp.float32),
                    jax.ShapeDtypeStruct((d_out, 1, 1, 1), jnp.float32),
                    codebook_bits, (d_in, d_out), "in_out",
                )
            return random_additive(
                _leaf_rng(seed, path), d_in, d_out, num_codebooks=num_codebooks,
                codebook_bits=codebook_bits, group_size=group_size,
            )
        dtype = leaf.dtype if dense_dtype is None or len(leaf.shape) < 2 else dense_dtype
        if abstract:
            return jax.ShapeDtypeStruct(tuple(leaf.shape), dtype)
        if isinstance(leaf, jax.ShapeDtypeStruct):
            return _random_dense(_leaf_rng(seed, path), path.rsplit("/", 1)[-1], tuple(leaf.shape), jnp.dtype(dtype))
        return leaf if leaf.dtype == dtype else jnp.asarray(leaf).astype(dtype)

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=is_quantized)


def resident_bytes(tree: Any) -> int:
    """Bytes the arrays of ``tree`` occupy now (quantized codes one byte each)."""
    total = 0
    for leaf in jax.tree.leaves(tree, is_leaf=is_quantized):
        if is_quantized(leaf):
            total += leaf.resident_bytes
        elif hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            total += int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
    return total


class ImplLinear(nnx.Module):
    """A ``Linear`` that asks ``ops.matmul`` for one implementation by name.

    Attributes:
        kernel: the original layer's ``nnx.Param`` (dense ``(d_in, d_out)`` or quantized).
        bias: the original layer's bias ``nnx.Param`` or ``None``.
        impl: implementation name (see ``jaxquant.ops.dispatch.IMPLEMENTATIONS``).
        fallback: when the named implementation declines a call (``NotImplementedError``,
            e.g. a prefill with more rows than it takes), use the dispatcher's own choice
            instead of raising.
    """

    def __init__(self, kernel: nnx.Param, bias: nnx.Param | None, *, impl: str, fallback: bool) -> None:
        self.kernel = kernel
        self.bias = bias
        self.impl = impl
        self.fallback = fallback

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.kernel.get_value()
        try:
            y = ops.matmul(x, w, impl=self.impl)
        except NotImplementedError:
            # Decided at trace time: the compiled program holds exactly one implementation.
            if not self.fallback:
                raise
            y = ops.matmul(x, w)
        if self.bias is not None:
            y = y + self.bias.get_value().astype(y.dtype)
        return y


def use_matmul_impl(model: nnx.Module, impl: str, *, fallback: bool = True) -> int:
    """Make every linear layer of ``model`` run ``ops.matmul(..., impl=impl)``; in place.

    The layers' parameters are kept (same objects, same paths), so ``nnx.split(model)``
    gives the same state structure as before and any state built for the original model
    (e.g. from ``random_quantized_state``) can be merged with the new graph definition.

    Args:
        model: a jaxquant model (``LlamaForCausalLM``), concrete or abstract.
        impl: an implementation name accepted by ``ops.matmul``.
        fallback: see ``ImplLinear``.

    Returns:
        The number of layers swapped.

    Raises:
        ValueError: ``impl`` is not a known implementation name.
    """
    from jaxquant.ops.dispatch import IMPLEMENTATIONS  # noqa: PLC0415 - the one table of names

    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl={impl!r} is not one of {sorted(IMPLEMENTATIONS)}")
    targets = [(tuple(path), node) for path, node in nnx.iter_graph(model) if path and isinstance(node, (Linear, ImplLinear))]
    for path, node in targets:
        parent = model
        for part in path[:-1]:
            parent = parent[part] if isinstance(part, int) else getattr(parent, part)
        new = ImplLinear(node.kernel, node.bias, impl=impl, fallback=fallback)
        if isinstance(path[-1], int):
            parent[path[-1]] = new
        else:
            setattr(parent, path[-1], new)
    return len(targets)


__all__ = ["ImplLinear", "random_additive", "random_quantized_state", "resident_bytes", "use_matmul_impl"]
