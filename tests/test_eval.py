"""Perplexity against a direct reference, exact known values, and the unigram baseline."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxquant import eval as jq_eval
from jaxquant.eval import perplexity, unigram_perplexity
from jaxquant.models import LlamaForCausalLM, ModelConfig, functional

CFG = ModelConfig(hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8,
                  max_position_embeddings=32, vocab_size=30)


def test_perplexity_matches_reference(rng):
    model = LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))
    nnx.update(model, jax.tree.map(lambda x: x * 30.0 if x.ndim == 2 else x, nnx.state(model)))
    apply_fn, params = functional(model)
    tokens = rng.integers(0, 30, 75)
    # Reference: window by window, log-softmax in float64, positions 1..L-1 predicted.
    nll, count = 0.0, 0
    for w in tokens[:72].reshape(-1, 8):  # 9 windows; the tail of 3 tokens is dropped
        logits = np.asarray(model(jnp.asarray(w[None, :-1], jnp.int32)))[0].astype(np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        nll -= logp[np.arange(7), w[1:]].sum()
        count += 7
    want = math.exp(nll / count)
    got = perplexity(apply_fn, params, tokens, 8, batch_size=4)  # 9 windows: last batch padded
    assert abs(got - want) / want < 1e-5
    assert abs(perplexity(apply_fn, params, tokens, 8, batch_size=9) - got) / got < 1e-5
    assert want > 1.5  # a non-trivial model


def test_uniform_model_has_vocab_perplexity():
    apply_fn = lambda params, t: jnp.zeros((*t.shape, 30), jnp.float32)  # noqa: E731
    assert abs(perplexity(apply_fn, None, np.arange(40) % 30, 10) - 30.0) < 1e-4


def test_no_retrace_across_batches():
    apply_fn = lambda params, t: jnp.zeros((*t.shape, 30), jnp.float32) + params  # noqa: E731
    before = jq_eval.nll_sum._cache_size()
    perplexity(apply_fn, jnp.float32(0.0), np.arange(230) % 30, 10, batch_size=4)  # 23 windows, 6 batches
    assert jq_eval.nll_sum._cache_size() - before == 1


def test_empty_and_short_text():
    apply_fn = lambda params, t: jnp.zeros((*t.shape, 30), jnp.float32)  # noqa: E731
    with pytest.raises(ValueError, match="evaluation text is empty"):
        perplexity(apply_fn, None, np.zeros(0, np.int32), 8)
    with pytest.raises(ValueError, match="fewer than one window of seqlen=8"):
        perplexity(apply_fn, None, np.arange(5), 8)


def test_unigram_perplexity():
    train = np.array([0, 0, 0, 1])
    # add-one counts over a vocabulary of 3: p = (4, 2, 1) / 7
    want = math.exp(-(math.log(4 / 7) + math.log(2 / 7)) / 2)
    assert abs(unigram_perplexity(train, np.array([0, 1]), 3) - want) < 1e-12
    with pytest.raises(ValueError, match="empty"):
        unigram_perplexity(train, np.zeros(0, np.int64), 3)
