"""KL distillation loss, gradient accumulation and data-parallel batches."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.finetune import losses


def _kl_reference(s: np.ndarray, t: np.ndarray, mask: np.ndarray | None) -> float:
    s = s.astype(np.float64)
    t = t.astype(np.float64)
    ls = s - np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1, keepdims=True)) - s.max(-1, keepdims=True)
    lt = t - np.log(np.exp(t - t.max(-1, keepdims=True)).sum(-1, keepdims=True)) - t.max(-1, keepdims=True)
    kl = (np.exp(lt) * (lt - ls)).sum(-1)
    if mask is None:
        return float(kl.mean())
    return float((kl * mask).sum() / max(mask.sum(), 1))


def test_kl_matches_reference_and_mask(rng):
    s = rng.standard_normal((3, 5, 11)).astype(np.float32)
    t = rng.standard_normal((3, 5, 11)).astype(np.float32)
    mask = rng.random((3, 5)) < 0.6
    got = losses.kl_divergence(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask))
    np.testing.assert_allclose(float(got), _kl_reference(s, t, mask), rtol=1e-5)
    np.testing.assert_allclose(float(losses.kl_divergence(jnp.asarray(s), jnp.asarray(t))),
                               _kl_reference(s, t, None), rtol=1e-5)
    assert float(losses.kl_divergence(jnp.asarray(s), jnp.asarray(s))) == pytest.approx(0.0, abs=1e-6)
    assert float(losses.kl_divergence(jnp.asarray(s), jnp.asarray(t), jnp.zeros((3, 5), bool))) == 0.0


def test_kl_bfloat16_inputs_and_no_teacher_gradient(rng):
    s = jnp.asarray(rng.standard_normal((2, 4, 7)), jnp.bfloat16)
    t = jnp.asarray(rng.standard_normal((2, 4, 7)), jnp.bfloat16)
    out = losses.kl_divergence(s, t)
    assert out.dtype == jnp.float32 and np.isfinite(float(out))
    g = jax.grad(lambda t: losses.kl_divergence(s.astype(jnp.float32), t))(t.astype(jnp.float32))
    assert float(jnp.max(jnp.abs(g))) == 0.0


def test_kl_bad_shapes():
    with pytest.raises(ValueError, match="teacher_logits shape"):
        losses.kl_divergence(jnp.zeros((2, 3, 4), jnp.float32), jnp.zeros((2, 3, 5), jnp.float32))
    with pytest.raises(ValueError, match="mask shape"):
        losses.kl_divergence(jnp.zeros((2, 3, 4), jnp.float32), jnp.zeros((2, 3, 4), jnp.float32),
                             jnp.ones((3, 2), bool))


def _toy(rng):
    params = {"w": jnp.asarray(rng.standard_normal((6, 9)) * 0.3, jnp.float32)}
    teacher = {"w": jnp.asarray(rng.standard_normal((6, 9)) * 0.3, jnp.float32)}
    emb = jnp.asarray(rng.standard_normal((9, 6)), jnp.float32)

    def apply(p, tokens):
        return emb[tokens] @ p["w"]

    tokens = jnp.asarray(rng.integers(0, 9, (8, 5)), jnp.int32)
    return params, teacher, apply, tokens


def test_cached_teacher_logits_equal_on_the_fly(rng):
    params, teacher, apply, tokens = _toy(rng)
    loss = losses.distillation_loss(apply, apply, teacher)
    cached = losses.distillation_loss(apply)
    a = loss(params, tokens)
    b = cached(params, tokens, teacher_logits=apply(teacher, tokens))
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
    with pytest.raises(ValueError, match="teacher"):
        cached(params, tokens)


def test_gradient_accumulation_equals_full_batch(rng):
    params, teacher, apply, tokens = _toy(rng)
    vg = jax.value_and_grad(losses.distillation_loss(apply, apply, teacher))
    full = vg(params, tokens)
    acc = jax.jit(lambda p, t: losses.accumulate_gradients(vg, p, t, num_micro=4))(params, tokens)
    chex.assert_trees_all_close(acc, full, rtol=1e-5, atol=1e-7)
    mask = jnp.ones(tokens.shape, bool)
    acc_m = losses.accumulate_gradients(vg, params, tokens, mask, num_micro=2)
    chex.assert_trees_all_close(acc_m, full, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="divisible"):
        losses.accumulate_gradients(vg, params, tokens, num_micro=3)


def test_data_parallel_batch_gives_same_loss_and_grads(rng):
    params, teacher, apply, tokens = _toy(rng)
    vg = jax.jit(jax.value_and_grad(losses.distillation_loss(apply, apply, teacher)))
    mesh = losses.data_mesh()
    assert mesh.shape["data"] == jax.device_count() == 4
    sharded = losses.shard_batch(tokens, mesh)
    assert len(sharded.sharding.device_set) == 4
    got = vg(losses.replicate(params, mesh), sharded)
    chex.assert_trees_all_close(got, vg(params, tokens), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="not divisible"):
        losses.shard_batch(tokens[:6], mesh)


@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_distillation_loss_equals_the_plain_one(rng, chunk, masked):
    # A tied head, as in SmolLM2: the embedding gets gradient from both ends.
    from flax import nnx

    from jaxquant.models import LlamaForCausalLM, ModelConfig, functional
    from jaxquant.models.llama import functional_parts

    cfg = ModelConfig(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      max_position_embeddings=64, vocab_size=50, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    apply_fn, teacher = functional(model)
    student = jax.tree.map(lambda x: x + 0.05 * jnp.asarray(rng.standard_normal(x.shape), x.dtype), teacher)
    tokens = jnp.asarray(rng.integers(0, 50, (3, 11)), jnp.int32)  # 33 positions: chunks need padding
    mask = jnp.asarray(rng.random((3, 11)) < 0.7) if masked else None
    plain = losses.distillation_loss(apply_fn, apply_fn, teacher)
    chunked = losses.chunked_distillation_loss(*functional_parts(model), chunk_tokens=chunk)
    v0, g0 = jax.value_and_grad(lambda p: plain(p, tokens, mask))(student)
    v1, g1 = jax.value_and_grad(lambda p: chunked(p, teacher, tokens, mask))(student)
    assert float(v0) > 1e-4
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
    chex.assert_trees_all_close(g1, g0, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="chunk_tokens=0"):
        losses.chunked_distillation_loss(*functional_parts(model), chunk_tokens=0)


def test_lean_distillation_equals_the_plain_loss_on_decoded_weights(rng):
    # The packed (stacked-layer) student and the layer-by-layer teacher give the plain
    # loss's value and, unpacked, its gradient with respect to the decoded weights.
    from flax import nnx

    from jaxquant import recipes
    from jaxquant.finetune import pv
    from jaxquant.models import LlamaForCausalLM, ModelConfig, functional
    from jaxquant.models.distill import lean_distillation
    from jaxquant.quantize import quantize

    cfg = ModelConfig(hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
                      max_position_embeddings=64, vocab_size=50, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    apply_fn, teacher = functional(model)
    qparams = quantize(teacher, None, recipes.RTN(bits=2, group_size=16))
    tokens = jnp.asarray(rng.integers(0, 50, (2, 9)), jnp.int32)
    plain = losses.distillation_loss(apply_fn, apply_fn, teacher)
    lean, layout = lean_distillation(model, chunk_tokens=5)
    assert layout is not None
    v0, g0 = jax.jit(pv.decoded_value_and_grad(plain))(qparams, tokens)
    v1, g1 = jax.jit(pv.decoded_value_and_grad(lambda p, t: lean(p, teacher, t), layout=layout))(qparams, tokens)
    assert float(v0) > 1e-5  # a random model's logits are nearly flat: the KL is small but not zero
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-4)
    chex.assert_trees_all_close(g1, g0, rtol=1e-4, atol=1e-7)
