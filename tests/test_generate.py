"""Generation: KV-cache decoding equals recomputation; sampling; one compilation per bucket."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxquant.models import LlamaForCausalLM, ModelConfig, generate, sample_token
import importlib

generate_module = importlib.import_module("jaxquant.models.generate")

CFG = ModelConfig(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  max_position_embeddings=64, vocab_size=60, sliding_windows=(6, None))


@pytest.fixture(scope="module")
def model():
    m = LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))
    # Larger weights than the 0.02 init give varied (non-constant) greedy continuations.
    nnx.update(m, jax.tree.map(lambda x: x * 20.0 if x.ndim == 2 else x, nnx.state(m)))
    return m


def _reference_greedy(model, prompt, n):
    """Greedy decoding by the full forward pass, no cache: the sequence so far, padded to the
    context (causal attention ignores what follows), one compiled forward for every step."""
    graph, state = nnx.split(model)
    forward = jax.jit(lambda state, tokens: nnx.merge(graph, state)(tokens)[0])
    seq = list(prompt)
    for _ in range(n):
        tokens = np.zeros((1, CFG.max_position_embeddings), np.int32)
        tokens[0, :len(seq)] = seq
        seq.append(int(jnp.argmax(forward(state, jnp.asarray(tokens))[len(seq) - 1])))
    return np.asarray(seq[len(prompt):])


@pytest.mark.slow
def test_greedy_cache_equals_no_cache_and_reference(model, rng):
    prompt = rng.integers(0, 60, (2, 9))
    cached = generate(model, prompt, 15)
    plain = generate(model, prompt, 15, use_cache=False)
    np.testing.assert_array_equal(cached, plain)
    np.testing.assert_array_equal(cached[0, :6], _reference_greedy(model, prompt[0], 6))
    assert len(set(cached[0].tolist())) > 3  # a non-trivial continuation


@pytest.mark.parametrize("use_cache", [True, False])
def test_on_token_streams_every_token_in_order(model, rng, use_cache):
    prompt = rng.integers(0, 60, (2, 9))
    seen: list[np.ndarray] = []
    new = generate(model, prompt, 7, use_cache=use_cache, on_token=lambda t: seen.append(np.asarray(t)))
    assert len(seen) == 7
    np.testing.assert_array_equal(np.stack(seen, axis=1), new)
    np.testing.assert_array_equal(new, generate(model, prompt, 7, use_cache=use_cache))  # streaming changes nothing


def test_one_compilation_per_bucket(model, rng):
    before = generate_module._generate_jit._cache_size()
    for length in (5, 7, 11):  # all pad to the same 64-token bucket
        generate(model, rng.integers(0, 60, (1, length)), 8, bucket=32)
    assert generate_module._generate_jit._cache_size() - before == 1


def test_prompt_too_long_and_bad_settings(model):
    with pytest.raises(ValueError, match="prompt of 60 tokens plus max_new_tokens=10 exceeds the model's context of 64"):
        generate(model, np.zeros(60, np.int32), 10)
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, np.zeros(0, np.int32), 3)
    with pytest.raises(ValueError, match="top_p=0"):
        generate(model, np.zeros(3, np.int32), 3, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 60\)"):
        generate(model, np.array([1, 99]), 3)


def test_top_p_sampling_stays_in_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.7 keeps exactly the first two.
    logits = jnp.log(jnp.asarray([[0.15, 0.5, 0.05, 0.3]], jnp.float32))
    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    draws = np.asarray(jax.vmap(lambda k: sample_token(logits, k, 1.0, 0.7))(keys))[:, 0]
    assert set(draws.tolist()) == {1, 3}
    frac = np.mean(draws == 1)
    assert abs(frac - 0.5 / 0.8) < 0.08  # renormalised within the nucleus
    # top_p below the top probability is greedy; temperature 0 is argmax.
    assert set(np.asarray(jax.vmap(lambda k: sample_token(logits, k, 1.0, 0.1))(keys))[:, 0].tolist()) == {1}
    assert int(sample_token(logits, keys[0], 0.0, 1.0)[0]) == 1


def test_sampling_is_seeded(model):
    prompt = np.arange(4)
    a = generate(model, prompt, 10, temperature=1.0, top_p=0.9, key=jax.random.PRNGKey(1))
    b = generate(model, prompt, 10, temperature=1.0, top_p=0.9, key=jax.random.PRNGKey(1))
    c = generate(model, prompt, 10, temperature=1.0, top_p=0.9, key=jax.random.PRNGKey(2))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (10,) and not np.array_equal(a, c)
