"""Model configuration: one frozen dataclass for the Llama family, built from Hugging Face configs.

transformers is used for configuration files only (``AutoConfig`` parses and upgrades
``config.json``, e.g. legacy ``rope_scaling`` into ``rope_parameters``); the model code is
jaxquant's own. The supported families differ in a few switches:

* Llama: optional ``attention_bias`` (q/k/v/o) and ``mlp_bias``; RoPE scaling ``llama3``
  or ``linear``.
* Mistral: a sliding attention window on every layer.
* Qwen2: bias on q/k/v (not o); a sliding window only on layers listed as
  ``sliding_attention`` in ``layer_types``.
* Mixtral: Mistral's attention, and a sparse mixture of SwiGLU experts in place of the
  MLP (``num_experts``, of which a router picks ``experts_per_token`` per token).
* Qwen2-MoE: Qwen2's attention; experts of their own width, the picked experts' weights
  renormalised only with ``norm_topk_prob``, a shared expert that every token runs (its
  output scaled by a sigmoid gate), and a dense MLP on the layers listed in
  ``mlp_only_layers`` or skipped by ``decoder_sparse_step``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

from jaxquant.validate import require_positive_ints

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "mixtral", "qwen2_moe")
MOE_ARCHITECTURES = ("mixtral", "qwen2_moe")
_SUPPORTED_ROPE = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder.

    Attributes:
        architecture: one of ``SUPPORTED_ARCHITECTURES`` (HF ``model_type``).
        vocab_size: number of token ids.
        hidden_size: model width ``d``.
        intermediate_size: SwiGLU hidden width of the dense MLPs (and of Mixtral's experts).
        num_layers: decoder blocks.
        num_heads: query heads.
        num_kv_heads: key/value heads (grouped-query attention when fewer than heads).
        head_dim: width of one head.
        rms_norm_eps: epsilon inside RMSNorm.
        rope_theta: RoPE base.
        rope_scaling: ``None`` or a dict with ``rope_type`` in ``("linear", "llama3")``
            and that type's parameters (kept as sorted ``(key, value)`` pairs so the
            config stays hashable, as jit static arguments must be; see ``rope``).
        max_position_embeddings: the context length the model supports.
        tie_word_embeddings: output head shares the embedding matrix.
        qkv_bias: q/k/v projections carry a bias.
        o_bias: the output projection carries a bias.
        mlp_bias: gate/up/down projections carry a bias.
        sliding_windows: per layer, the attention window in tokens or ``None`` (full).
        bos_token_id: id prepended by tokenizers that use one, or ``None``.
        eos_token_id: end-of-sequence id(s), or ``None``.
        num_experts: experts per layer of a mixture of experts; 0 for a dense MLP.
        experts_per_token: experts the router picks per token (top-k).
        expert_size: SwiGLU hidden width of each routed expert; 0 means ``intermediate_size``.
        shared_expert_size: hidden width of a shared expert that every token runs, its
            output scaled by ``sigmoid(shared_expert_gate(x))``; 0 for none.
        normalize_routing: renormalise the picked experts' softmax weights to sum to one
            (Mixtral; Qwen2-MoE's ``norm_topk_prob``).
        dense_layers: layers of a mixture-of-experts model that have a dense MLP of
            ``intermediate_size`` instead of experts.
    """

    architecture: str = "llama"
    vocab_size: int = 256
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 64
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_windows: tuple[int | None, ...] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    num_experts: int = 0
    experts_per_token: int = 0
    expert_size: int = 0
    shared_expert_size: int = 0
    normalize_routing: bool = True
    dense_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture={self.architecture!r} is not supported; jaxquant supports {SUPPORTED_ARCHITECTURES}"
            )
        require_positive_ints(self, "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                              "num_kv_heads", "head_dim", "max_position_embeddings")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        moe = self.architecture in MOE_ARCHITECTURES
        if moe and not 1 <= self.experts_per_token <= self.num_experts:
            raise ValueError(f"a {self.architecture} model needs 1 <= experts_per_token <= num_experts, got "
                             f"experts_per_token={self.experts_per_token} and num_experts={self.num_experts}")
        object.__setattr__(self, "dense_layers", tuple(sorted(set(int(i) for i in self.dense_layers))))
        moe_fields = {"num_experts": self.num_experts, "experts_per_token": self.experts_per_token,
                      "expert_size": self.expert_size, "shared_expert_size": self.shared_expert_size,
                      "dense_layers": self.dense_layers}
        if not moe and any(moe_fields.values()):
            raise ValueError(f"architecture={self.architecture!r} is dense: "
                             + ", ".join(f"{k}={v}" for k, v in moe_fields.items()) + " must be 0 or empty")
        if self.expert_size < 0 or self.shared_expert_size < 0:
            raise ValueError(f"expert_size={self.expert_size} and shared_expert_size={self.shared_expert_size} "
                             "must be >= 0")
        outside = [i for i in self.dense_layers if not 0 <= i < self.num_layers]
        if outside:
            raise ValueError(f"dense_layers {outside} are not layers of a {self.num_layers}-layer model")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", tuple(sorted(dict(self.rope_scaling).items())))
            kind = self.rope.get("rope_type", "default")
            if kind not in _SUPPORTED_ROPE:
                raise ValueError(f"rope_type={kind!r} is not supported; jaxquant supports {_SUPPORTED_ROPE}")
        if self.sliding_windows is not None:
            if len(self.sliding_windows) != self.num_layers:
                raise ValueError(
                    f"sliding_windows has {len(self.sliding_windows)} entries for num_layers={self.num_layers}"
                )
            object.__setattr__(self, "sliding_windows", tuple(self.sliding_windows))

    @property
    def rope(self) -> dict[str, Any]:
        """The RoPE scaling parameters as a dict (empty when unscaled)."""
        return dict(self.rope_scaling or ())

    def window(self, layer: int) -> int | None:
        """Attention window of ``layer`` in tokens, ``None`` for full causal attention."""
        return None if self.sliding_windows is None else self.sliding_windows[layer]

    def sparse(self, layer: int) -> bool:
        """Whether ``layer`` has a mixture of experts (else a dense MLP)."""
        return self.num_experts > 0 and layer not in self.dense_layers

    @property
    def routed_expert_size(self) -> int:
        """Hidden width of each routed expert."""
        return self.expert_size or self.intermediate_size

    def num_params(self) -> int:
        """Number of parameters of the model this config describes."""
        d, v = self.hidden_size, self.vocab_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.qkv_bias else 0) + (d if self.o_bias else 0)

        def swiglu(f: int) -> int:
            return 3 * d * f + ((2 * f + d) if self.mlp_bias else 0)

        total = v * d + d + (0 if self.tie_word_embeddings else d * v)
        for layer in range(self.num_layers):
            mlp = swiglu(self.intermediate_size)
            if self.sparse(layer):  # the experts, the router, and the shared expert with its gate
                mlp = self.num_experts * (swiglu(self.routed_expert_size) + d)
                mlp += (swiglu(self.shared_expert_size) + d) if self.shared_expert_size else 0
            total += attn + mlp + 2 * d
        return total

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies ``[head_dim // 2]`` in float32, scaling applied."""
        dim = self.head_dim
        # float32 like the reference implementation, so positions rotate identically.
        exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
        inv = (np.float32(1.0) / (np.float32(self.rope_theta) ** exponent)).astype(np.float32)
        scaling = self.rope
        kind = scaling.get("rope_type", "default")
        if kind == "linear":
            inv = inv / np.float32(scaling["factor"])
        elif kind == "llama3":
            inv = _llama3_inv_freq(inv, scaling)
        return inv.astype(np.float32)

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` dictionary that transformers reads back to the same model."""
        names = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope = {**self.rope, "rope_theta": self.rope_theta}
        out: dict[str, Any] = {
            "architectures": [names[self.architecture]],
            "model_type": self.architecture,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "dtype": "float32",
        }
        if self.architecture == "llama":
            out["attention_bias"] = self.qkv_bias
            out["mlp_bias"] = self.mlp_bias
        windows = {w for w in (self.sliding_windows or ()) if w is not None}
        if self.architecture in ("mistral", "mixtral"):
            out["sliding_window"] = next(iter(windows)) if windows else None
        if self.architecture == "mixtral":
            out["num_local_experts"] = self.num_experts
            out["num_experts_per_tok"] = self.experts_per_token
        if self.architecture == "qwen2_moe":
            out.update(num_experts=self.num_experts, num_experts_per_tok=self.experts_per_token,
                       moe_intermediate_size=self.routed_expert_size,
                       shared_expert_intermediate_size=self.shared_expert_size, norm_topk_prob=self.normalize_routing,
                       decoder_sparse_step=1, mlp_only_layers=list(self.dense_layers), qkv_bias=self.qkv_bias)
        if self.architecture in ("qwen2", "qwen2_moe"):
            out["use_sliding_window"] = bool(windows)
            out["sliding_window"] = next(iter(windows)) if windows else None
            out["layer_types"] = [
                "full_attention" if self.window(i) is None else "sliding_attention" for i in range(self.num_layers)
            ]
        return out


def _llama3_inv_freq(inv: np.ndarray, p: dict[str, Any]) -> np.ndarray:
    # Llama 3.1 frequency-dependent scaling: long wavelengths are divided by `factor`,
    # short ones kept, and the band between interpolated smoothly.
    factor = float(p["factor"])
    low, high = float(p["low_freq_factor"]), float(p["high_freq_factor"])
    old_len = float(p["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _get(hf: Any, name: str, default: Any = None) -> Any:
    return getattr(hf, name, default) if not isinstance(hf, dict) else hf.get(name, default)


def config_from_hf(hf: Any) -> ModelConfig:
    """Build a ``ModelConfig`` from a transformers config object or its ``to_dict()``.

    Raises:
        ValueError: unsupported ``model_type``, activation or RoPE type.
    """
    arch = _get(hf, "model_type")
    if arch not in SUPPORTED_ARCHITECTURES:
        archs = _get(hf, "architectures")
        raise ValueError(
            f"unsupported architecture: model_type={arch!r} (architectures={archs}); "
            f"jaxquant supports {SUPPORTED_ARCHITECTURES}"
        )
    act = _get(hf, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"hidden_act={act!r} is not supported (only silu/SwiGLU)")
    hidden = int(_get(hf, "hidden_size"))
    heads = int(_get(hf, "num_attention_heads"))
    head_dim = _get(hf, "head_dim") or hidden // heads
    rope = _get(hf, "rope_parameters") or _get(hf, "rope_scaling") or {}
    rope = dict(rope)
    theta = float(rope.pop("rope_theta", None) or _get(hf, "rope_theta", 10000.0) or 10000.0)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in _SUPPORTED_ROPE:
        raise ValueError(f"rope_type={kind!r} is not supported; jaxquant supports {_SUPPORTED_ROPE}")
    scaling = None if kind == "default" else {**{k: v for k, v in rope.items() if k != "type"}, "rope_type": kind}
    if _get(hf, "partial_rotary_factor", 1.0) not in (None, 1.0):
        raise ValueError("partial_rotary_factor != 1 is not supported")
    layers = int(_get(hf, "num_hidden_layers"))
    window = _get(hf, "sliding_window")
    windows: tuple[int | None, ...] | None = None
    if arch in ("mistral", "mixtral") and window:
        windows = (int(window),) * layers
    elif arch in ("qwen2", "qwen2_moe") and window and _get(hf, "use_sliding_window", False):
        types = _get(hf, "layer_types") or []
        if types:
            windows = tuple(int(window) if t == "sliding_attention" else None for t in types)
        elif arch == "qwen2":
            first = int(_get(hf, "max_window_layers", layers))
            windows = tuple(int(window) if i >= first else None for i in range(layers))
        else:  # Qwen2-MoE's own default: every other layer below max_window_layers
            last = int(_get(hf, "max_window_layers", layers))
            windows = tuple(int(window) if i % 2 == 0 and i < last else None for i in range(layers))
    if windows is not None and all(w is None for w in windows):
        windows = None
    bias = bool(_get(hf, "attention_bias", False))
    moe: dict[str, Any] = {}
    if arch == "mixtral":
        moe = {"num_experts": int(_get(hf, "num_local_experts", 0) or 0),
               "experts_per_token": int(_get(hf, "num_experts_per_tok", 0) or 0)}
    elif arch == "qwen2_moe":
        step = int(_get(hf, "decoder_sparse_step", 1) or 1)
        only = {int(i) for i in _get(hf, "mlp_only_layers", None) or ()}
        moe = {"num_experts": int(_get(hf, "num_experts")), "experts_per_token": int(_get(hf, "num_experts_per_tok")),
               "expert_size": int(_get(hf, "moe_intermediate_size")),
               "shared_expert_size": int(_get(hf, "shared_expert_intermediate_size", 0) or 0),
               "normalize_routing": bool(_get(hf, "norm_topk_prob", False)),
               "dense_layers": tuple(i for i in range(layers) if i in only or (i + 1) % step)}
    return ModelConfig(
        architecture=arch,
        vocab_size=int(_get(hf, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(_get(hf, "intermediate_size")),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(_get(hf, "num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(_get(hf, "max_position_embeddings", 2048)),
        tie_word_embeddings=bool(_get(hf, "tie_word_embeddings", False)),
        qkv_bias=True if arch == "qwen2" else bool(_get(hf, "qkv_bias", True)) if arch == "qwen2_moe" else bias,
        o_bias=bias if arch == "llama" else False,
        mlp_bias=bool(_get(hf, "mlp_bias", False)) if arch == "llama" else False,
        sliding_windows=windows,
        bos_token_id=_get(hf, "bos_token_id"),
        eos_token_id=_get(hf, "eos_token_id"),
        **moe,
    )


# Fields whose defaults ``AutoConfig`` would fill in when a config.json lacks them (and that
# ``config_from_hf`` reads). A file that has them all is read as it is, without importing
# transformers (several seconds of every command's start).
_COMPLETE = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "vocab_size", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings", "hidden_act")
_COMPLETE_SLIDING = ("sliding_window", "use_sliding_window", "max_window_layers")


def _complete(raw: dict[str, Any]) -> bool:
    """Whether ``config_from_hf(raw)`` needs none of ``AutoConfig``'s defaults."""
    specific = {"mistral": _COMPLETE_SLIDING[:1], "qwen2": _COMPLETE_SLIDING,
                "mixtral": (*_COMPLETE_SLIDING[:1], "num_local_experts", "num_experts_per_tok"),
                "qwen2_moe": (*_COMPLETE_SLIDING, "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                              "shared_expert_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
                              "mlp_only_layers", "qkv_bias")}.get(raw.get("model_type"), ())
    rope = "rope_parameters" in raw or "rope_theta" in raw
    return rope and all(k in raw for k in (*_COMPLETE, *specific))


def load_config(path: str | os.PathLike) -> ModelConfig:
    """Read ``config.json`` from a model directory: as it is when it spells out every field
    jaxquant reads, else through transformers' ``AutoConfig`` (which fills in defaults).

    Raises:
        FileNotFoundError: no ``config.json`` in ``path``.
        ValueError: the file is not valid JSON or names an unsupported architecture.
    """
    path = os.fspath(path)
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"no config.json in model directory {path!r}")
    try:
        with open(cfg_file, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file} is not valid JSON: {e}") from None
    if raw.get("model_type") not in SUPPORTED_ARCHITECTURES or _complete(raw):
        # Unknown types are refused here too: AutoConfig's own message is long and generic.
        return config_from_hf(raw)
    from transformers import AutoConfig  # noqa: PLC0415 - heavy import, needed only here

    hf = AutoConfig.from_pretrained(path, local_files_only=True)
    return config_from_hf(hf)
