"""Hugging Face VPTQ format: index packing, layer tensors and config, and the real consumer.

The consumer tests run the ``vptq`` package's own reader (``vptq.ops.dequant``, its
PyTorch path, which runs on CPU) and its ``VQuantLinear`` layers inside transformers'
Llama on jaxquant's export. They are skipped where ``vptq`` is not installed (its
dependencies include gradio and sentence-transformers, so the test extra does not pull
it in).
"""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxquant.cli import main
from jaxquant.io import hf_vptq, save
from jaxquant.methods.vptq.array import VPTQQuantized
from jaxquant.models import quantized_dirs
from jaxquant.models.config import ModelConfig
from jaxquant.models.llama import LlamaForCausalLM
from jaxquant.models.loading import save_pretrained
from jaxquant.qarray import ScalarQuantized
from hf_models import quantize_decoder_linears, tiny_transformers_llama

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _random_vptq(rng, d_out, d_in, *, v=8, bits=6, residual_bits=0, n_outliers=0, scales=True, layout="in_out"):
    k = 2**bits
    # Codewords ~ N(0, 1/d_in) so that activations keep their scale through the layers.
    book = lambda: jnp.asarray(rng.standard_normal((k, v)) / np.sqrt(d_in), jnp.float16)  # noqa: E731
    outliers = np.sort(rng.choice(d_in, n_outliers, replace=False)) if n_outliers else None
    return VPTQQuantized(
        codes=jnp.asarray(rng.integers(0, k, (d_out // v, d_in)), jnp.uint8),
        codebook=book(),
        residual_codes=jnp.asarray(rng.integers(0, 2**residual_bits, (d_out // v, d_in)), jnp.uint8)
        if residual_bits else None,
        residual_codebook=jnp.asarray(rng.standard_normal((2**residual_bits, v)) / (4 * np.sqrt(d_in)), jnp.float16)
        if residual_bits else None,
        outlier_codebook=book() if n_outliers else None,
        outlier_columns=None if outliers is None else jnp.asarray(outliers, jnp.int16),
        column_scales=jnp.asarray(rng.uniform(0.5, 1.5, d_in), jnp.float16) if scales else None,
        codebook_bits=bits,
        residual_bits=residual_bits,
        shape=(d_in, d_out) if layout == "in_out" else (d_out, d_in),
        layout=layout,
    )


def _dense(q: VPTQQuantized) -> np.ndarray:
    """``[d_out, d_in]`` float32 from the array's own decode."""
    w = np.asarray(q.decode(), np.float32)
    return w.T if q.layout == "in_out" else w


# Each decoder linear gets a configuration of its own; the format keeps one per layer.
_KINDS = {
    "q_proj": dict(bits=6, residual_bits=6),
    "k_proj": dict(bits=6, n_outliers=5),
    "v_proj": dict(bits=8, residual_bits=4, scales=False),
    "o_proj": dict(bits=8),
    "gate_proj": dict(bits=6, residual_bits=6),
    "up_proj": dict(bits=5, n_outliers=3, scales=False),
    "down_proj": dict(bits=6, residual_bits=6),
}


def _quantize_linears(model, rng) -> dict[str, VPTQQuantized]:
    return quantize_decoder_linears(
        model, lambda path, d_out, d_in: _random_vptq(rng, d_out, d_in, **_KINDS[path.split("/")[-2]]))


# ----------------------------------------------------------------------------- packing


def test_pack_writes_the_bit_stream_least_significant_first(rng):
    # 8 + 8 bits: each 32-bit word holds two elements, residual code above the main code.
    codes, res = rng.integers(0, 256, (3, 6)), rng.integers(0, 256, (3, 6))
    words = hf_vptq.pack_indices(codes, 8, res, 8).view(np.uint32).astype(np.int64)
    merged = codes | res << 8
    np.testing.assert_array_equal(words, merged[:, 0::2] | merged[:, 1::2] << 16)
    # 12 bits x 3 elements = 36 bits: two words, the second holding bits 32..35 and zeros.
    c = np.array([0xABC, 0x123, 0xFED])
    w = hf_vptq.pack_indices(c, 12).view(np.uint32)
    stream = int(c[0]) | int(c[1]) << 12 | int(c[2]) << 24
    assert w.tolist() == [stream & 0xFFFFFFFF, stream >> 32]


@pytest.mark.parametrize("bits,residual_bits,n", [(8, 8, 576), (6, 6, 31), (8, 4, 17), (5, 0, 100), (12, 0, 9)])
def test_pack_unpack_round_trip(rng, bits, residual_bits, n):
    codes = rng.integers(0, 2**bits, (4, n))
    res = rng.integers(0, 2**residual_bits, (4, n)) if residual_bits else None
    words = hf_vptq.pack_indices(codes, bits, res, residual_bits)
    assert words.dtype == np.int32 and words.shape == (4, -(-n * (bits + residual_bits) // 32))
    back, back_res = hf_vptq.unpack_indices(words, n, bits, residual_bits)
    np.testing.assert_array_equal(back, codes)
    if residual_bits:
        np.testing.assert_array_equal(back_res, res)
    else:
        assert back_res is None


def test_pack_rejects_codes_out_of_range():
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 256\).*\[0, 256\]"):
        hf_vptq.pack_indices(np.array([0, 256]), 8)
    with pytest.raises(ValueError, match="residual_codes must lie"):
        hf_vptq.pack_indices(np.array([1]), 8, np.array([16]), 4)
    with pytest.raises(ValueError, match="must be between 1 and 32"):
        hf_vptq.pack_indices(np.array([1]), 16, np.array([1]), 17)


# ----------------------------------------------------------------------------- layer tensors


def _with_outlier_columns(q: VPTQQuantized, rng, n_outliers: int) -> VPTQQuantized:
    """``q`` with ``n_outliers`` outlier columns coded by a copy of its codebook."""
    cols = jnp.asarray(np.sort(rng.choice(q.d_in, n_outliers, replace=False)), jnp.int16)
    return dataclasses.replace(q, outlier_columns=cols, outlier_codebook=q.codebook)


def test_layer_tensors_decode_to_the_array(rng):
    """The stored tensors, read by the format's rules (module docstring), give the array's weight."""
    q = _random_vptq(rng, 48, 40, bits=6, n_outliers=4, layout="out_in")
    t, cfg = hf_vptq.layer_tensors("m", q)
    v, k, n_out = 8, 64, 4
    assert cfg["vector_lens"] == [v, v] and cfg["num_centroids"] == [k, k] and cfg["num_res_centroids"] == [-1, -1]
    assert (cfg["group_size"], cfg["outlier_size"], cfg["enable_perm"], cfg["enable_norm"]) == (36, n_out, True, True)
    perm = t["m.perm"].view(np.uint16).astype(np.int64)
    main_codes, _ = hf_vptq.unpack_indices(t["m.indices"][0], 36, 6)
    books = [t["m.outlier_centroids.weight"].reshape(k, v)] * n_out + [t["m.centroids.weight"].reshape(k, v)] * 36
    stored_codes = np.concatenate([t["m.outlier_indices"][0].view(np.uint16).astype(np.int64), main_codes], axis=1)
    permuted = np.stack([books[c][stored_codes[:, c]].reshape(-1) for c in range(40)], axis=1)  # [d_out, d_in]
    w = np.empty_like(permuted)
    w[:, perm] = permuted
    w = w.astype(np.float32) * t["m.weight_scale"].astype(np.float32) + t["m.weight_bias"].astype(np.float32)
    np.testing.assert_allclose(w, _dense(q), rtol=1e-6, atol=1e-7)


def test_layer_tensors_refuse_what_the_format_cannot_hold(rng):
    both = _with_outlier_columns(_random_vptq(rng, 16, 16, bits=4, residual_bits=4), rng, n_outliers=2)
    with pytest.raises(ValueError, match="m: the VPTQ format has no residual codebook for outlier columns"):
        hf_vptq.layer_tensors("m", both)
    with pytest.raises(ValueError, match="residual_bits=6 > codebook_bits=4"):
        hf_vptq.layer_tensors("m", _random_vptq(rng, 16, 16, bits=4, residual_bits=6))


def test_export_refuses_other_quantized_types_and_no_vptq_layer(tmp_path, rng):
    sq = ScalarQuantized(codes=jnp.zeros((8, 8), jnp.uint8), scales=jnp.ones((8, 1)), zeros=jnp.zeros((8, 1)),
                         bits=2, group_size=8, shape=(8, 8))
    with pytest.raises(TypeError, match="m.weight is a ScalarQuantized"):
        hf_vptq.write_hf_vptq(tmp_path / "a", {"m.weight": sq}, {})
    with pytest.raises(ValueError, match="no VPTQQuantized layer"):
        hf_vptq.write_hf_vptq(tmp_path / "b", {"m.weight": np.zeros((4, 4), np.float32)}, {})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------- the vptq package


def test_vptq_package_dequantizes_our_layer_tensors(rng):
    """``vptq.ops.dequant`` (the package's CPU reader) on exported tensors gives the array's weight."""
    torch = pytest.importorskip("torch")
    quant_gemm = pytest.importorskip("vptq.ops.quant_gemm")
    for kind in _KINDS.values():
        q = _random_vptq(rng, 64, 48, **kind)
        t, c = hf_vptq.layer_tensors("m", q)
        get = lambda name: torch.from_numpy(t[name].copy()) if name in t else None  # noqa: E731
        v, k = c["vector_lens"][1], c["num_centroids"][1]
        w = quant_gemm.dequant(
            indices=get("m.indices"), centroids=get("m.centroids.weight").float().view(1, k, v),
            outlier_indices=get("m.outlier_indices"),
            outlier_centroids=None if c["outlier_size"] == 0 else get("m.outlier_centroids.weight").float(),
            res_indices=None, res_centroids=None if "m.res_centroids.weight" not in t
            else get("m.res_centroids.weight").float(),
            perm=get("m.perm"), weight_scale=None if not c["enable_norm"] else get("m.weight_scale").float(),
            weight_bias=None if not c["enable_norm"] else get("m.weight_bias").float(),
            is_indice_packed=True, enable_outlier=c["outlier_size"] > 0,
            enable_residual="m.res_centroids.weight" in t, enable_perm=c["enable_perm"], enable_norm=c["enable_norm"],
            num_centroids=k, num_outlier_centroids=c["num_centroids"][0], num_res_centroids=c["num_res_centroids"][1],
            padding=0, outlier_padding=0, num_codebooks=1, group_size=c["group_size"],
            outlier_size=c["outlier_size"], vector_len=v, outlier_vector_len=c["vector_lens"][0])
        np.testing.assert_allclose(w.numpy(), _dense(q), rtol=1e-6, atol=1e-7, err_msg=str(kind))


@pytest.mark.slow  # builds a transformers model
def test_vptq_layers_in_a_transformers_model_match_our_logits(tmp_path, rng):
    """The export, loaded strictly into transformers' Llama with the ``vptq`` package's
    ``VQuantLinear`` in every module ``config_for_layers`` names, gives our logits.

    transformers' own loader cannot do it here: 5.25's ``replace_with_vptq_linear`` looks
    nested modules up in ``model._modules`` by dotted name (KeyError for every Llama
    layer), and ``validate_environment`` asks for a GPU. Both sit before the layers; the
    layers, the config entries and the tensor names are what this test checks.
    """
    torch = pytest.importorskip("torch")
    vptq = pytest.importorskip("vptq")
    import safetensors.torch
    import transformers

    model = tiny_transformers_llama(tmp_path / "src")
    _quantize_linears(model, rng)
    out = quantized_dirs.export_hf_vptq(model, tmp_path / "vptq", tokenizer_dir=tmp_path / "src")
    config = json.loads((tmp_path / "vptq" / "config.json").read_text())
    qc = config.pop("quantization_config")
    assert qc["quant_method"] == "vptq" and len(qc["config_for_layers"]) == 14
    assert "lm_head" in qc["modules_to_not_convert"]

    torch_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).float()
    for name, layer in qc["config_for_layers"].items():
        linear = torch_model.get_submodule(name)
        keys = ("vector_lens", "num_centroids", "num_res_centroids", "group_num", "group_size", "outlier_size",
                "indices_as_float", "enable_norm", "enable_perm", "is_indice_packed")
        torch_model.set_submodule(name, vptq.VQuantLinear(linear.in_features, linear.out_features,
                                                          **{k: layer[k] for k in keys}, enable_proxy_error=False,
                                                          bias=linear.bias is not None))
    state = safetensors.torch.load_file(f"{out}/model.safetensors")
    torch_model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    tokens = np.array([[1, 5, 9, 33, 90, 7, 2, 64, 11, 0]], np.int32)
    with torch.no_grad():
        ref = torch_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    ours = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens)))
    assert np.all(np.isfinite(ref))
    # The same float16 codebooks and scales on both sides: only summation order differs.
    assert float(np.abs(ours - ref).max() / np.abs(ref).max()) < 1e-5


def test_cli_export_hf_vptq(tmp_path, rng, capsys):
    cfg = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                      num_kv_heads=2, head_dim=16, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    _quantize_linears(model, rng)
    qdir = tmp_path / "q"
    save_pretrained(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)), qdir)
    save(qdir / "params", nnx.state(model, nnx.Param))
    assert main(["export", str(qdir), "--format", "hf-vptq", "--out", str(tmp_path / "out")]) == 0
    assert "exported 7 VPTQ layers" in capsys.readouterr().out
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["config_for_layers"]["model.layers.0.mlp.up_proj"]["outlier_size"] == 3
