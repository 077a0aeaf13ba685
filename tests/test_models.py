"""The NNX Llama decoder: components against simple references, cache, quantized drop-in."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant.models import LlamaForCausalLM, ModelConfig, abstract_model, config_from_hf, functional
from jaxquant.models.llama import apply_rotary, attention_mask, rotary_tables

TINY = ModelConfig(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                   max_position_embeddings=64, vocab_size=50)


def _tokens(rng, b=2, t=12, vocab=50):
    return jnp.asarray(rng.integers(0, vocab, (b, t)), jnp.int32)


def test_rotary_matches_complex_rotation(rng):
    # Reference: pair dimension j with j + hd/2 as a complex number and rotate it by pos * f_j.
    hd = 8
    inv = TINY.inv_freq()
    x = rng.standard_normal((1, 5, 2, hd)).astype(np.float32)
    pos = np.arange(3, 8)
    cos, sin = rotary_tables(inv, jnp.asarray(pos))
    got = np.asarray(apply_rotary(jnp.asarray(x), cos, sin))
    z = x[..., : hd // 2] + 1j * x[..., hd // 2 :]
    z = z * np.exp(1j * pos[None, :, None, None] * inv[None, None, None, :])
    want = np.concatenate([z.real, z.imag], axis=-1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_llama3_rope_scaling_changes_only_low_frequencies():
    scaled = ModelConfig(head_dim=64, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})
    plain = ModelConfig(head_dim=64, rope_theta=500000.0)
    a, b = scaled.inv_freq(), plain.inv_freq()
    wavelen = 2 * np.pi / b
    np.testing.assert_array_equal(a[wavelen < 64 / 4], b[wavelen < 64 / 4])  # high frequencies kept
    np.testing.assert_allclose(a[wavelen > 64], b[wavelen > 64] / 8, rtol=1e-6)  # low ones divided
    assert ((a < b) | (a == b)).all()


def test_attention_mask_sliding_window():
    m = np.asarray(attention_mask(jnp.arange(6), jnp.arange(6), window=3))
    want = np.array([[k <= q and k > q - 3 for k in range(6)] for q in range(6)])
    np.testing.assert_array_equal(m, want)
    assert np.asarray(attention_mask(jnp.arange(6), jnp.arange(6), None)).sum() == 21


def test_gqa_equals_mha_with_repeated_kv_heads(rng):
    gqa = LlamaForCausalLM(TINY, rngs=nnx.Rngs(1))
    mha_cfg = ModelConfig(**{**TINY.__dict__, "num_kv_heads": 4})
    mha = LlamaForCausalLM(mha_cfg, rngs=nnx.Rngs(1))
    state = nnx.state(gqa)
    mstate = nnx.state(mha)
    hd = TINY.head_dim
    for i in range(TINY.num_layers):
        for name in ("k_proj", "v_proj"):
            k = np.asarray(state["layers"][i]["attn"][name]["kernel"].get_value())  # (d, 2*hd)
            heads = k.reshape(-1, 2, hd)
            rep = np.repeat(heads, 2, axis=1).reshape(-1, 4 * hd)  # kv head j serves q heads 2j, 2j+1
            mstate["layers"][i]["attn"][name]["kernel"].set_value(jnp.asarray(rep))
    for path in ("embed", "lm_head", "final_norm"):
        mstate[path] = state[path]
    for i in range(TINY.num_layers):
        for part in ("input_norm", "post_attn_norm", "mlp"):
            mstate["layers"][i][part] = state["layers"][i][part]
        for name in ("q_proj", "o_proj"):
            mstate["layers"][i]["attn"][name] = state["layers"][i]["attn"][name]
    nnx.update(mha, mstate)
    tokens = _tokens(rng)
    np.testing.assert_allclose(np.asarray(gqa(tokens)), np.asarray(mha(tokens)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 4])
def test_chunked_cache_forward_matches_full_forward(rng, window):
    cfg = ModelConfig(**{**TINY.__dict__, "sliding_windows": (window, window)})
    _assert_chunked_forward_equals_full(LlamaForCausalLM(cfg, rngs=nnx.Rngs(2)), _tokens(rng, t=11), (5, 6), 16)


def _assert_chunked_forward_equals_full(model, tokens, cuts, cache_len):
    """Logits of ``tokens`` fed in chunks split at ``cuts`` through the KV cache equal the
    whole sequence's without it."""
    full = np.asarray(model(tokens))
    cache = model.init_cache(tokens.shape[0], cache_len)
    bounds = (0, *cuts, tokens.shape[1])
    parts = []
    for start, stop in zip(bounds, bounds[1:]):
        logits, cache = model.forward(tokens[:, start:stop], cache, start)
        parts.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=1e-5, atol=1e-5)


