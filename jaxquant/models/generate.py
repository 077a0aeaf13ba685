"""Text generation: a jit-compiled prefill, then a jit-compiled decode loop over a KV cache.

Shapes are bucketed so that prompts of different lengths reuse one compilation: the
prompt is right-padded to a multiple of ``bucket`` tokens and the cache sized to hold the
padded prompt plus the new tokens. Padding is harmless: the causal mask hides every slot
past the newest token, and decode step ``t`` overwrites slot ``t`` before attending to it.

``use_cache=False`` runs the same loop by recomputing the whole (fixed-size) sequence
each step; it exists to check the cache, and the two give identical greedy tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.models.llama import LlamaForCausalLM
from jaxquant.validate import require_positive_int


def sample_token(logits: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """Next token ids ``[B]`` from logits ``[B, V]``: greedy when ``temperature == 0``.

    Top-p keeps the smallest set of most likely tokens whose probability reaches
    ``top_p`` (always at least the most likely one), renormalised.
    """
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / jnp.float32(temperature)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        keep_sorted = before < jnp.float32(top_p)
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, jnp.float32(-jnp.inf))
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _check_sampling(temperature: float, top_p: float) -> None:
    if not temperature >= 0.0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "temperature", "top_p", "use_cache", "on_token"))
def _generate_jit(
    graphdef: Any,
    params: Any,
    buffer: jax.Array,
    prompt_len: jax.Array,
    key: jax.Array,
    *,
    steps: int,
    temperature: float,
    top_p: float,
    use_cache: bool,
    on_token: Any = None,
) -> jax.Array:
    model = nnx.merge(graphdef, params)

    def emit(tokens: jax.Array) -> None:
        if on_token is not None:  # ordered: the host sees the tokens in the order they are made
            jax.debug.callback(on_token, tokens, ordered=True)

    batch, total = buffer.shape
    keys = jax.random.split(key, steps)

    if use_cache:
        cache = model.init_cache(batch, total)
        # Prefill the whole buffer (prompt + padding); the logits at the last prompt
        # position give the first new token.
        logits, cache = model.forward(buffer, cache, 0)
        last = jax.lax.dynamic_index_in_dim(logits, prompt_len - 1, axis=1, keepdims=False)
        first = sample_token(last, keys[0], temperature, top_p)
        emit(first)
        buffer = jax.lax.dynamic_update_slice(buffer, first[:, None], (0, prompt_len))

        def step(carry: tuple, k: jax.Array) -> tuple:
            buf, cache, pos = carry
            tok = jax.lax.dynamic_slice(buf, (0, pos), (batch, 1))
            logits, cache = model.forward(tok, cache, pos)
            nxt = sample_token(logits[:, 0], k, temperature, top_p)
            emit(nxt)
            buf = jax.lax.dynamic_update_slice(buf, nxt[:, None], (0, pos + 1))
            return (buf, cache, pos + 1), None

        (buffer, _, _), _ = jax.lax.scan(step, (buffer, cache, prompt_len), keys[1:])
        return buffer

    def step_nocache(carry: tuple, k: jax.Array) -> tuple:
        buf, pos = carry  # pos: number of valid tokens
        logits = model(buf)
        last = jax.lax.dynamic_index_in_dim(logits, pos - 1, axis=1, keepdims=False)
        nxt = sample_token(last, k, temperature, top_p)
        emit(nxt)
        buf = jax.lax.dynamic_update_slice(buf, nxt[:, None], (0, pos))
        return (buf, pos + 1), None

    (buffer, _), _ = jax.lax.scan(step_nocache, (buffer, prompt_len), keys)
    return buffer


def generate(
    model: LlamaForCausalLM,
    prompt: Any,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    key: jax.Array | None = None,
    params: Any = None,
    use_cache: bool = True,
    bucket: int = 64,
    max_length: int | None = None,
    on_token: Callable[[np.ndarray], None] | None = None,
) -> np.ndarray:
    """Continue ``prompt`` by ``max_new_tokens`` tokens.

    Args:
        model: the model (its graph; its weights unless ``params`` is given).
        prompt: token ids ``[T]`` or ``[B, T]`` (every row the same length).
        max_new_tokens: tokens to generate (>= 1).
        temperature: 0 for greedy decoding, else the softmax temperature.
        top_p: nucleus sampling mass in ``(0, 1]``.
        key: PRNG key for sampling (default ``PRNGKey(0)``).
        params: NNX state to run instead of the model's own (e.g. quantized).
        use_cache: decode with the KV cache (fast) or by recomputing the sequence.
        bucket: pad lengths to a multiple of this to share compilations.
        max_length: context limit; defaults to ``config.max_position_embeddings``.
        on_token: called on the host with each new token's ids ``[B]`` as it is made, in
            order (to stream text). A new function compiles the loop anew; pass the same
            one to reuse a compilation.

    Returns:
        ``[B, max_new_tokens]`` (or ``[max_new_tokens]`` for a 1-D prompt) new token ids.

    Raises:
        ValueError: an empty prompt, a bad sampling setting, or prompt plus new tokens
            longer than the context.
    """
    _check_sampling(temperature, top_p)
    tokens = np.asarray(prompt)
    squeeze = tokens.ndim == 1
    tokens = tokens[None] if squeeze else tokens
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(f"prompt must be a non-empty [T] or [B, T] array of token ids, got shape {tokens.shape}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise TypeError(f"prompt must hold integer token ids, got dtype {tokens.dtype}")
    require_positive_int("max_new_tokens", max_new_tokens)
    cfg = model.config
    limit = cfg.max_position_embeddings if max_length is None else max_length
    batch, t = tokens.shape
    if t + max_new_tokens > limit:
        raise ValueError(
            f"prompt of {t} tokens plus max_new_tokens={max_new_tokens} exceeds the model's context of {limit} tokens"
        )
    if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {cfg.vocab_size}), got [{tokens.min()}, {tokens.max()}]")
    total = min(-(-(t + max_new_tokens) // bucket) * bucket, limit)
    buffer = np.zeros((batch, total), np.int32)
    buffer[:, :t] = tokens
    graphdef, own = nnx.split(model)
    params = own if params is None else params
    key = jax.random.PRNGKey(0) if key is None else key
    out = _generate_jit(
        graphdef, params, jnp.asarray(buffer), jnp.int32(t), key,
        steps=max_new_tokens, temperature=float(temperature), top_p=float(top_p), use_cache=use_cache,
        on_token=on_token,
    )
    new = np.asarray(out)[:, t : t + max_new_tokens]
    return new[0] if squeeze else new
