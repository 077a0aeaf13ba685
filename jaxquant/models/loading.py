"""Hugging Face checkpoints (``config.json`` + safetensors) to and from NNX models, without torch.

Names map through one table (``jaxquant.models.names``); linear weights, stored
``(d_out, d_in)`` by PyTorch, are transposed here, at this one boundary, into Flax
``(d_in, d_out)`` kernels.

The safetensors files themselves are read and written by ``jaxquant.io.safetensors``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.atomic_files import atomic_write
from jaxquant.io import gguf
from jaxquant.io.checkpoint import is_checkpoint
from jaxquant.io.hf_aqlm import is_hf_aqlm
from jaxquant.io.safetensors import INDEX_FILE, SINGLE_FILE, read_checkpoint_tensors, write_safetensors
from jaxquant.known_models import resolve_model
from jaxquant.models.config import ModelConfig, config_from_hf, load_config
from jaxquant.models.llama import LlamaForCausalLM, abstract_model
from jaxquant.models.names import hf_to_nnx_name, nnx_to_hf_name
from jaxquant.models.quantized_dirs import load_hf_aqlm, load_quantized_dir
from jaxquant.qarray import is_quantized

# Buffers some checkpoints carry that are recomputed here, never parameters.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias$|\.attn\.bias$)")


# ----------------------------------------------------------------------------- models


def _state_paths(state: nnx.State) -> dict[str, Any]:
    from jaxquant.select import flatten_with_paths  # noqa: PLC0415

    return dict(flatten_with_paths(state))


def state_from_tensors(
    model: LlamaForCausalLM, tensors: dict[str, np.ndarray], *, dtype: Any, source: str = "checkpoint"
) -> nnx.State:
    """Map Hugging Face tensors onto ``model``'s NNX state, checking names and shapes.

    Raises:
        ValueError: a tensor is unknown to the name table or the model (extra), a model
            parameter has no tensor (missing), or shapes disagree (names both).
    """
    state = nnx.state(model, nnx.Param)
    expected = _state_paths(state)
    arch = model.config.architecture
    mapped: dict[str, np.ndarray] = {}
    extra = []
    for name, arr in tensors.items():
        if _IGNORED.search(name):
            continue
        hit = hf_to_nnx_name(name, arch)
        if hit is None or hit[0] not in expected:
            if name == "lm_head.weight" and model.config.tie_word_embeddings:
                continue  # some tied checkpoints store the shared matrix twice
            extra.append(name)
            continue
        nnx_path, transpose = hit
        mapped[nnx_path] = arr.T if transpose else arr
    if extra:
        raise ValueError(f"{source} has tensors the {model.config.architecture} model does not use: {sorted(extra)[:8]}")
    missing = [(nnx_to_hf_name(p, arch) or (p,))[0] for p in expected if p not in mapped]
    if missing:
        raise ValueError(f"{source} is missing tensors: {missing[:8]}")
    for p, leaf in expected.items():
        if tuple(mapped[p].shape) != tuple(leaf.shape):
            hf_name, transpose = nnx_to_hf_name(p, arch)
            shape = mapped[p].shape[::-1] if transpose else mapped[p].shape
            want = tuple(leaf.shape)[::-1] if transpose else tuple(leaf.shape)
            raise ValueError(f"{source}: tensor {hf_name} has shape {tuple(shape)}, the config implies {want}")

    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    from jaxquant.select import path_to_str  # noqa: PLC0415

    leaves = [jnp.asarray(mapped[path_to_str(p)], dtype=dtype) for p, _ in flat]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def from_pretrained(
    path: str | os.PathLike, dtype: Any = jnp.float32, *, config: ModelConfig | None = None
) -> LlamaForCausalLM:
    """Load a Llama/Mistral/Qwen2 checkpoint directory into a ``LlamaForCausalLM``.

    Args:
        path: directory with ``config.json`` and ``model.safetensors`` (or shards with
            ``model.safetensors.index.json``), a ``.gguf`` file, or a known model name.
        dtype: parameter and compute dtype (``jnp.float32`` or ``jnp.bfloat16``).
        config: use this config instead of reading ``config.json``.

    Returns:
        The model with the checkpoint's weights.

    Quantized directories load too, with quantized kernels in place: a Hugging Face AQLM
    directory (``quantization_config.quant_method == "aqlm"``, e.g. from ``jaxquant
    export`` or a published AQLM model) and a ``jaxquant quantize`` output directory
    (``config.json`` beside a ``params/`` checkpoint). Those formats belong to
    ``jaxquant.io``, which is imported only when such a directory is met.

    A GGUF file (llama.cpp's format) loads too, its tensors dequantized to float32
    (``jaxquant.io.gguf``), and so does a name from ``jaxquant.known_models`` such as
    ``"smollm2-135m"``.

    Raises:
        FileNotFoundError: missing config or weights.
        ModuleNotFoundError: a known model name whose package is not installed.
        ValueError: unsupported architecture, corrupt file, missing/extra/mis-shaped tensor.
    """
    path = resolve_model(path)
    if os.path.isfile(path):
        return _load_gguf_model(path, dtype, config)
    if config is None:
        quantized = _load_quantized_model(path, dtype)
        if quantized is not None:
            return quantized
    config = load_config(path) if config is None else config
    # Build the module abstractly: random initialisation of a large model would cost
    # seconds and memory only to be overwritten.
    model = abstract_model(config, dtype)
    tensors = read_checkpoint_tensors(path)
    state = state_from_tensors(model, tensors, dtype=dtype, source=f"checkpoint {os.fspath(path)}")
    nnx.update(model, state)
    return model


def _load_gguf_model(path: str, dtype: Any, config: ModelConfig | None) -> LlamaForCausalLM:
    checkpoint = gguf.read_gguf(path)
    config = config_from_hf(checkpoint.hf_config) if config is None else config
    model = abstract_model(config, dtype)
    nnx.update(model, state_from_tensors(model, checkpoint.tensors, dtype=dtype, source=f"GGUF file {path}"))
    return model


def _load_quantized_model(path: str | os.PathLike, dtype: Any) -> LlamaForCausalLM | None:
    """The model of a quantized directory (HF AQLM or jaxquant run), or ``None`` for a dense one."""
    if is_hf_aqlm(path):
        return load_hf_aqlm(path, dtype)
    if not any(is_checkpoint(os.path.join(path, sub)) for sub in ("params", "checkpoint", "quantized")):
        return None
    config, params = load_quantized_dir(path)
    model = abstract_model(config, dtype)
    nnx.update(model, params)
    return model


def tensors_from_state(state: Any, config: ModelConfig) -> dict[str, np.ndarray]:
    """Hugging Face tensors (``(d_out, d_in)`` weights) from a dense NNX state or model."""
    if isinstance(state, nnx.Module):
        state = nnx.state(state, nnx.Param)
    out: dict[str, np.ndarray] = {}
    for p, leaf in _state_paths(state).items():
        if is_quantized(leaf):
            raise TypeError(
                f"save_pretrained writes dense checkpoints; {p} is quantized "
                "(dequantize it with jaxquant.dequantize, or use jaxquant.io for quantized formats)"
            )
        hit = nnx_to_hf_name(p, config.architecture)
        if hit is None:
            raise ValueError(f"parameter {p} has no Hugging Face name in the name table")
        name, transpose = hit
        arr = np.asarray(jax.device_get(leaf))
        out[name] = np.ascontiguousarray(arr.T if transpose else arr)
    return out


def save_pretrained(
    model: LlamaForCausalLM,
    path: str | os.PathLike,
    *,
    params: Any = None,
    max_shard_bytes: int | None = None,
    extra_files: dict[str, str] | None = None,
) -> None:
    """Write ``config.json`` and safetensors weights that transformers and ``from_pretrained`` read.

    Args:
        model: the model (its config, and its weights unless ``params`` is given).
        path: output directory (created if needed).
        params: an NNX state to save instead of the model's own.
        max_shard_bytes: split the weights into shards of at most about this many bytes,
            with ``model.safetensors.index.json``; ``None`` writes one file.
        extra_files: ``{file name: text}`` written beside the weights (e.g. tokenizer notes).
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tensors = tensors_from_state(model if params is None else params, model.config)
    cfg = model.config.to_hf_dict()
    cfg["dtype"] = jnp.dtype(next(iter(tensors.values())).dtype).name
    for stale in (SINGLE_FILE, INDEX_FILE):
        if os.path.exists(os.path.join(path, stale)):
            os.unlink(os.path.join(path, stale))
    if max_shard_bytes is None:
        write_safetensors(os.path.join(path, SINGLE_FILE), tensors)
    else:
        shards = _shard(tensors, max_shard_bytes)
        weight_map = {}
        for k, names in enumerate(shards):
            fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(os.path.join(path, fname), {n: tensors[n] for n in names})
            weight_map.update({n: fname for n in names})
        total = int(sum(a.nbytes for a in tensors.values()))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _write_text(os.path.join(path, INDEX_FILE), json.dumps(index, indent=2))
    _write_text(os.path.join(path, "config.json"), json.dumps(cfg, indent=2))
    for name, text in (extra_files or {}).items():
        _write_text(os.path.join(path, name), text)


def _shard(tensors: dict[str, np.ndarray], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def expected_hf_names(config: ModelConfig) -> Iterable[str]:
    """The Hugging Face tensor names a checkpoint of ``config`` holds."""
    model = abstract_model(config)
    return sorted(nnx_to_hf_name(p, config.architecture)[0] for p in _state_paths(nnx.state(model, nnx.Param)))