def test_tied_head_has_no_lm_head_and_uses_embedding(rng):
    cfg = ModelConfig(**{**TINY.__dict__, "tie_word_embeddings": True})
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(3))
    assert model.lm_head is None
    assert cfg.num_params() == sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    tokens = _tokens(rng)
    emb = np.asarray(model.embed.embedding.get_value())
    # The head is the transposed embedding: zeroing the embedding's last row zeroes that logit.
    logits = np.asarray(model(tokens))
    assert logits.shape == (2, 12, 50)
    model.embed.embedding.set_value(jnp.asarray(emb).at[-1].set(0.0))
    tokens_safe = jnp.where(tokens == 49, 0, tokens)
    np.testing.assert_array_equal(np.asarray(model(tokens_safe))[..., -1], 0.0)


def test_num_params_untied():
    model = LlamaForCausalLM(TINY)
    assert TINY.num_params() == sum(x.size for x in jax.tree.leaves(nnx.state(model)))


def test_quantized_state_drops_in_via_update(rng):
    model = LlamaForCausalLM(TINY, rngs=nnx.Rngs(4))
    tokens = _tokens(rng)
    apply_fn, params = functional(model)
    q = jq.quantize(params, None, jq.RTN(bits=3, group_size=16))
    selected = jq.select.selected_paths(params)
    assert len(selected) == 7 * TINY.num_layers  # embedding, head and norms are skipped
    want = np.asarray(apply_fn(jq.dequantize(q), tokens))
    nnx.update(model, q)
    assert jq.is_quantized(model.layers[0].mlp.up_proj.kernel.get_value())
    got = np.asarray(model(tokens))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.jit(apply_fn)(q, tokens)), want, rtol=1e-5, atol=1e-5)


def test_calibrate_sees_every_linear_layer(rng):
    model = LlamaForCausalLM(TINY, rngs=nnx.Rngs(5))
    apply_fn, params = functional(model)
    batches = [_tokens(rng, b=4, t=8) for _ in range(2)]
    stats = jq.calibrate(apply_fn, params, batches)
    assert sorted(stats) == jq.select.selected_paths(params)
    # q/k/v share one input (the normed residual): identical statistics, 64 tokens each.
    s = stats["layers/0/attn/q_proj/kernel"]
    assert int(s.count) == 64
    np.testing.assert_array_equal(np.asarray(s.xtx), np.asarray(stats["layers/0/attn/v_proj/kernel"].xtx))


def test_bfloat16_model_close_to_float32(rng):
    f32 = LlamaForCausalLM(TINY, rngs=nnx.Rngs(6))
    bf16 = LlamaForCausalLM(TINY, dtype=jnp.bfloat16, rngs=nnx.Rngs(6))
    nnx.update(bf16, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(f32)))
    tokens = _tokens(rng)
    a = np.asarray(f32(tokens))
    b = bf16(tokens)
    assert b.dtype == jnp.bfloat16
    b = np.asarray(b.astype(jnp.float32))
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 2e-2


