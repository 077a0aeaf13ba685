"""Mixture-of-experts routing: top-k gating, and the router load-balancing loss for training.

A training step that wants the load-balancing loss runs the model inside
``record_router_logits()``: every ``SparseMoE`` call inside the block reports its router
logits there, so the loss is computed from the same traced values as the forward pass,
and nothing is stored on the modules.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from jaxquant.thread_scope import thread_setting

_local = threading.local()


def top_k_routing(logits: jax.Array, k: int, normalize: bool = True) -> tuple[jax.Array, jax.Array]:
    """``(weights, experts)``, each ``[..., k]``, from router logits ``[..., num_experts]``:
    the ``k`` most probable experts (best first) and their softmax probabilities (float32),
    renormalised to sum to one with ``normalize`` (Mixtral) or as they are (Qwen2-MoE's
    default)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    return (weights / jnp.sum(weights, axis=-1, keepdims=True) if normalize else weights), experts


@contextlib.contextmanager
def record_router_logits() -> Iterator[list[tuple[jax.Array, int]]]:
    """Collect ``(router logits [..., num_experts], experts per token)`` of every routing
    made inside the ``with`` block, in call order, into the list it yields."""
    seen: list[tuple[jax.Array, int]] = []
    with thread_setting(_local, "seen", seen):
        yield seen


def report_router_logits(logits: jax.Array, k: int) -> None:
    """Called by a mixture-of-experts layer with its router logits; a no-op outside
    ``record_router_logits``."""
    seen = getattr(_local, "seen", None)
    if seen is not None:
        seen.append((logits, k))


def load_balancing_loss(logits: jax.Array, k: int) -> jax.Array:
    """The Switch Transformer / Mixtral auxiliary loss of one routing: ``E · Σₑ fₑ Pₑ``,
    where ``fₑ`` is the fraction of tokens that pick expert ``e`` among their ``k`` and
    ``Pₑ`` the mean router probability of ``e``. It is ``k`` when the experts are used
    evenly and grows as the router favours some of them.

    Args:
        logits: router logits ``[..., num_experts]`` (all leading axes are tokens).
        k: experts picked per token.
    """
    num_experts = logits.shape[-1]
    probs = jax.nn.softmax(logits.reshape(-1, num_experts).astype(jnp.float32), axis=-1)
    _, experts = jax.lax.top_k(probs, k)
    picked = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32), axis=1)  # [tokens, E]
    return num_experts * jnp.sum(jnp.mean(picked, axis=0) * jnp.mean(probs, axis=0))


__all__ = ["load_balancing_loss", "record_router_logits", "report_router_logits", "top_k_routing"]
