"""Logit parity with the transformers PyTorch reference (the ``interop`` extra).

Small random Llama (Llama 3 rope scaling), Mistral (a sliding window shorter than the
sequence), Qwen2 (q/k/v bias, tied head, sliding layers), Mixtral (four experts, two per
token; with a sliding window) and Qwen2-MoE (narrower experts, a gated shared expert,
unnormalised or renormalised routing, dense layers by ``mlp_only_layers`` or
``decoder_sparse_step``, sliding layers) checkpoints are saved with
``save_pretrained`` and loaded with jaxquant; float32 logits must agree to 1e-4 relative.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from jaxquant.models import from_pretrained, save_pretrained  # noqa: E402

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 500000.0}


def _cases():
    t = transformers
    return {
        "llama3": (t.LlamaForCausalLM, t.LlamaConfig(**COMMON, rope_parameters=LLAMA3_ROPE)),
        "llama-bias": (t.LlamaForCausalLM, t.LlamaConfig(**COMMON, attention_bias=True, mlp_bias=True)),
        "mistral-window": (t.MistralForCausalLM, t.MistralConfig(**COMMON, sliding_window=7)),
        "qwen2-tied": (t.Qwen2ForCausalLM, t.Qwen2Config(**COMMON, tie_word_embeddings=True)),
        "qwen2-sliding": (t.Qwen2ForCausalLM, t.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=5,
                                                            max_window_layers=1)),
        "mixtral": (t.MixtralForCausalLM, t.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2)),
        "mixtral-window": (t.MixtralForCausalLM, t.MixtralConfig(**COMMON, num_local_experts=3, num_experts_per_tok=1,
                                                                 sliding_window=6)),
        "qwen2moe": (t.Qwen2MoeForCausalLM, t.Qwen2MoeConfig(**{**COMMON, "num_hidden_layers": 3}, num_experts=4,
                                                             num_experts_per_tok=2, moe_intermediate_size=32,
                                                             shared_expert_intermediate_size=48, mlp_only_layers=[1])),
        "qwen2moe-norm-step": (t.Qwen2MoeForCausalLM, t.Qwen2MoeConfig(
            **COMMON, num_experts=3, num_experts_per_tok=2, moe_intermediate_size=40, shared_expert_intermediate_size=24,
            norm_topk_prob=True, decoder_sparse_step=2, use_sliding_window=True, sliding_window=5)),
    }


def _reference(cls, cfg, tmp_path, **save_kw):
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # perturb every parameter: biases and norms start at 0 / 1
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path, **save_kw)
    return model


def _logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name", list(_cases()))
def test_logit_parity_float32(name, tmp_path):
    cls, cfg = _cases()[name]
    ref_model = _reference(cls, cfg, tmp_path)
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 24))
    ref = _logits(ref_model, tokens)
    model = from_pretrained(tmp_path, dtype=jnp.float32)
    got = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
    assert _rel(got, ref) <= 1e-4
    if "window" in name or "sliding" in name:
        assert any(w is not None and w < tokens.shape[1] for w in model.config.sliding_windows)


def test_sliding_window_matters(tmp_path):
    # Guard against a vacuous parity test: without the window the logits differ clearly.
    cls, cfg = _cases()["mistral-window"]
    ref_model = _reference(cls, cfg, tmp_path)
    tokens = np.random.default_rng(1).integers(0, VOCAB, (1, 24))
    ref = _logits(ref_model, tokens)
    model = from_pretrained(tmp_path)
    import dataclasses

    from jaxquant.models import LlamaForCausalLM

    full_cfg = dataclasses.replace(model.config, sliding_windows=None)
    full = from_pretrained(tmp_path, config=full_cfg)
    assert isinstance(full, LlamaForCausalLM)
    assert _rel(np.asarray(full(jnp.asarray(tokens, jnp.int32))), ref) > 1e-2


def test_sharded_reference_checkpoint(tmp_path):
    cls, cfg = _cases()["llama3"]
    ref_model = _reference(cls, cfg, tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    tokens = np.random.default_rng(2).integers(0, VOCAB, (1, 16))
    got = np.asarray(from_pretrained(tmp_path)(jnp.asarray(tokens, jnp.int32)))
    assert _rel(got, _logits(ref_model, tokens)) <= 1e-4


def test_expert_routing_matters(tmp_path):
    # Guard against a vacuous Mixtral parity: with every expert weighted equally instead of
    # the router's top two, the logits differ clearly.
    cls, cfg = _cases()["mixtral"]
    ref_model = _reference(cls, cfg, tmp_path)
    tokens = np.random.default_rng(5).integers(0, VOCAB, (1, 24))
    model = from_pretrained(tmp_path)
    import dataclasses

    every = from_pretrained(tmp_path, config=dataclasses.replace(model.config, experts_per_token=4))
    assert _rel(np.asarray(every(jnp.asarray(tokens, jnp.int32))), _logits(ref_model, tokens)) > 1e-2


@pytest.mark.parametrize("shard, case", [(None, "qwen2-sliding"), (30_000, "qwen2-sliding"), (None, "mixtral"),
                                         (None, "qwen2moe")])
def test_save_pretrained_is_read_by_transformers(tmp_path, shard, case):
    cls, cfg = _cases()[case]
    ref_model = _reference(cls, cfg, tmp_path / "ref")
    model = from_pretrained(tmp_path / "ref")
    save_pretrained(model, tmp_path / "ours", max_shard_bytes=shard)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    tokens = np.random.default_rng(3).integers(0, VOCAB, (1, 16))
    assert _rel(_logits(back, tokens), _logits(ref_model, tokens)) <= 1e-6


def test_bfloat16_load_close_to_reference(tmp_path):
    cls, cfg = _cases()["llama3"]
    ref_model = _reference(cls, cfg, tmp_path)
    tokens = np.random.default_rng(4).integers(0, VOCAB, (1, 16))
    model = from_pretrained(tmp_path, dtype=jnp.bfloat16)
    got = np.asarray(model(jnp.asarray(tokens, jnp.int32)).astype(jnp.float32))
    assert _rel(got, _logits(ref_model, tokens)) < 3e-2


@pytest.mark.parametrize("case, dense, normalize, windows", [("qwen2moe", (1,), False, None),
                                                              ("qwen2moe-norm-step", (0,), True, (5, None))])
def test_qwen2_moe_config_and_shared_expert_matter(tmp_path, case, dense, normalize, windows):
    # Guard against a vacuous Qwen2-MoE parity: the config carries the dense layers, the
    # routing rule and the sliding layers, and without the shared expert the logits differ.
    cls, cfg = _cases()[case]
    ref_model = _reference(cls, cfg, tmp_path)
    model = from_pretrained(tmp_path)
    c = model.config
    assert (c.dense_layers, c.normalize_routing, c.sliding_windows) == (dense, normalize, windows)
    assert c.routed_expert_size == cfg.moe_intermediate_size and c.shared_expert_size == cfg.shared_expert_intermediate_size
    sparse = next(i for i in range(c.num_layers) if c.sparse(i))
    gate = model.layers[sparse].mlp.shared_expert_gate.kernel
    gate.set_value(jnp.full(gate.get_value().shape, -1e4, jnp.float32))  # sigmoid -> 0: no shared expert
    tokens = np.random.default_rng(4).integers(0, VOCAB, (1, 24))
    assert _rel(np.asarray(model(jnp.asarray(tokens, jnp.int32))), _logits(ref_model, tokens)) > 1e-2