def test_config_validation_errors():
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        ModelConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        ModelConfig(rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="unsupported architecture: model_type='gpt2'"):
        config_from_hf({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="sliding_windows has 1 entries"):
        ModelConfig(num_layers=2, sliding_windows=(4,))
    with pytest.raises(ValueError, match="experts_per_token=3 and num_experts=2"):
        ModelConfig(architecture="mixtral", num_experts=2, experts_per_token=3)
    with pytest.raises(ValueError, match="'llama' is dense: num_experts=8"):
        ModelConfig(num_experts=8, experts_per_token=2)


MOE = ModelConfig(**{**TINY.__dict__, "architecture": "mixtral", "num_experts": 4, "experts_per_token": 2})


def test_mixture_of_experts_weights_the_routers_top_experts(rng):
    model = LlamaForCausalLM(MOE, rngs=nnx.Rngs(7))
    assert MOE.num_params() == sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    moe = model.layers[0].mlp
    x = jnp.asarray(rng.normal(size=(2, 5, 32)), jnp.float32)
    weights, experts = moe.route(x)
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-6)
    # Reference: softmax over the router's logits, the two largest renormalised, each
    # picked expert's SwiGLU output weighted by them.
    xs = np.asarray(x, np.float64).reshape(-1, 32)
    logits = xs @ np.asarray(moe.router.kernel.get_value(), np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = np.zeros_like(xs)
    for t in range(len(xs)):
        top = np.argsort(-probs[t])[:2]
        assert sorted(top) == sorted(np.asarray(experts).reshape(-1, 2)[t])
        for e in top:
            want[t] += probs[t, e] / probs[t, top].sum() * np.asarray(moe.experts[int(e)](jnp.asarray(xs[t:t + 1],
                                                                                                 jnp.float32)))[0]
    np.testing.assert_allclose(np.asarray(moe(x)).reshape(-1, 32), want, rtol=1e-4, atol=1e-6)


def test_mixture_of_experts_cache_forward_and_quantized_experts(rng):
    model = LlamaForCausalLM(MOE, rngs=nnx.Rngs(8))
    tokens = _tokens(rng, t=9)
    _assert_chunked_forward_equals_full(model, tokens, (4, 5), 12)
    # Every expert and the router are leaves of their own, quantized like any kernel.
    apply_fn, params = functional(model)
    selected = jq.select.selected_paths(params)
    assert "layers/1/mlp/experts/3/down_proj/kernel" in selected and "layers/0/mlp/router/kernel" in selected
    assert len(selected) == (4 + 1 + 3 * 4) * MOE.num_layers
    q = jq.quantize(params, None, jq.RTN(bits=4, group_size=16))
    np.testing.assert_allclose(np.asarray(jax.jit(apply_fn)(q, tokens)), np.asarray(apply_fn(jq.dequantize(q), tokens)),
                               rtol=1e-5, atol=1e-5)


QWEN2_MOE = ModelConfig(**{**TINY.__dict__, "architecture": "qwen2_moe", "num_layers": 3, "num_experts": 4,
                           "experts_per_token": 2, "expert_size": 16, "shared_expert_size": 24,
                           "normalize_routing": False, "dense_layers": (1,), "qkv_bias": True})


def test_qwen2_moe_layers_quantize_and_count_their_parameters(rng):
    model = LlamaForCausalLM(QWEN2_MOE, rngs=nnx.Rngs(3))
    apply_fn, params = functional(model)
    assert QWEN2_MOE.num_params() == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    selected = jq.select.selected_paths(params)
    # Sparse layers: 4 attention kernels, the router, 4 experts x 3, the shared expert and its gate.
    assert len(selected) == 2 * (4 + 1 + 12 + 3 + 1) + (4 + 3)
    assert "layers/1/mlp/down_proj/kernel" in selected and "layers/2/mlp/shared_expert_gate/kernel" in selected
    tokens = _tokens(rng, t=9)
    stats = jq.calibrate(apply_fn, params, [tokens])
    assert int(stats["layers/0/mlp/shared_expert/up_proj/kernel"].count) == 2 * 9  # every token runs it
    flat = dict(jq.select.flatten_with_paths(params))
    assert sorted(stats) == sorted(selected)
    assert all(stats[p].xtx.shape == (flat[p].shape[0],) * 2 for p in selected)  # what GPTQ would need
    # RTN: the quantized forward is the point here; GPTQ would compile its loop for each of the 9 shapes.
    q = jq.quantize(params, stats, jq.RTN(bits=4, group_size=8))
    np.testing.assert_allclose(np.asarray(jax.jit(apply_fn)(q, tokens)), np.asarray(apply_fn(jq.dequantize(q), tokens)),
                               rtol=1e-5, atol=1e-5)


def test_expert_statistics_count_only_the_tokens_routed_to_the_expert(rng):
    model = LlamaForCausalLM(MOE, rngs=nnx.Rngs(9))
    apply_fn, params = functional(model)
    tokens = _tokens(rng, b=4, t=8)
    stats = jq.calibrate(apply_fn, params, [tokens])
    # The layer-0 experts' input: the normed residual after attention, from a hook on the MoE.
    seen = {}
    moe = model.layers[0].mlp
    original = type(moe).__call__

    def spy(self, x):
        if self is moe:
            seen["x"] = np.asarray(x, np.float64).reshape(-1, 32)
            seen["experts"] = np.asarray(self.route(x)[1]).reshape(-1, 2)
        return original(self, x)

    type(moe).__call__ = spy
    try:
        model(tokens)
    finally:
        type(moe).__call__ = original
    counts = [int(stats[f"layers/0/mlp/experts/{e}/gate_proj/kernel"].count) for e in range(4)]
    assert sum(counts) == 2 * 32 and counts == [int(np.sum(seen["experts"] == e)) for e in range(4)]
    for e in range(4):
        rows = seen["x"][np.any(seen["experts"] == e, axis=1)]
        np.testing.assert_allclose(np.asarray(stats[f"layers/0/mlp/experts/{e}/up_proj/kernel"].xtx), rows.T @ rows,
                                   rtol=1e-4, atol=1e-4)
        assert int(stats[f"layers/0/mlp/experts/{e}/down_proj/kernel"].count) == counts[e]
    assert int(stats["layers/0/mlp/router/kernel"].count) == 32


def test_abstract_model_is_a_built_model_in_shapes_only():
    for cfg in (TINY, QWEN2_MOE):
        built = LlamaForCausalLM(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
        abstract = abstract_model(cfg, jnp.bfloat16)
        assert nnx.graphdef(abstract) == nnx.graphdef(built)
        shapes = jax.tree.map(lambda x: (x.shape, x.dtype), nnx.state(abstract))
        assert shapes == jax.tree.map(lambda x: (x.shape, x.dtype), nnx.state(built))
        assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(abstract)))


