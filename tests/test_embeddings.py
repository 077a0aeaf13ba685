"""Token embeddings and output heads stored at 16 or 8 bits (jaxquant.store_embeddings)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant.cli import main
from jaxquant.data import BYTE_TOKENIZER_FILE, ByteTokenizer
from jaxquant.models.config import ModelConfig
from jaxquant.models.llama import LlamaForCausalLM
from jaxquant.models.loading import save_pretrained
from jaxquant.pipeline import quantize_model
from jaxquant.select import flatten_with_paths

CFG = ModelConfig(hidden_size=64, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16,
                  vocab_size=256, max_position_embeddings=64)
TOKENS = np.random.default_rng(0).integers(0, 256, (2, 16)).astype(np.int32)


def _model(tied: bool) -> LlamaForCausalLM:
    return LlamaForCausalLM(ModelConfig(**{**CFG.__dict__, "tie_word_embeddings": tied}), rngs=nnx.Rngs(0))


def _logits(model: LlamaForCausalLM, state) -> jax.Array:
    graphdef, _ = nnx.split(model)
    return nnx.merge(graphdef, state)(jnp.asarray(TOKENS))


def _leaf(state, path: str):
    return dict(flatten_with_paths(state))[path]


def test_take_rows_equals_the_decoded_rows(rng):
    w = jnp.asarray(rng.standard_normal((40, 24)), jnp.float32)
    for group_size in (None, 8):
        q = jq.quantize_weight(w, None, jq.RTN(bits=8, group_size=group_size))
        rows = jnp.asarray(rng.integers(0, 40, (3, 5)))
        np.testing.assert_array_equal(q.take_rows(rows), q.decode()[rows])
    symmetric = jq.quantize_weight(w, None, jq.RTN(bits=8, symmetric=True, group_size=None))
    np.testing.assert_array_equal(symmetric.take_rows(rows), symmetric.decode()[rows])
    with pytest.raises(ValueError, match="out_in"):
        jq.quantize_weight(w, None, jq.RTN(bits=8, group_size=None), layout="in_out").take_rows(rows)


@pytest.mark.parametrize("tied", [True, False])
def test_8_bit_tables_run_as_their_decoding_and_stay_close_to_float(tied):
    model = _model(tied)
    state = nnx.state(model)
    stored = jq.store_embeddings(state, 8)
    tables = ["embed/embedding"] + ([] if tied else ["lm_head/kernel"])
    for path in tables:
        q = _leaf(stored, path)
        assert isinstance(q, jq.ScalarQuantized) and q.bits == 8 and q.group_size == CFG.hidden_size
        assert q.layout == ("in_out" if path.endswith("kernel") else "out_in")
    # Linear layers and norms are untouched.
    np.testing.assert_array_equal(_leaf(stored, "layers/0/mlp/up_proj/kernel"), _leaf(state, "layers/0/mlp/up_proj/kernel"))
    # The model's gather and head on the quantized table equal the dense decoding.
    quantized = _logits(model, stored)
    np.testing.assert_allclose(quantized, _logits(model, jq.dequantize(stored)), rtol=1e-5, atol=1e-5)
    ref = _logits(model, state)
    assert float(jnp.linalg.norm(quantized - ref) / jnp.linalg.norm(ref)) < 1e-2


def test_16_bits_is_float16_and_32_is_float32():
    model = _model(True)
    state = nnx.state(model)
    half = jq.store_embeddings(state, 16)
    assert _leaf(half, "embed/embedding").dtype == jnp.float16
    assert _leaf(half, "final_norm/scale").dtype == jnp.float32
    out = _logits(model, half)
    assert out.dtype == jnp.float32  # rows come out in the model's dtype
    np.testing.assert_allclose(out, _logits(model, state), rtol=2e-3, atol=2e-3)
    assert _leaf(jq.store_embeddings(half, 32), "embed/embedding").dtype == jnp.float32


def test_tree_bits_counts_embeddings_apart_from_the_linear_layers():
    state = nnx.state(_model(True))
    quantized = jq.quantize(state, None, jq.RTN(bits=4, group_size=32))
    before = jq.tree_bits(quantized)
    after = jq.tree_bits(jq.store_embeddings(quantized, 8))
    vocab, d = CFG.vocab_size, CFG.hidden_size
    assert after["bits_per_weight"] == before["bits_per_weight"] == pytest.approx(4 + 32 / 32)
    assert before["embedding_params"] == after["embedding_params"] == vocab * d
    assert before["embedding_bits"] == vocab * d * 32
    assert after["embedding_bits"] == vocab * d * 8 + vocab * 32  # codes + a float16 scale and zero per row
    assert before["total_bytes"] - after["total_bytes"] == (vocab * d * 24 - vocab * 32) // 8


def test_bad_input_is_named():
    state = nnx.state(_model(True))
    with pytest.raises(ValueError, match="bits=4"):
        jq.store_embeddings(state, 4)
    with pytest.raises(ValueError, match="no 2-D float leaf"):
        jq.store_embeddings({"dense": {"kernel": jnp.ones((4, 4))}}, 8)
    with pytest.raises(ValueError, match=r"wte.*float16"):
        jq.store_embeddings({"wte": jnp.full((4, 4), 1e6)}, 16)
    with pytest.raises(ValueError, match="group_size=5"):
        jq.store_embeddings(state, 8, group_size=5)
    with pytest.raises(ValueError, match="embed_bits=4"):
        quantize_model(_model(True), TOKENS, jq.RTN(bits=4, group_size=32), key=jax.random.key(0), embed_bits=4)


def test_quantize_command_stores_and_reports_8_bit_embeddings(tmp_path, capsys):
    model_dir = tmp_path / "model"
    save_pretrained(_model(True), model_dir, extra_files={BYTE_TOKENIZER_FILE: ByteTokenizer().note()})
    out = tmp_path / "out"
    assert main(["quantize", str(model_dir), "--recipe", "rtn-4-g32", "--calib", "builtin", "--nsamples", "4",
                 "--seqlen", "32", "--out", str(out), "--eval-windows", "2", "--no-progress", "--embed-bits", "8"]) == 0
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    assert summary["embedding_bits_per_weight"] == pytest.approx(8 + 32 / CFG.hidden_size)
    assert summary["bits_per_weight"] == pytest.approx(5.0)
    # The evaluation runs the model with its 8-bit table as embedding and head.
    assert np.isfinite(summary["perplexity"]["quantized"]) and summary["perplexity"]["quantized"] > 1
    assert "embeddings and head 8.500 bits per weight" in capsys.readouterr().out
    params = jq.io.load(os.path.join(out, "params"))
    assert isinstance(_leaf(params, "embed/embedding"), jq.ScalarQuantized)
    with pytest.raises(SystemExit):
        main(["quantize", str(model_dir), "--recipe", "rtn-4-g32", "--calib", "builtin", "--out", str(tmp_path / "x"),
              "--embed-bits", "4"])
