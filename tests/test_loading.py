"""Checkpoint loading and saving: name table, safetensors parsing, clear errors on bad input."""

import json
import re
import struct

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from jaxquant.models import (
    EXPERT_NAME_TABLES,
    NAME_TABLE,
    LlamaForCausalLM,
    ModelConfig,
    from_pretrained,
    hf_to_nnx_name,
    nnx_to_hf_name,
    save_pretrained,
)
from jaxquant.io.safetensors import read_safetensors, write_safetensors
from jaxquant.models.loading import expected_hf_names

CFG = ModelConfig(hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8,
                  max_position_embeddings=32, vocab_size=40)


@pytest.fixture
def saved(tmp_path):
    model = LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))
    save_pretrained(model, tmp_path)
    return model, tmp_path


def _tokens():
    return jnp.asarray(np.arange(10).reshape(1, 10) % 40, jnp.int32)


def test_name_table_round_trip():
    for hf, path, transpose in NAME_TABLE:
        hf_i, path_i = (name.replace("{i}", "3").replace("{j}", "12") for name in (hf, path))
        assert hf_to_nnx_name(hf_i) == (path_i, transpose)
        assert nnx_to_hf_name(path_i) == (hf_i, transpose)
    for arch, rows in EXPERT_NAME_TABLES.items():  # each mixture's expert names, both ways
        for hf, path, transpose in rows:
            hf_i, path_i = (name.replace("{i}", "3").replace("{j}", "12") for name in (hf, path))
            assert hf_to_nnx_name(hf_i, arch) == (path_i, transpose)
            assert nnx_to_hf_name(path_i, arch) == (hf_i, transpose)
    assert nnx_to_hf_name("layers/0/mlp/router/kernel")[0] == "model.layers.0.block_sparse_moe.gate.weight"
    assert nnx_to_hf_name("layers/0/mlp/router/kernel", "qwen2_moe")[0] == "model.layers.0.mlp.gate.weight"
    assert hf_to_nnx_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    # Only linear weights transpose; embeddings and norms keep their layout.
    assert [t for hf, _, t in NAME_TABLE if t] == [t for hf, _, t in NAME_TABLE if hf.endswith("proj.weight")
                                                   or re.search(r"(gate|w\d)\.weight$", hf) or hf == "lm_head.weight"]


def test_round_trip_single_and_sharded(saved, tmp_path):
    model, path = saved
    want = np.asarray(model(_tokens()))
    np.testing.assert_array_equal(np.asarray(from_pretrained(path)(_tokens())), want)
    save_pretrained(model, tmp_path / "sharded", max_shard_bytes=4000)
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == expected_hf_names(CFG)
    np.testing.assert_array_equal(np.asarray(from_pretrained(tmp_path / "sharded")(_tokens())), want)


def test_writer_matches_safetensors_library(tmp_path, rng):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    tensors = {"a": rng.standard_normal((3, 5)).astype(np.float32), "b": np.arange(7, dtype=np.int64),
               "c": rng.standard_normal((2, 2)).astype(np.float16)}
    write_safetensors(tmp_path / "x.safetensors", tensors)
    back = safetensors_numpy.load_file(str(tmp_path / "x.safetensors"))
    for k, v in tensors.items():
        np.testing.assert_array_equal(back[k], v)
    safetensors_numpy.save_file(tensors, str(tmp_path / "y.safetensors"))
    ours = read_safetensors(tmp_path / "y.safetensors")
    for k, v in tensors.items():
        np.testing.assert_array_equal(ours[k], v)


def test_bfloat16_round_trip(tmp_path):
    model = LlamaForCausalLM(CFG, dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
    save_pretrained(model, tmp_path)
    raw = read_safetensors(tmp_path / "model.safetensors")
    assert raw["model.embed_tokens.weight"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    back = from_pretrained(tmp_path, dtype=jnp.bfloat16)
    np.testing.assert_array_equal(
        np.asarray(back(_tokens()).astype(jnp.float32)), np.asarray(model(_tokens()).astype(jnp.float32))
    )


def test_truncated_safetensors(saved):
    _, path = saved
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"truncated safetensors file .*model\.safetensors"):
        from_pretrained(path)


def test_corrupt_safetensors_header(saved):
    _, path = saved
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[10:20] = b"\xff" * 10
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt safetensors file .*not valid JSON"):
        from_pretrained(path)
    f.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(ValueError, match="header length 1000000000000 exceeds the file size"):
        from_pretrained(path)
    f.write_bytes(b"abc")
    with pytest.raises(ValueError, match="too short"):
        from_pretrained(path)


def _rewrite(path, edit):
    tensors = dict(read_safetensors(path / "model.safetensors"))
    edit(tensors)
    write_safetensors(path / "model.safetensors", tensors)


def test_missing_tensor(saved):
    _, path = saved
    _rewrite(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors: \['model.layers.1.mlp.up_proj.weight'\]"):
        from_pretrained(path)


def test_extra_tensor(saved):
    _, path = saved
    _rewrite(path, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(16, np.float32)}))
    with pytest.raises(ValueError, match=r"does not use: \['model.layers.0.self_attn.q_proj.bias'\]"):
        from_pretrained(path)


def test_misshaped_tensor(saved):
    _, path = saved
    _rewrite(path, lambda t: t.update({"model.layers.0.mlp.down_proj.weight": np.zeros((16, 20), np.float32)}))
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj.weight has shape \(16, 20\), the config "
                                         r"implies \(16, 24\)"):
        from_pretrained(path)


def test_unknown_architecture(saved):
    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture: model_type='gpt2'"):
        from_pretrained(path)


def test_missing_files(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="nowhere' does not exist"):
        from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_pretrained(tmp_path / "empty")
    _, path = saved
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        from_pretrained(path)


def test_missing_shard(tmp_path):
    model = LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))
    save_pretrained(model, tmp_path, max_shard_bytes=4000)
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="shard model-00002-of-.* is missing"):
        from_pretrained(tmp_path)


def test_save_refuses_quantized_state(tmp_path):
    import jaxquant as jq

    model = LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))
    q = jq.quantize(nnx.state(model), None, jq.RTN(bits=4, group_size=8))
    with pytest.raises(TypeError, match="layers/0/attn/k_proj/kernel is quantized"):
        save_pretrained(model, tmp_path, params=q)
    assert not (tmp_path / "model.safetensors").exists()