def test_config_hf_dict_round_trip():
    cfg = ModelConfig(architecture="qwen2", qkv_bias=True, num_layers=3, sliding_windows=(None, 8, 8),
                      rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert config_from_hf(cfg.to_hf_dict()) == cfg
    assert config_from_hf(MOE.to_hf_dict()) == MOE
    assert config_from_hf(QWEN2_MOE.to_hf_dict()) == QWEN2_MOE
    hash(cfg)  # jit static arguments need it


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen2-sliding", "llama-sparse", "mixtral",
                                    "qwen2-moe"])
def test_load_config_reads_transformers_files_as_autoconfig_does(tmp_path, family):
    """A config.json that transformers wrote is read without transformers, with the result
    AutoConfig gives; one missing fields AutoConfig would fill in goes through AutoConfig."""
    import json  # noqa: PLC0415

    import transformers  # noqa: PLC0415

    from jaxquant.models.config import _complete, load_config  # noqa: PLC0415

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=100)
    hf = {
        "llama": lambda: transformers.LlamaConfig(**common, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 64}),
        "mistral": lambda: transformers.MistralConfig(**common, sliding_window=16),
        "qwen2": lambda: transformers.Qwen2Config(**common),
        "qwen2-sliding": lambda: transformers.Qwen2Config(**common, use_sliding_window=True, sliding_window=8,
                                                          max_window_layers=1),
        "llama-sparse": lambda: transformers.LlamaConfig(**common),
        "mixtral": lambda: transformers.MixtralConfig(**common, num_local_experts=8, num_experts_per_tok=2),
        "qwen2-moe": lambda: transformers.Qwen2MoeConfig(**common, num_experts=8, num_experts_per_tok=2,
                                                         decoder_sparse_step=2, use_sliding_window=True,
                                                         sliding_window=8),
    }[family]()
    hf.save_pretrained(tmp_path)
    if family == "llama-sparse":  # an old-style file: AutoConfig supplies the missing defaults
        raw = json.loads((tmp_path / "config.json").read_text())
        for key in ("rms_norm_eps", "max_position_embeddings"):
            raw.pop(key)
        (tmp_path / "config.json").write_text(json.dumps(raw))
    raw = json.loads((tmp_path / "config.json").read_text())
    assert _complete(raw) == (family != "llama-sparse")
    want = config_from_hf(transformers.AutoConfig.from_pretrained(tmp_path, local_files_only=True))
    assert load_config(tmp_path) == want



def _stacked_model(seed, **config):
    """A small Llama (4 heads, 2 KV heads, vocabulary 50), its parameters and its LayerStack."""
    from flax import nnx

    from jaxquant.models.llama import LayerStack

    model = LlamaForCausalLM(ModelConfig(num_heads=4, num_kv_heads=2, max_position_embeddings=64, vocab_size=50,
                                         **config), rngs=nnx.Rngs(seed))
    return model, functional(model)[1], LayerStack.of(model)


