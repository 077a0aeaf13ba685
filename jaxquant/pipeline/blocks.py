"""The protocol a model implements to be quantized block by block, and its Llama implementation.

``quantize_model`` sees a model as three pure pieces over one parameter tree:

* ``embed(params, tokens [B, T]) -> hidden [B, T, d]``: everything before the first block;
* ``block_fn(i)(block_params, hidden) -> hidden``: block ``i`` (a transformer layer);
* ``head(params, hidden) -> logits``: everything after the last block (used for evaluation).

plus where each block's parameters live in the tree (``block_prefix(i)``, a path string
such as ``layers/3``; ``block_params(params, i)`` returns exactly that subtree). Paths
inside a block are the block's own (``attn/q_proj/kernel``); recipe patterns and
per-layer keys use the full path (``layers/3/attn/q_proj/kernel``).

``block_fn(i)`` must return a *hashable* callable that is equal for blocks of the same
structure (a frozen dataclass holding the static parts, for instance): jit caches on it,
so every block of one shape shares one compilation. Blocks must route their linear
layers through ``jaxquant.ops.matmul`` (or Flax ``Dense``/``nnx.Linear``) so calibration
sees their inputs and quantized weights run in place of dense ones.

To quantize another architecture, implement ``BlockwiseModel`` (see ``LlamaBlocks``) and
pass the object to ``quantize_model`` instead of the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.models.llama import LlamaForCausalLM, rotary_tables

BlockFn = Callable[[Any, jax.Array], jax.Array]


@runtime_checkable
class BlockwiseModel(Protocol):
    """A model seen as embed → blocks → head over one parameter tree.

    Attributes:
        params: the full-precision parameter tree (its path strings name layers in
            recipes, logs and keys).
        num_blocks: number of blocks, quantized in order ``0 .. num_blocks - 1``.
        dtype: activation dtype the blocks compute in.
    """

    params: Any
    num_blocks: int
    dtype: Any

    def block_prefix(self, i: int) -> str:
        """Path of block ``i``'s subtree in ``params`` (``"layers/3"``)."""
        ...

    def block_params(self, params: Any, i: int) -> Any:
        """The subtree of ``params`` at ``block_prefix(i)``."""
        ...

    def block_fn(self, i: int) -> BlockFn:
        """A hashable pure ``(block params, hidden [B, T, d]) -> hidden [B, T, d]``."""
        ...

    def embed(self, params: Any, tokens: jax.Array) -> jax.Array:
        """Inputs of block 0 for token ids ``[B, T]``."""
        ...

    def head(self, params: Any, hidden: jax.Array) -> jax.Array:
        """Logits from the last block's outputs."""
        ...


@dataclasses.dataclass(frozen=True)
class LlamaBlockFn:
    """One Llama decoder layer as a pure function of its parameters (hashable, jit-static).

    Attributes:
        graphdef: NNX graph definition of the layer (equal for layers of equal structure).
        inv_freq: RoPE inverse frequencies (a tuple, so the object hashes).
        dtype: activation dtype name.
    """

    graphdef: Any
    inv_freq: tuple[float, ...]
    dtype: str

    def __call__(self, params: Any, x: jax.Array) -> jax.Array:
        layer = nnx.merge(self.graphdef, params)
        q_pos = jnp.arange(x.shape[1], dtype=jnp.int32)
        cos, sin = rotary_tables(np.asarray(self.inv_freq, np.float32), q_pos)
        y, _ = layer(x.astype(self.dtype), cos, sin, q_pos, None, 0)
        return y


class LlamaBlocks:
    """``BlockwiseModel`` for ``jaxquant.models.LlamaForCausalLM`` (Llama, Mistral, Qwen2).

    Blocks are the decoder layers (``layers/{i}``); the embedding, the final norm and the
    head stay outside. Attention runs without a cache over positions ``0 .. T-1``.
    """

    def __init__(self, model: LlamaForCausalLM) -> None:
        if not isinstance(model, LlamaForCausalLM):
            raise TypeError(f"LlamaBlocks needs a LlamaForCausalLM, got {type(model).__name__}")
        self.config = model.config
        self.dtype = jnp.dtype(model.dtype)
        self.graphdef, self.params = nnx.split(model)
        self.num_blocks = len(model.layers)
        self.vocab_size = model.config.vocab_size
        inv_freq = tuple(float(f) for f in model.config.inv_freq())
        self._fns = [
            LlamaBlockFn(nnx.split(layer)[0], inv_freq, self.dtype.name) for layer in model.layers
        ]

    def block_prefix(self, i: int) -> str:
        return f"layers/{i}"

    def block_params(self, params: Any, i: int) -> Any:
        return params["layers"][i]

    def block_fn(self, i: int) -> BlockFn:
        return self._fns[i]

    def embed(self, params: Any, tokens: jax.Array) -> jax.Array:
        return nnx.merge(self.graphdef, params).embed(tokens)

    def head(self, params: Any, hidden: jax.Array) -> jax.Array:
        model = nnx.merge(self.graphdef, params)
        x = model.final_norm(hidden.astype(self.dtype))
        if model.lm_head is None:
            return jnp.einsum("btd,vd->btv", x, model.embed.embedding.get_value().astype(x.dtype))
        return model.lm_head(x)


def as_blockwise(model: Any) -> BlockwiseModel:
    """Wrap a supported model (``LlamaForCausalLM``) or accept a ``BlockwiseModel`` as is.

    Raises:
        TypeError: neither.
    """
    if isinstance(model, LlamaForCausalLM):
        return LlamaBlocks(model)
    missing = [n for n in ("params", "num_blocks", "dtype", "block_prefix", "block_params", "block_fn", "embed", "head")
               if not hasattr(model, n)]
    if missing:
        raise TypeError(
            f"model must be a LlamaForCausalLM or implement jaxquant.pipeline.BlockwiseModel; "
            f"{type(model).__name__} lacks {missing}"
        )
    return model


@dataclasses.dataclass(frozen=True, eq=False)
class ComposedApply:
    """``apply(params, tokens) -> logits`` through embed → every block → head (for evaluation)."""

    blockwise: Any

    def __call__(self, params: Any, tokens: jax.Array) -> jax.Array:
        m = self.blockwise
        x = m.embed(params, tokens)
        for i in range(m.num_blocks):
            x = m.block_fn(i)(m.block_params(params, i), x)
        return m.head(params, x)


__all__ = ["BlockFn", "BlockwiseModel", "ComposedApply", "LlamaBlockFn", "LlamaBlocks", "as_blockwise"]
