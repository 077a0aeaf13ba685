"""GGUF files (llama.cpp's format) read into Hugging Face terms, without torch.

A GGUF file holds metadata (architecture, shapes, tokenizer) and tensors under llama.cpp's
names, most of them in block-quantized types (Q4_1, Q8_0, Q6_K, ...). ``read_gguf`` turns
one into what the rest of jaxquant already understands:

* ``hf_config``: a ``config.json`` dictionary (``jaxquant.models.config_from_hf`` reads it);
* ``tensors``: float32 arrays under Hugging Face names, linear weights ``(d_out, d_in)``,
  dequantized by the ``gguf`` package (the format's own Python implementation), with
  llama.cpp's row permutation of the Llama query and key projections undone;
* ``tokenizer``: a transformers fast tokenizer built from the metadata, chat template
  included.

Only the Llama family is mapped here (``general.architecture`` ``llama``, which Mistral
and Mixtral files also use — a Mixtral's experts, stacked per projection, are split into
one tensor per expert — ``qwen2``, and ``qwen2moe``: Qwen2-MoE with its shared expert, every
layer sparse, routing weights not renormalised, as llama.cpp runs it). Anything this
module cannot represent exactly, such as Llama 3.1's ``rope_freqs`` tensor, is refused
with a message naming it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import numpy as np

from jaxquant.io.gguf_file import GGUF_MAGIC, GGUFFile, read_gguf_file

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen2moe")

# (GGUF name, Hugging Face name); "{i}" stands for the layer index.
GGUF_NAME_TABLE: tuple[tuple[str, str], ...] = (
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("blk.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("blk.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    *((f"blk.{{i}}.attn_{g}.{kind}", f"model.layers.{{i}}.self_attn.{h}_proj.{kind}")
      for g, h in (("q", "q"), ("k", "k"), ("v", "v"), ("output", "o")) for kind in ("weight", "bias")),
    *((f"blk.{{i}}.ffn_{p}.{kind}", f"model.layers.{{i}}.mlp.{p}_proj.{kind}")
      for p in ("gate", "up", "down") for kind in ("weight", "bias")),
)
# A mixture of experts, by Hugging Face model type: the router, and each projection of
# every expert stacked in one tensor, split here into one Hugging Face tensor per expert
# ("{j}"); Qwen2-MoE's shared expert and its gate.
GGUF_EXPERT_NAME_TABLES: dict[str, tuple[tuple[str, str], ...]] = {
    "mixtral": (
        ("blk.{i}.ffn_gate_inp.weight", "model.layers.{i}.block_sparse_moe.gate.weight"),
        *((f"blk.{{i}}.ffn_{p}_exps.weight", f"model.layers.{{i}}.block_sparse_moe.experts.{{j}}.{w}.weight")
          for p, w in (("gate", "w1"), ("up", "w3"), ("down", "w2"))),
    ),
    "qwen2_moe": (
        ("blk.{i}.ffn_gate_inp.weight", "model.layers.{i}.mlp.gate.weight"),
        *((f"blk.{{i}}.ffn_{p}_exps.weight", f"model.layers.{{i}}.mlp.experts.{{j}}.{p}_proj.weight")
          for p in ("gate", "up", "down")),
        *((f"blk.{{i}}.ffn_{p}_shexp.weight", f"model.layers.{{i}}.mlp.shared_expert.{p}_proj.weight")
          for p in ("gate", "up", "down")),
        ("blk.{i}.ffn_gate_inp_shexp.weight", "model.layers.{i}.mlp.shared_expert_gate.weight"),
    ),
}


def _compiled(rows: tuple[tuple[str, str], ...]) -> list[tuple[re.Pattern[str], str]]:
    return [(re.compile("^" + re.escape(g).replace(r"\{i\}", r"(\d+)") + "$"), h) for g, h in rows]


_TABLES = {kind: _compiled(GGUF_NAME_TABLE + rows) for kind, rows in
           {None: (), **GGUF_EXPERT_NAME_TABLES}.items()}

# llama.cpp pre-tokenizer names whose rule is "each digit alone, then GPT-2's split"
# (llama.cpp's LLAMA_VOCAB_PRE_TYPE_STARCODER family); transformers' GGUF tokenizer
# builder does not know them and would merge digit runs.
_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "codeshell", "exaone", "minerva", "command-r")


@dataclasses.dataclass(frozen=True)
class GGUFCheckpoint:
    """A GGUF file's model in Hugging Face terms.

    Attributes:
        path: the file.
        hf_config: a ``config.json`` dictionary for the model.
        tensors: float32 arrays by Hugging Face name (empty when read without tensors).
        tensor_types: the GGML storage type of each tensor (``"Q4_1"``, ``"F32"``, ...),
            by Hugging Face name.
        metadata: every scalar and string metadata field, and array fields other than the
            tokenizer's vocabulary, by GGUF key.
    """

    path: str
    hf_config: dict[str, Any]
    tensors: dict[str, np.ndarray]
    tensor_types: dict[str, str]
    metadata: dict[str, Any]


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic bytes."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def gguf_to_hf_name(name: str, model_type: str | None = None) -> str | None:
    """The Hugging Face name of a llama.cpp tensor name (``None`` if unmapped); expert
    tensors as the Hugging Face ``model_type`` (``mixtral`` when ``None``) names them."""
    for pattern, hf in _TABLES.get(model_type or "mixtral", _TABLES[None]):
        m = pattern.match(name)
        if m:
            return hf.replace("{i}", m.group(1)) if m.groups() else hf
    return None


def _metadata(file: GGUFFile) -> dict[str, Any]:
    # GGUF stores float32: keep a float's shortest decimal form (1e-05, not 9.9999997e-06).
    return {key: float(str(np.float32(v))) if isinstance(v, float) else v for key, v in file.metadata.items()}


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Every metadata field of a GGUF file by key, as Python values (arrays as lists).

    Raises:
        ValueError: not a GGUF file, or a corrupt one.
    """
    return _metadata(read_gguf_file(path))


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's converter interleaves each head's two rotary halves ("permute" in
    # convert_hf_to_gguf.py) so its kernels rotate adjacent pairs; undo that.
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_config_from_metadata(meta: dict[str, Any], tensor_names: set[str], path: str = "GGUF file") -> dict[str, Any]:
    """A Hugging Face ``config.json`` dictionary for the model a GGUF file's metadata describes.

    Raises:
        ValueError: an architecture or RoPE scaling this module does not map (names it).
    """
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(f"{path}: general.architecture={arch!r} is not supported; jaxquant reads "
                         f"{SUPPORTED_GGUF_ARCHITECTURES}")

    def need(key: str) -> Any:
        full = f"{arch}.{key}"
        if full not in meta:
            raise ValueError(f"{path}: metadata field {full!r} is missing")
        return meta[full]

    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = meta.get(f"{arch}.vocab_size") or (len(tokens) if tokens is not None else None)
    if vocab is None:
        raise ValueError(f"{path}: neither {arch}.vocab_size nor tokenizer.ggml.tokens gives the vocabulary size")
    rope_kind = meta.get(f"{arch}.rope.scaling.type", "none")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0))}
    if rope_kind == "linear":
        rope = {**rope, "rope_type": "linear", "factor": float(need("rope.scaling.factor"))}
    elif rope_kind != "none":
        raise ValueError(f"{path}: {arch}.rope.scaling.type={rope_kind!r} is not supported (only none and linear)")
    if "rope_freqs.weight" in tensor_names:
        raise ValueError(f"{path}: the tensor rope_freqs.weight (per-frequency RoPE factors, as in Llama 3.1) "
                         "is not supported")
    experts = int(meta.get(f"{arch}.expert_count", 0) or 0)
    model_type = {"qwen2moe": "qwen2_moe"}.get(arch, "mixtral" if experts else arch)
    cfg: dict[str, Any] = {
        "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM",
                           "qwen2_moe": "Qwen2MoeForCausalLM"}[model_type]],
        "model_type": model_type,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(meta.get(f"{arch}.attention.key_length", hidden // heads)),
        "hidden_act": "silu",
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_parameters": rope,
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "dtype": "float32",
    }
    if model_type == "llama":
        cfg["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
        cfg["mlp_bias"] = "blk.0.ffn_gate.bias" in tensor_names
    if model_type == "mixtral":
        cfg.update(num_local_experts=experts, num_experts_per_tok=int(need("expert_used_count")), sliding_window=None)
    if model_type == "qwen2_moe":
        shared = "blk.0.ffn_gate_shexp.weight" in tensor_names
        cfg.update(num_experts=experts, num_experts_per_tok=int(need("expert_used_count")),
                   moe_intermediate_size=int(need("expert_feed_forward_length")),
                   shared_expert_intermediate_size=int(need("expert_shared_feed_forward_length")) if shared else 0,
                   norm_topk_prob=bool(meta.get(f"{arch}.expert_weights_norm", False)), decoder_sparse_step=1,
                   mlp_only_layers=[], qkv_bias="blk.0.attn_q.bias" in tensor_names, use_sliding_window=False)
    return cfg


def read_gguf(path: str | os.PathLike, *, tensors: bool = True) -> GGUFCheckpoint:
    """Read a GGUF file's config and (optionally) its tensors, dequantized to float32.

    Args:
        path: the ``.gguf`` file.
        tensors: dequantize the tensors too (``False`` reads the metadata only).

    Returns:
        The model in Hugging Face terms (see ``GGUFCheckpoint``).

    Raises:
        ValueError: not a GGUF file, a corrupt one, an unsupported architecture, a tensor
            with no Hugging Face name, or a storage type the ``gguf`` package cannot
            dequantize (each message names the file and the tensor).
    """
    path = os.fspath(path)
    file = read_gguf_file(path)  # first: it names the package if gguf is missing
    from gguf.quants import dequantize  # noqa: PLC0415

    meta = _metadata(file)
    names = {t.name for t in file.tensors}
    hf_config = hf_config_from_metadata(meta, names, path)
    llama = meta["general.architecture"] == "llama"  # Mixtral files say llama too
    out: dict[str, np.ndarray] = {}
    types: dict[str, str] = {}
    experts = hf_config.get("num_local_experts") or hf_config.get("num_experts") or 0
    for t in file.tensors:
        hf = gguf_to_hf_name(t.name, hf_config["model_type"])
        if hf is None:
            raise ValueError(f"{path}: tensor {t.name!r} has no Hugging Face name in jaxquant's GGUF table")
        # A stacked expert tensor becomes one Hugging Face tensor per expert.
        hf_names = [hf.replace("{j}", str(j)) for j in range(experts)] if "{j}" in hf else [hf]
        types.update(dict.fromkeys(hf_names, t.tensor_type.name))
        if not tensors:
            continue
        try:
            arr = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except NotImplementedError:
            raise ValueError(f"{path}: tensor {t.name!r} is stored as {t.tensor_type.name}, which the gguf "
                             "package cannot dequantize") from None
        # GGUF lists dimensions fastest-first; numpy order is the reverse.
        shape = tuple(int(s) for s in reversed(t.shape))
        arr = arr.reshape(shape)
        if llama and ".self_attn.q_proj." in hf:
            arr = _unpermute(arr, hf_config["num_attention_heads"])
        elif llama and ".self_attn.k_proj." in hf:
            arr = _unpermute(arr, hf_config["num_key_value_heads"])
        if "{j}" not in hf:
            out[hf] = arr
        elif arr.shape[0] != len(hf_names):
            raise ValueError(f"{path}: tensor {t.name!r} stacks {arr.shape[0]} experts, the metadata says "
                             f"{len(hf_names)}")
        else:
            out.update(zip(hf_names, arr))
    return GGUFCheckpoint(path=path, hf_config=hf_config, tensors=out, tensor_types=types, metadata=meta)


def tokenizer_from_metadata(meta: dict[str, Any], path: str = "GGUF file") -> Any:
    """A transformers fast tokenizer (``PreTrainedTokenizerFast``) built from GGUF metadata.

    The vocabulary, merges and special tokens go through transformers' own GGUF tokenizer
    builder; pre-tokenizers llama.cpp knows and that builder does not (the digit-splitting
    family of SmolLM and StarCoder) are set here. The chat template comes along.

    Raises:
        ValueError: the file holds no tokenizer, or one of a kind transformers cannot build.
    """
    from tokenizers import Regex, pre_tokenizers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (  # noqa: PLC0415
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    if "tokenizer.ggml.tokens" not in meta:
        raise ValueError(f"{path} holds no tokenizer (no tokenizer.ggml.tokens field)")
    spec = {name: meta[f"tokenizer.{key}"] for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
            if f"tokenizer.{key}" in meta}
    backend, _ = convert_gguf_tokenizer(meta["general.architecture"], spec)
    if spec.get("tokenizer_type") == "gpt2" and spec.get("pre_tokenizer_type") in _DIGIT_SPLIT_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    tokens = meta["tokenizer.ggml.tokens"]
    special = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None and 0 <= int(token_id) < len(tokens):
            special[name] = tokens[int(token_id)]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **special)
    if "tokenizer.chat_template" in meta:
        tokenizer.chat_template = meta["tokenizer.chat_template"]
    return tokenizer


def load_gguf_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer stored in a GGUF file's metadata (see ``tokenizer_from_metadata``)."""
    path = os.fspath(path)
    return tokenizer_from_metadata(read_metadata(path), path)


__all__ = [
    "GGUF_EXPERT_NAME_TABLES",
    "GGUF_NAME_TABLE",
    "GGUFCheckpoint",
    "gguf_to_hf_name",
    "hf_config_from_metadata",
    "is_gguf",
    "load_gguf_tokenizer",
    "read_gguf",
    "read_metadata",
    "tokenizer_from_metadata",
]
