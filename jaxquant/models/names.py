"""Hugging Face tensor names and NNX parameter paths of the Llama family and its mixtures
of experts: one table.

Each row pairs a Hugging Face tensor name pattern with the NNX parameter path and says
whether the tensor is a linear weight, stored ``(d_out, d_in)`` by PyTorch and transposed,
at the loading boundary, into a Flax ``(d_in, d_out)`` kernel. Mixtral and Qwen2-MoE name
the same NNX parameters differently; their rows say which architecture they belong to.
"""

from __future__ import annotations

import re

# (Hugging Face name, NNX path, transpose). "{i}" stands for the layer index, "{j}" for the
# expert's in a mixture-of-experts layer.
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

# Rows of one architecture's experts. Mixtral: w1 is the gate, w3 the up, w2 the down
# projection, and the router is the block's "gate"; Qwen2-MoE: the router is the MLP's "gate".
EXPERT_NAME_TABLES: dict[str, tuple[tuple[str, str, bool], ...]] = {
    "mixtral": (
        ("model.layers.{i}.block_sparse_moe.gate.weight", "layers/{i}/mlp/router/kernel", True),
        ("model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight", "layers/{i}/mlp/experts/{j}/gate_proj/kernel", True),
        ("model.layers.{i}.block_sparse_moe.experts.{j}.w3.weight", "layers/{i}/mlp/experts/{j}/up_proj/kernel", True),
        ("model.layers.{i}.block_sparse_moe.experts.{j}.w2.weight", "layers/{i}/mlp/experts/{j}/down_proj/kernel", True),
    ),
    "qwen2_moe": (
        ("model.layers.{i}.mlp.gate.weight", "layers/{i}/mlp/router/kernel", True),
        *((f"model.layers.{{i}}.mlp.experts.{{j}}.{p}.weight", f"layers/{{i}}/mlp/experts/{{j}}/{p}/kernel", True)
          for p in ("gate_proj", "up_proj", "down_proj")),
        *((f"model.layers.{{i}}.mlp.shared_expert.{p}.weight", f"layers/{{i}}/mlp/shared_expert/{p}/kernel", True)
          for p in ("gate_proj", "up_proj", "down_proj")),
        ("model.layers.{i}.mlp.shared_expert_gate.weight", "layers/{i}/mlp/shared_expert_gate/kernel", True),
    ),
}


def _pattern(template: str) -> re.Pattern[str]:
    escaped = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
    return re.compile("^" + escaped + "$")


def _rows(architecture: str | None) -> tuple[tuple[str, str, bool], ...]:
    # Without an architecture, Mixtral's expert names (the first mixture supported) win.
    experts = EXPERT_NAME_TABLES.get(architecture or "mixtral", ())
    return NAME_TABLE + experts


def _translate(name: str, rows: tuple[tuple[re.Pattern[str], str, bool], ...]) -> tuple[str, bool] | None:
    for pattern, template, transpose in rows:
        m = pattern.match(name)
        if m:
            for key, index in m.groupdict().items():
                template = template.replace("{" + key + "}", index)
            return template, transpose
    return None


_HF_TO_NNX = {arch: tuple((_pattern(hf), path, t) for hf, path, t in _rows(arch)) for arch in (None, *EXPERT_NAME_TABLES)}
_NNX_TO_HF = {arch: tuple((_pattern(path), hf, t) for hf, path, t in _rows(arch)) for arch in (None, *EXPERT_NAME_TABLES)}


def hf_to_nnx_name(name: str, architecture: str | None = None) -> tuple[str, bool] | None:
    """NNX path and transpose flag of a Hugging Face tensor name (``None`` if unmapped).

    Expert tensors are named as ``architecture`` names them (Mixtral's names when ``None``
    or a dense architecture)."""
    return _translate(name, _HF_TO_NNX.get(architecture, _HF_TO_NNX[None]))


def nnx_to_hf_name(path: str, architecture: str | None = None) -> tuple[str, bool] | None:
    """Hugging Face tensor name and transpose flag of an NNX path (``None`` if unmapped);
    expert tensors as in ``hf_to_nnx_name``."""
    return _translate(path, _NNX_TO_HF.get(architecture, _NNX_TO_HF[None]))


__all__ = ["EXPERT_NAME_TABLES", "NAME_TABLE", "hf_to_nnx_name", "nnx_to_hf_name"]
