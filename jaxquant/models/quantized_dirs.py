"""Quantized models on disk, assembled into models: Hugging Face AQLM directories and
``jaxquant quantize``/``finetune`` output directories, and the export to the Hugging Face
AQLM and VPTQ formats.

``jaxquant.io.hf_aqlm`` converts the format's tensors to and from quantized arrays; this
module maps them onto the Llama model's parameters.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.io.checkpoint import is_checkpoint, load
from jaxquant.io.hf_aqlm import read_hf_aqlm, write_hf_aqlm
from jaxquant.io.hf_vptq import write_hf_vptq
from jaxquant.models.config import load_config
from jaxquant.models.llama import abstract_model
from jaxquant.models.names import hf_to_nnx_name, nnx_to_hf_name
from jaxquant.qarray import AdditiveQuantized, is_quantized, path_to_str
from jaxquant.select import flatten_with_paths


def _nnx_params(model_or_state: Any) -> dict[str, Any]:

    state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
    return dict(flatten_with_paths(state))


def hf_tensors_from_state(state: Any, architecture: str | None = None) -> dict[str, Any]:
    """Hugging Face-named tensors from an NNX model or state with quantized kernels, expert
    tensors named as ``architecture`` names them (``jaxquant.models.nnx_to_hf_name``).

    Dense linear kernels are transposed to PyTorch ``(d_out, d_in)``; quantized
    kernels are passed through (their codes are already in ``(d_out, d_in)`` order).
    """

    out: dict[str, Any] = {}
    for path, leaf in _nnx_params(state).items():
        hit = nnx_to_hf_name(path, architecture)
        if hit is None:
            raise ValueError(f"export: parameter {path} has no Hugging Face name in the models' name table")
        name, transpose = hit
        if is_quantized(leaf):
            out[name] = leaf
        else:
            arr = np.asarray(jax.device_get(leaf))
            out[name] = np.ascontiguousarray(arr.T) if transpose else arr
    return out


def _export(writer: Any, what: str, model_or_state: Any, out_dir: str | os.PathLike, *, config: Any,
            tokenizer_dir: str | os.PathLike | None, overwrite: bool, max_shard_bytes: int | None) -> str:
    """Hugging Face-named tensors and config of a model, written by a format's ``writer``."""
    if config is None:
        config = getattr(model_or_state, "config", None)
        if config is None:
            raise ValueError(f"{what}: pass config= (a ModelConfig or config.json dict) with a bare state")
    cfg = dict(config) if isinstance(config, Mapping) else config.to_hf_dict()
    tensors = hf_tensors_from_state(model_or_state, cfg.get("model_type"))
    dense = [np.asarray(t).dtype for t in tensors.values() if not is_quantized(t)]
    if dense and not isinstance(config, Mapping):
        cfg["dtype"] = np.dtype(dense[0]).name  # what transformers' dtype="auto" then uses
    extra = []
    if cfg.get("tie_word_embeddings") and "lm_head.weight" not in tensors:
        extra.append("lm_head")  # the tied head is a Linear in transformers: keep it dense
    return writer(out_dir, tensors, cfg, extra_not_quantized=extra, tokenizer_dir=tokenizer_dir,
                  overwrite=overwrite, max_shard_bytes=max_shard_bytes)


def export_hf_aqlm(
    model_or_state: Any,
    out_dir: str | os.PathLike,
    *,
    config: Any = None,
    tokenizer_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    max_shard_bytes: int | None = None,
) -> str:
    """Export a jaxquant model with ``AdditiveQuantized`` kernels as a Hugging Face AQLM directory.

    Args:
        model_or_state: a ``jaxquant.models.LlamaForCausalLM`` or its NNX state (``Param``
            variables) in which the layers to ship quantized hold ``AdditiveQuantized``
            arrays, all with one configuration.
        out_dir: output directory.
        config: ``ModelConfig`` (or a ``config.json`` dict); taken from the model when
            omitted. Required with a bare state.
        tokenizer_dir: directory whose tokenizer files are copied.
        overwrite: replace an existing ``out_dir``.
        max_shard_bytes: shard the weights above this size (with an index file).

    Returns:
        The absolute output directory.
    """
    return _export(write_hf_aqlm, "export_hf_aqlm", model_or_state, out_dir, config=config,
                   tokenizer_dir=tokenizer_dir, overwrite=overwrite, max_shard_bytes=max_shard_bytes)


