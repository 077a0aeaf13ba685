"""PV-Tuning on a tiny Llama: KL to the full-precision teacher goes down (PV and STE)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxquant as jq
from jaxquant.finetune import losses, pv
from jaxquant.models import LlamaForCausalLM, ModelConfig, functional


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16,
                      max_position_embeddings=32, vocab_size=32)
    from flax import nnx

    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    apply_fn, params = functional(model)
    # Larger weights than the 0.02 init, so the teacher's distributions are far from uniform.
    params = jax.tree.map(lambda x: x * 10.0 if x.ndim == 2 else x, params)
    qparams = jq.quantize(params, None, jq.RTN(bits=2, group_size=16, param_dtype="float32"))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (8, 16)), jnp.int32)
    return apply_fn, params, qparams, tokens


@pytest.mark.parametrize("mode", ["pv", "ste"])
def test_tuning_lowers_kl(tiny, mode):
    apply_fn, teacher, qparams, tokens = tiny
    loss_fn = losses.distillation_loss(apply_fn, apply_fn, teacher)
    tuner = pv.pv_tuning(optax.adam(3e-3), optax.adam(3e-3), pv.VStep(update_fraction=0.05, mode=mode))
    state = tuner.init(qparams)

    @jax.jit
    def step(qp, state, tokens):
        loss, grads = pv.decoded_value_and_grad(loss_fn)(qp, tokens)
        qp, state = tuner.update(grads, state, qp)
        return qp, state, loss

    codes0 = [q.codes for q in jax.tree.leaves(qparams, is_leaf=jq.is_quantized) if jq.is_quantized(q)]
    kls = []
    for _ in range(12):
        qparams, state, kl = step(qparams, state, tokens)
        kls.append(float(kl))
    final = float(loss_fn(jq.dequantize(qparams), tokens))
    assert final < 0.7 * kls[0], (kls, final)
    codes = [q.codes for q in jax.tree.leaves(qparams, is_leaf=jq.is_quantized) if jq.is_quantized(q)]
    changed = sum(int(jnp.sum(a != b)) for a, b in zip(codes, codes0, strict=True))
    assert changed > 0  # the V step moved codes, not only the P step
