"""Mixture-of-experts routing: the load-balancing loss against a reference, the logits
recorder, and the trainer's use of both."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxquant.models import LlamaForCausalLM, ModelConfig
from jaxquant.models.routing import load_balancing_loss, record_router_logits
from jaxquant.train import TrainConfig, make_train_step

MOE = ModelConfig(architecture="mixtral", hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, max_position_embeddings=64, vocab_size=50, num_experts=4,
                  experts_per_token=2)


def _reference_balance(logits: np.ndarray, k: int) -> float:
    """E · Σₑ (share of tokens whose k best include e) · (mean probability of e), by loops."""
    logits = logits.reshape(-1, logits.shape[-1]).astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    num_tokens, num_experts = probs.shape
    share = np.zeros(num_experts)
    for t in range(num_tokens):
        for e in np.argsort(-probs[t])[:k]:
            share[e] += 1.0 / num_tokens
    return num_experts * float(np.sum(share * probs.mean(0)))


@pytest.mark.parametrize(("num_experts", "k"), [(4, 1), (4, 2), (8, 2)])
def test_load_balancing_loss_matches_the_reference(rng, num_experts, k):
    logits = rng.normal(size=(3, 7, num_experts)).astype(np.float32) * 2
    np.testing.assert_allclose(float(load_balancing_loss(jnp.asarray(logits), k)), _reference_balance(logits, k),
                               rtol=1e-5)


def test_load_balancing_loss_is_k_when_even_and_grows_when_skewed():
    # Every pair of 4 experts equally often, with equal probabilities: perfectly even use.
    num_experts, k = 4, 2
    pairs = list(itertools.combinations(range(num_experts), k))
    even = np.full((len(pairs), num_experts), -1.0, np.float32)
    for row, pair in zip(even, pairs, strict=True):
        row[list(pair)] = 1.0
    assert float(load_balancing_loss(jnp.asarray(even), k)) == pytest.approx(k, rel=1e-6)
    skewed = np.tile(np.asarray([[3.0, 2.0, -1.0, -1.0]], np.float32), (len(pairs), 1))
    assert float(load_balancing_loss(jnp.asarray(skewed), k)) > 1.5 * k


def test_recorder_sees_each_mixture_layer_once_and_nothing_outside(rng):
    model = LlamaForCausalLM(MOE, rngs=nnx.Rngs(1))
    tokens = jnp.asarray(rng.integers(0, 50, (2, 6)), jnp.int32)
    with record_router_logits() as routings:
        model(tokens)
    assert [(r.shape, k) for r, k in routings] == [((2, 6, 4), 2)] * MOE.num_layers
    model(tokens)  # outside the block: the list is closed
    assert len(routings) == MOE.num_layers


def test_train_step_reports_the_next_token_loss_and_balances_the_router(rng):
    model = LlamaForCausalLM(MOE, rngs=nnx.Rngs(2))
    graphdef, params = nnx.split(model)
    batch = jnp.asarray(rng.integers(0, 50, (4, 9)), jnp.int32)
    optimizer = optax.sgd(1.0)
    results = {}
    for coef in (0.0, 10.0):
        step = make_train_step(graphdef, optimizer, coef)
        copy = jax.tree.map(jnp.array, params)
        results[coef] = step(copy, optimizer.init(copy), batch)
    (p0, _, loss0), (p1, _, loss1) = results[0.0], results[10.0]
    # The reported loss is the next-token loss either way; only the gradient changes.
    assert float(loss0) == pytest.approx(float(loss1), rel=1e-6)
    routers = [f"layers/{i}/mlp/router/kernel" for i in range(MOE.num_layers)]
    flat0, flat1 = dict(nnx.to_flat_state(p0)), dict(nnx.to_flat_state(p1))
    moved = {"/".join(map(str, k)): not np.allclose(np.asarray(flat0[k].get_value()), np.asarray(flat1[k].get_value()))
             for k in flat0}
    assert all(moved[r] for r in routers)
    # Weights that no router depends on get the same update with and without the balance.
    assert not moved["lm_head/kernel"] and not moved["layers/1/mlp/experts/0/down_proj/kernel"]


def test_train_config_rejects_a_negative_router_coefficient():
    with pytest.raises(ValueError, match="router_aux_loss_coef"):
        TrainConfig(router_aux_loss_coef=-0.1)
