"""The protocol a model implements to be quantized block by block.

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

To quantize another architecture, implement ``BlockwiseModel`` (see
``jaxquant.models.blocks.LlamaBlocks``) and pass the object to ``quantize_model``, or
register an adapter for the model's type with ``register_blockwise``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import jax


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


# Model types that have a ``BlockwiseModel`` adapter: ``jaxquant.models`` registers its own.
_ADAPTERS: dict[type, Callable[[Any], BlockwiseModel]] = {}


def register_blockwise(model_type: type, adapter: Callable[[Any], BlockwiseModel]) -> None:
    """Let ``quantize_model`` take models of ``model_type`` directly, through ``adapter(model)``."""
    _ADAPTERS[model_type] = adapter


def as_blockwise(model: Any) -> BlockwiseModel:
    """Wrap a model of a registered type (``LlamaForCausalLM``) or accept a ``BlockwiseModel`` as is.

    Raises:
        TypeError: neither.
    """
    for model_type, adapter in _ADAPTERS.items():
        if isinstance(model, model_type):
            return adapter(model)
    missing = [n for n in ("params", "num_blocks", "dtype", "block_prefix", "block_params", "block_fn", "embed", "head")
               if not hasattr(model, n)]
    if missing:
        raise TypeError(
            f"model must be of a registered type ({', '.join(t.__name__ for t in _ADAPTERS) or 'none'}) or implement "
            "jaxquant.pipeline.BlockwiseModel; "
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


__all__ = ["BlockFn", "BlockwiseModel", "ComposedApply", "as_blockwise", "register_blockwise"]