def export_hf_vptq(
    model_or_state: Any,
    out_dir: str | os.PathLike,
    *,
    config: Any = None,
    tokenizer_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    max_shard_bytes: int | None = None,
) -> str:
    """Export a jaxquant model with ``VPTQQuantized`` kernels as a Hugging Face VPTQ directory
    (``jaxquant.io.hf_vptq``); arguments as ``export_hf_aqlm``. Each layer keeps its own
    VPTQ configuration."""
    return _export(write_hf_vptq, "export_hf_vptq", model_or_state, out_dir, config=config,
                   tokenizer_dir=tokenizer_dir, overwrite=overwrite, max_shard_bytes=max_shard_bytes)


def load_hf_aqlm(model_dir: str | os.PathLike, dtype: Any = jnp.float32) -> Any:
    """Load a Hugging Face AQLM directory into a ``jaxquant.models.LlamaForCausalLM``.

    Quantized modules become ``AdditiveQuantized`` kernels (``layout="in_out"``, the Flax
    kernel convention of the model; codes, codebooks and scales exactly as stored);
    every other tensor is loaded as ``from_pretrained`` would (cast to ``dtype``).

    Raises:
        ValueError: unsupported architecture, a tensor the model does not have, a
            missing tensor, or a shape disagreeing with the config (names the tensor).
    """

    model_dir = os.fspath(model_dir)
    config = load_config(model_dir)
    _, tensors = read_hf_aqlm(model_dir)
    model = abstract_model(config, dtype)
    state = nnx.state(model, nnx.Param)
    expected = _nnx_params(state)
    mapped: dict[str, Any] = {}
    extra = []
    for name, x in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        hit = hf_to_nnx_name(name, config.architecture)
        if hit is None or hit[0] not in expected:
            extra.append(name)
            continue
        path, transpose = hit
        want = tuple(expected[path].shape)
        if isinstance(x, AdditiveQuantized):
            if not transpose:
                raise ValueError(f"{model_dir}: {name} is quantized but is not a linear weight")
            x = dataclasses.replace(x, shape=(x.d_in, x.d_out), layout="in_out")
            got = x.shape
        else:
            x = x.T if transpose else x
            got = tuple(x.shape)
        if got != want:
            shown = (got[::-1], want[::-1]) if transpose else (got, want)
            raise ValueError(f"{model_dir}: tensor {name} has shape {shown[0]}, the config implies {shown[1]}")
        mapped[path] = x
    if extra:
        raise ValueError(f"{model_dir} has tensors the {config.architecture} model does not use: {sorted(extra)[:8]}")
    missing = [nnx_to_hf_name(p, config.architecture)[0] for p in expected if p not in mapped]
    if missing:
        raise ValueError(f"{model_dir} is missing tensors: {missing[:8]}")
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    leaves = []
    for p, _ in flat:
        x = mapped[path_to_str(p)]
        leaves.append(x if is_quantized(x) else jnp.asarray(x, dtype=dtype))
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, leaves))
    return model


_CHECKPOINT_CANDIDATES = ("params", "checkpoint", "quantized", ".")


def load_quantized_dir(quant_dir: str | os.PathLike) -> tuple[Any, Any]:
    """Read a jaxquant quantized-model directory: ``(ModelConfig, params state)``.

    The directory holds the model's Hugging Face ``config.json`` (and tokenizer files)
    and a ``jaxquant.io.save`` checkpoint of the model's NNX ``Param`` state, in
    ``params/`` (or ``checkpoint/``, ``quantized/``, or the directory itself).
    """

    quant_dir = os.fspath(quant_dir)
    config = load_config(quant_dir)
    for sub in _CHECKPOINT_CANDIDATES:
        path = os.path.normpath(os.path.join(quant_dir, sub))
        if is_checkpoint(path):
            return config, load(path)
    raise FileNotFoundError(
        f"no jaxquant checkpoint in {quant_dir!r} (looked in {', '.join(_CHECKPOINT_CANDIDATES)})"
    )


__all__ = ["export_hf_aqlm", "hf_tensors_from_state", "load_hf_aqlm", "load_quantized_dir"]
