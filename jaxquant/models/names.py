"""Hugging Face tensor names and NNX parameter paths of the Llama family: one table.

Each row pairs a Hugging Face tensor name pattern with the NNX parameter path and says
whether the tensor is a linear weight, stored ``(d_out, d_in)`` by PyTorch and transposed,
at the loading boundary, into a Flax ``(d_in, d_out)`` kernel.
"""

from __future__ import annotations

import re

# (Hugging Face name, NNX path, transpose). "{i}" stands for the layer index.
NAME_TABLE: tuple[tuple[str, str, bool], ...] = (
    ("model.embed_tokens.weight", "embed/embedding", False),
    ("model.layers.{i}.input_layernorm.weight", "layers/{i}/input_norm/scale", False),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers/{i}/attn/q_proj/kernel", True),
    ("model.layers.{i}.self_attn.q_proj.bias", "layers/{i}/attn/q_proj/bias", False),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers/{i}/attn/k_proj/kernel", True),
    ("model.layers.{i}.self_attn.k_proj.bias", "layers/{i}/attn/k_proj/bias", False),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers/{i}/attn/v_proj/kernel", True),
    ("model.layers.{i}.self_attn.v_proj.bias", "layers/{i}/attn/v_proj/bias", False),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers/{i}/attn/o_proj/kernel", True),
    ("model.layers.{i}.self_attn.o_proj.bias", "layers/{i}/attn/o_proj/bias", False),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers/{i}/post_attn_norm/scale", False),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers/{i}/mlp/gate_proj/kernel", True),
    ("model.layers.{i}.mlp.gate_proj.bias", "layers/{i}/mlp/gate_proj/bias", False),
    ("model.layers.{i}.mlp.up_proj.weight", "layers/{i}/mlp/up_proj/kernel", True),
    ("model.layers.{i}.mlp.up_proj.bias", "layers/{i}/mlp/up_proj/bias", False),
    ("model.layers.{i}.mlp.down_proj.weight", "layers/{i}/mlp/down_proj/kernel", True),
    ("model.layers.{i}.mlp.down_proj.bias", "layers/{i}/mlp/down_proj/bias", False),
    ("model.norm.weight", "final_norm/scale", False),
    ("lm_head.weight", "lm_head/kernel", True),
)


def _compile_table() -> list[tuple[re.Pattern[str], str, re.Pattern[str], str, bool]]:
    rows = []
    for hf, nnx_path, transpose in NAME_TABLE:
        hf_re = re.compile("^" + re.escape(hf).replace(r"\{i\}", r"(\d+)") + "$")
        nnx_re = re.compile("^" + re.escape(nnx_path).replace(r"\{i\}", r"(\d+)") + "$")
        rows.append((hf_re, hf, nnx_re, nnx_path, transpose))
    return rows


_TABLE = _compile_table()


def hf_to_nnx_name(name: str) -> tuple[str, bool] | None:
    """NNX path and transpose flag of a Hugging Face tensor name (``None`` if unmapped)."""
    for hf_re, _, _, nnx_path, transpose in _TABLE:
        m = hf_re.match(name)
        if m:
            return (nnx_path.replace("{i}", m.group(1)) if m.groups() else nnx_path), transpose
    return None


def nnx_to_hf_name(path: str) -> tuple[str, bool] | None:
    """Hugging Face tensor name and transpose flag of an NNX path (``None`` if unmapped)."""
    for _, hf, nnx_re, _, transpose in _TABLE:
        m = nnx_re.match(path)
        if m:
            return (hf.replace("{i}", m.group(1)) if m.groups() else hf), transpose
    return None


__all__ = ["NAME_TABLE", "hf_to_nnx_name", "nnx_to_hf_name"]
