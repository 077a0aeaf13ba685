"""Storing the token embeddings and an output head at 16 or 8 bits.

Methods quantize the linear layers and leave these leaves alone by default: their error
goes straight into every token's input or into the logits. On a small model they are a
large part of the file: SmolLM2-135M's tied 49,152 × 576 table holds 28 M of its 135 M
parameters, 113 MB in float32. ``store_embeddings`` shrinks them without data:

- 16 bits: float16 (an 11-bit significand, against bfloat16's 8). A table whose values
  leave float16's range is refused, naming its path.
- 8 bits: round-to-nearest on an asymmetric 8-bit grid per group of a row (by default
  one group per row, with a float16 scale and zero point: 8 + 32/d bits per weight).
  The leaf becomes a ``ScalarQuantized``: ``jaxquant.models`` gathers embedding rows
  from it without decoding the table, and computes a tied head through ``ops.matmul``.

Leaves are found by path (``qarray.EMBEDDING_OR_HEAD``); ``tree_bits`` counts them
apart from the linear layers.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxquant.qarray import EMBEDDING_OR_HEAD, flatten_by_path, is_quantized
from jaxquant.quantize import quantize_weight
from jaxquant.recipes import RTN

EMBEDDING_BITS = (32, 16, 8)
_FLOAT_BY_BITS = {32: jnp.float32, 16: jnp.float16}


def _is_table(path: str, leaf: Any) -> bool:
    return (
        EMBEDDING_OR_HEAD.search(path) is not None
        and not is_quantized(leaf)
        and getattr(leaf, "ndim", 0) == 2
        and jnp.issubdtype(leaf.dtype, jnp.floating)
    )


def _stored(w: jax.Array, path: str, bits: int, group_size: int | None) -> Any:
    if bits in _FLOAT_BY_BITS:
        dtype = _FLOAT_BY_BITS[bits]
        amax = float(jnp.max(jnp.abs(w)))
        if amax > float(jnp.finfo(dtype).max):
            raise ValueError(f"the table at {path} has max |w|={amax:g}, beyond {jnp.dtype(dtype).name}'s range")
        return w.astype(dtype)
    # A Flax kernel (``head/kernel``) is (d_in, d_out); tables and PyTorch weights are
    # (rows, d): either way, one grid per output row.
    layout = "in_out" if path.rsplit("/", 1)[-1] == "kernel" else "out_in"
    return quantize_weight(w, None, RTN(bits=8, group_size=group_size), layout=layout, path=path)


def store_embeddings(tree: Any, bits: int, *, group_size: int | None = None) -> Any:
    """Store every token embedding and output head of ``tree`` at ``bits`` bits.

    Args:
        tree: a parameter tree (NNX state, Linen params, dict); other leaves and
            already-quantized ones are returned as they are.
        bits: 32 (float32), 16 (float16) or 8 (round-to-nearest, ``ScalarQuantized``).
        group_size: at 8 bits, columns sharing one scale and zero point; ``None`` for one
            group per row.

    Returns:
        The tree with its embedding and head leaves replaced.

    Raises:
        ValueError: ``bits`` is not one of 32, 16, 8; no leaf of ``tree`` is an
            embedding or head; a value does not fit float16; a row's width is not a
            multiple of ``group_size``.
    """
    if bits not in EMBEDDING_BITS:
        raise ValueError(f"bits={bits!r} must be one of {EMBEDDING_BITS}")
    flat, treedef = flatten_by_path(tree)
    tables = [_is_table(path, leaf) for path, leaf in flat]
    if not any(tables):
        paths = [path for path, _ in flat]
        raise ValueError(
            f"store_embeddings: no 2-D float leaf's path matches {EMBEDDING_OR_HEAD.pattern!r} "
            f"(paths: {paths[:8]}{' ...' if len(paths) > 8 else ''})"
        )
    leaves = [_stored(jnp.asarray(leaf), path, bits, group_size) if table else leaf
              for (path, leaf), table in zip(flat, tables, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, leaves)
