"""Perplexity over non-overlapping windows, and the unigram baseline it is judged against."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxquant.data import as_token_array, eval_windows

ApplyFn = Callable[[Any, jax.Array], jax.Array]


def _nll_sum_impl(apply_fn: ApplyFn, params: Any, windows: jax.Array, weights: jax.Array) -> jax.Array:
    # Position t predicts token t + 1; the last position of a window predicts nothing.
    logits = apply_fn(params, windows[:, :-1]).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    target = jnp.take_along_axis(logp, windows[:, 1:, None], axis=-1)[..., 0]
    return -jnp.sum(target * weights[:, None])


# Module-level jit: one compilation per (apply_fn, tree structure, batch shape).
nll_sum = jax.jit(_nll_sum_impl, static_argnums=0)


def perplexity(
    apply_fn: ApplyFn,
    params: Any,
    tokens: Any,
    seqlen: int,
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> float:
    """Perplexity of ``tokens`` in non-overlapping windows of ``seqlen`` tokens.

    Each window is scored independently (no context carried over); every token but the
    first of each window is predicted, and the perplexity is ``exp`` of the mean negative
    log-likelihood over all predicted tokens (GPTQ/AQLM paper convention).

    Args:
        apply_fn: ``apply_fn(params, tokens [B, T]) -> logits [B, T, V]``.
        params: parameters (dense or quantized) for ``apply_fn``.
        tokens: 1-D token ids of the evaluation text.
        seqlen: window length.
        batch_size: windows per forward pass (the last batch is padded, weights zero).
        progress: show a progress bar.

    Returns:
        The perplexity (a Python float).

    Raises:
        ValueError: no tokens, fewer tokens than one window, or a non-finite loss.
    """
    arr = as_token_array(tokens)
    if arr.size == 0:
        raise ValueError("evaluation text is empty: no tokens to score")
    windows = eval_windows(arr, seqlen)
    n = len(windows)
    batch_size = max(1, min(batch_size, n))
    total = 0.0
    batches = range(0, n, batch_size)
    for start in tqdm(batches, desc="perplexity", disable=not progress, leave=False):
        chunk = windows[start : start + batch_size]
        weights = np.ones(batch_size, np.float32)
        if len(chunk) < batch_size:  # pad to one shape so the last batch reuses the compilation
            weights[len(chunk) :] = 0.0
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - len(chunk), axis=0)])
        total += float(nll_sum(apply_fn, params, jnp.asarray(chunk), jnp.asarray(weights)))
    mean_nll = total / (n * (seqlen - 1))
    if not math.isfinite(mean_nll):
        raise ValueError(f"perplexity: the mean negative log-likelihood is {mean_nll} (non-finite logits?)")
    return math.exp(mean_nll)


def unigram_perplexity(train_tokens: Any, eval_tokens: Any, vocab_size: int) -> float:
    """Perplexity of a unigram model (add-one smoothed token frequencies of ``train_tokens``).

    The floor any useful language model must beat by a wide margin.
    """
    train, test = as_token_array(train_tokens), as_token_array(eval_tokens)
    if test.size == 0:
        raise ValueError("evaluation text is empty: no tokens to score")
    if train.max(initial=0) >= vocab_size or test.max(initial=0) >= vocab_size:
        raise ValueError(f"token ids exceed vocab_size={vocab_size}")
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(np.exp(-np.mean(logp[test])))

