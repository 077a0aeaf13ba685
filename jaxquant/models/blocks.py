"""The Llama family as a ``jaxquant.pipeline.BlockwiseModel``: decoder layers are the blocks.

Importing this module registers the adapter, so ``quantize_model`` takes a
``LlamaForCausalLM`` directly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.models.llama import LlamaForCausalLM, rotary_tables
from jaxquant.pipeline.blocks import BlockFn, register_blockwise


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
        return model.head(x)


register_blockwise(LlamaForCausalLM, LlamaBlocks)

__all__ = ["LlamaBlockFn", "LlamaBlocks"]
