"""Small GGUF files with random Llama weights, written with the ``gguf`` package's writer.

They are laid out as llama.cpp's converter lays out a Hugging Face Llama: llama.cpp's
tensor names, the query and key rows permuted, and a byte-level BPE tokenizer in the
metadata. ``write_llama_gguf`` returns the Hugging Face float32 tensors the file was
made from, so a reader can be checked against them.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import gguf
import numpy as np
from gguf.quants import quantize

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, CONTEXT = 64, 128, 2, 4, 2, 128
EXPERT_FFN, SHARED_FFN = 32, 48  # Qwen2-MoE's expert and shared-expert widths
HEAD_DIM = HIDDEN // HEADS
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def byte_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (byte-level BPE's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def tokenizer_vocab() -> tuple[list[str], list[str], list[int]]:
    """``(tokens, merges, token types)``: special tokens, the 256 byte symbols, a few merges."""
    alphabet = byte_unicode()
    space = alphabet[ord(" ")]
    merges = [f"{space} t", "h e", f"{space}t he", "i n", f"{space} a"]
    merged = [m.replace(" ", "") for m in merges]
    tokens = [*SPECIALS, *(alphabet[b] for b in range(256)), *merged]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))  # 3 = control, 1 = normal
    return tokens, merges, types


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # What llama.cpp's convert_hf_to_gguf.py does to q_proj / k_proj rows.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_hf_tensors(seed: int, vocab: int, tied: bool, experts: int = 0,
                      qwen2moe: bool = False) -> dict[str, np.ndarray]:
    """Random float32 Llama weights under Hugging Face names (linear weights ``(d_out, d_in)``);
    with ``experts``, a Mixtral: a router and that many SwiGLU experts per layer; with
    ``qwen2moe`` too, a Qwen2-MoE: q/k/v biases, narrower experts, a gated shared expert."""
    rng = np.random.default_rng(seed)

    def w(*shape: int, scale: float = 0.08) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    out = {"model.embed_tokens.weight": w(vocab, HIDDEN, scale=0.5),
           "model.norm.weight": 1 + w(HIDDEN, scale=0.1)}
    if not tied:
        out["lm_head.weight"] = w(vocab, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = 1 + w(HIDDEN, scale=0.1)
        out[p + "post_attention_layernorm.weight"] = 1 + w(HIDDEN, scale=0.1)
        out[p + "self_attn.q_proj.weight"] = w(HEADS * HEAD_DIM, HIDDEN)
        out[p + "self_attn.k_proj.weight"] = w(KV_HEADS * HEAD_DIM, HIDDEN)
        out[p + "self_attn.v_proj.weight"] = w(KV_HEADS * HEAD_DIM, HIDDEN)
        out[p + "self_attn.o_proj.weight"] = w(HIDDEN, HEADS * HEAD_DIM)
        if qwen2moe:
            for proj, width in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
                out[p + f"self_attn.{proj}_proj.bias"] = w(width * HEAD_DIM)
            out[p + "mlp.gate.weight"] = w(experts, HIDDEN, scale=0.5)
            for prefix, width in [*((f"mlp.experts.{j}.", EXPERT_FFN) for j in range(experts)),
                                  ("mlp.shared_expert.", SHARED_FFN)]:
                out[p + prefix + "gate_proj.weight"] = w(width, HIDDEN)
                out[p + prefix + "up_proj.weight"] = w(width, HIDDEN)
                out[p + prefix + "down_proj.weight"] = w(HIDDEN, width)
            out[p + "mlp.shared_expert_gate.weight"] = w(1, HIDDEN, scale=0.5)
            continue
        if experts:
            out[p + "block_sparse_moe.gate.weight"] = w(experts, HIDDEN, scale=0.5)
            for j in range(experts):
                e = f"{p}block_sparse_moe.experts.{j}."
                out[e + "w1.weight"] = w(FFN, HIDDEN)
                out[e + "w3.weight"] = w(FFN, HIDDEN)
                out[e + "w2.weight"] = w(HIDDEN, FFN)
            continue
        out[p + "mlp.gate_proj.weight"] = w(FFN, HIDDEN)
        out[p + "mlp.up_proj.weight"] = w(FFN, HIDDEN)
        out[p + "mlp.down_proj.weight"] = w(HIDDEN, FFN)
    return out


def _stack_experts(hf: dict[str, np.ndarray], experts: int, qwen2moe: bool) -> dict[str, np.ndarray]:
    """llama.cpp's layout of a mixture: each layer's experts stacked per projection
    (``ffn_{gate,up,down}_exps``, ``[experts, d_out, d_in]``), the router ``ffn_gate_inp``."""
    moe, kinds = ("mlp.", ("gate_proj", "up_proj", "down_proj")) if qwen2moe else ("block_sparse_moe.", ("w1", "w3", "w2"))
    out = {k: v for k, v in hf.items() if f".{moe}gate." not in k and f".{moe}experts." not in k}
    for i in range(LAYERS):
        prefix = f"model.layers.{i}.{moe}"
        out[f"blk.{i}.ffn_gate_inp.weight"] = hf[prefix + "gate.weight"]
        for gguf_kind, hf_kind in zip(("gate", "up", "down"), kinds):
            out[f"blk.{i}.ffn_{gguf_kind}_exps.weight"] = np.stack(
                [hf[f"{prefix}experts.{j}.{hf_kind}.weight"] for j in range(experts)])
    return out


_GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight", "input_layernorm": "attn_norm", "post_attention_layernorm":
               "ffn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
               "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp",
               "mlp.shared_expert_gate": "ffn_gate_inp_shexp"}


def gguf_name(hf: str) -> str:
    """llama.cpp's name for a Hugging Face tensor name (the test's own table, written independently)."""
    if hf in _GGUF_NAMES:
        return _GGUF_NAMES[hf]
    _, _, layer, *rest = hf.split(".")
    module, kind = ".".join(rest[:-1]), rest[-1]
    return f"blk.{layer}.{_GGUF_NAMES[module]}.{kind}"


def write_llama_gguf(path: str | os.PathLike, *, seed: int = 0, tied: bool = False,
                     types: dict[str, gguf.GGMLQuantizationType] | None = None,
                     default_type: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
                     pre: str = "smollm", context: int = CONTEXT, experts: int = 0,
                     experts_per_token: int = 2, arch: str = "llama") -> dict[str, np.ndarray]:
    """Write a random 2-layer Llama as a GGUF file; returns its Hugging Face float32 tensors.

    Args:
        path: the file to write.
        seed: weight seed.
        tied: leave out ``output.weight`` (the head shares the embedding).
        types: storage type by substring of the GGUF tensor name (first match wins);
            norms always stay F32, as llama.cpp keeps them.
        default_type: storage type of every other matrix.
        pre: ``tokenizer.ggml.pre``.
        context: the context length the file declares.
        experts: a Mixtral with this many experts per layer (0: a dense Llama), of which
            the router picks ``experts_per_token``.
        arch: ``general.architecture``: ``llama``, or ``qwen2moe`` for a Qwen2-MoE with
            ``experts`` experts and a shared expert (query and key rows not permuted, as
            llama.cpp's converter leaves Qwen's).
    """
    tokens, merges, token_types = tokenizer_vocab()
    qwen2moe = arch == "qwen2moe"
    hf = random_hf_tensors(seed, len(tokens), tied, experts, qwen2moe)
    w = gguf.GGUFWriter(os.fspath(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(context)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHAT_TEMPLATE)
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(experts_per_token)
    if qwen2moe:
        w.add_expert_feed_forward_length(EXPERT_FFN)
        w.add_expert_shared_feed_forward_length(SHARED_FFN)
    for name, arr in (_stack_experts(hf, experts, qwen2moe) if experts else hf).items():
        g = name if name.startswith("blk.") else gguf_name(name)
        if g.endswith("attn_q.weight") and not qwen2moe:
            arr = _permute(arr, HEADS)
        elif g.endswith("attn_k.weight") and not qwen2moe:
            arr = _permute(arr, KV_HEADS)
        qtype = gguf.GGMLQuantizationType.F32 if arr.ndim == 1 else next(
            (t for key, t in (types or {}).items() if key in g), default_type)
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(g, arr)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(g, arr.astype(np.float16))
        else:
            w.add_tensor(g, quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def quicker_transformers_gguf_loading(monkeypatch: Any) -> None:
    """Memoize two pure steps of transformers' GGUF loader for one test: it builds gguf's
    tensor name table once per module (about 400 times for a 30-layer Llama) and parses
    the file once for the config and again for the weights."""
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))
    readers: dict[str, Any] = {}
    original = gguf.GGUFReader

    def reader(path: Any, *args: Any, **kwargs: Any) -> Any:
        key = (os.fspath(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original(path, *args, **kwargs)
        return readers[key]

    monkeypatch.setattr(gguf, "GGUFReader", reader)