def test_layer_stack_packs_runs_and_unpacks(rng):
    from jaxquant import recipes
    from jaxquant.models.llama import functional_parts
    from jaxquant.quantize import quantize

    model, params, stack = _stacked_model(1, hidden_size=32, intermediate_size=48, num_layers=3, head_dim=8,
                                          tie_word_embeddings=False)
    packed = stack.pack(params)
    assert "layers" not in packed and packed["stacked_layers"]["mlp"]["up_proj"]["kernel"].get_value().shape == (
        3, 32, 48)
    unpacked = stack.unpack(packed)
    assert jax.tree.structure(unpacked) == jax.tree.structure(params)
    chex.assert_trees_all_equal(unpacked, params)
    tokens = jnp.asarray(rng.integers(0, 50, (2, 7)), jnp.int32)
    hidden, head = functional_parts(model)
    scanned, _ = functional_parts(model, scan_layers=True)
    ref = jax.jit(hidden)(params, tokens)
    for out in (jax.jit(hidden)(packed, tokens), jax.jit(scanned)(params, tokens)):
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.jit(head)(packed, ref)), np.asarray(jax.jit(head)(params, ref)),
                               rtol=1e-6)
    # Quantized layers stack too; layers quantized differently cannot.
    q = quantize(params, None, recipes.RTN(bits=4, group_size=16))
    chex.assert_trees_all_equal(stack.unpack(stack.pack(q)), q)
    chex.assert_trees_all_close(stack.pack_decoded(q), stack.pack(jq.dequantize(q)), rtol=1e-6, atol=1e-7)
    mixed = quantize(params, None, [("layers/0", recipes.RTN(bits=2, group_size=16)),
                                    (".*", recipes.RTN(bits=4, group_size=16))])
    with pytest.raises(ValueError, match="layers/1 differs from layers/0"):
        stack.pack(mixed)
    # ... and a scanning forward runs such layers one by one instead.
    np.testing.assert_allclose(np.asarray(jax.jit(scanned)(mixed, tokens)), np.asarray(jax.jit(hidden)(mixed, tokens)),
                               rtol=1e-5, atol=1e-5)


def test_layer_stack_gradient_equals_the_unrolled_layers_and_overwrites_the_weights(rng):
    from jaxquant.models.llama import functional_parts

    model, params, stack = _stacked_model(2, hidden_size=64, intermediate_size=96, num_layers=4, head_dim=16,
                                          tie_word_embeddings=True)
    hidden, _ = functional_parts(model)
    tokens = jnp.asarray(rng.integers(0, 50, (2, 9)), jnp.int32)
    target = jnp.asarray(rng.standard_normal((2, 9, 64)), jnp.float32)

    def loss(p):
        return jnp.sum((hidden(p, tokens) - target) ** 2)

    want = stack.pack(jax.jit(jax.grad(loss))(params))  # layer by layer, plain autodiff
    got = jax.jit(jax.grad(loss))(stack.pack(params))  # scanned, gradient written over the weights
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * float(jnp.max(jnp.abs(b))) + 1e-7
    assert jax.tree.structure(got) == jax.tree.structure(want)
    # The packed gradient takes the place of the packed weights: one stack, not two.
    temp = {name: jax.jit(jax.grad(loss)).lower(p).compile().memory_analysis().temp_size_in_bytes
            for name, p in (("unrolled", params), ("stacked", stack.pack(params)))}
    layers_bytes = sum(x.nbytes for x in jax.tree.leaves(stack.pack(params)["stacked_layers"]))
    assert temp["stacked"] < layers_bytes, temp


def test_layer_stack_is_none_for_layers_of_different_structure():
    from flax import nnx

    from jaxquant.models.llama import LayerStack, functional_parts

    # Sliding windows on some layers only (Mistral/Qwen2 style): the layers' graphs differ.
    cfg = ModelConfig(hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
                      max_position_embeddings=64, vocab_size=50, sliding_windows=(4, None, None))
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    assert LayerStack.of(model) is None
    _, params = functional(model)
    tokens = jnp.zeros((1, 9), jnp.int32)
    hidden = functional_parts(model)[0]
    np.testing.assert_allclose(np.asarray(functional_parts(model, scan_layers=True)[0](params, tokens)),
                               np.asarray(hidden(params, tokens)), rtol=1e-6)  # falls back to the loop
