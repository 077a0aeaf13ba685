"""A Hugging Face model directory on disk: config, safetensors (one file or shards with an
index), tokenizer files, written all at once or not at all.

Quantized formats (``hf_aqlm``, ``hf_vptq``) turn their arrays into named tensors and a
``quantization_config``; this module writes the directory they make up.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxquant.atomic_files import atomic_write_json, commit_dir, staging_dir
from jaxquant.io.safetensors import write_safetensors
from jaxquant.qarray import is_quantized

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files a Hugging Face model directory may carry beside its weights that travel with an
# export (tokenizers of every flavour, generation defaults, chat templates).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "jaxquant_tokenizer.json",  # jaxquant's byte-level tokenizer, for models trained by quickstart
)


def stored_floats(x: Any, dtype: Any, what: str) -> np.ndarray:
    """``x`` on the host as ``dtype``, the dtype a format stores it in.

    Raises:
        ValueError: finite values that do not fit ``dtype`` (names ``what``).
    """
    host = np.asarray(jax.device_get(x))
    with np.errstate(over="ignore"):  # overflow is detected and reported just below
        out = host.astype(dtype)
    if not np.all(np.isfinite(out)) and np.all(np.isfinite(host.astype(np.float32))):
        raise ValueError(f"{what} overflows {np.dtype(dtype).name} (max |value| "
                         f"{np.abs(host.astype(np.float32)).max():.4g})")
    return out


def split_layers(tensors: Mapping[str, Any], array_type: type, format_name: str
                 ) -> tuple[dict[str, Any], dict[str, np.ndarray], set[str]]:
    """Sort Hugging Face-named tensors for a format that stores ``array_type`` layers.

    Returns:
        ``(layers, dense, not_quantized)``: ``{module: array}`` for every ``<module>.weight``
        holding an ``array_type``; every other tensor as a host array, by name; and the
        modules of the dense 2-D ``*.weight`` tensors.

    Raises:
        ValueError: a quantized tensor not named ``<module>.weight``, or no ``array_type`` layer.
        TypeError: a quantized array of another type.
    """
    layers: dict[str, Any] = {}
    dense: dict[str, np.ndarray] = {}
    not_quantized: set[str] = set()
    for name, x in tensors.items():
        if isinstance(x, array_type):
            if not name.endswith(".weight"):
                raise ValueError(f"export: quantized tensor {name!r} must be a linear '<module>.weight'")
            layers[name[: -len(".weight")]] = x
        elif is_quantized(x):
            raise TypeError(f"export: {name} is a {type(x).__name__}; the Hugging Face {format_name} format holds "
                            f"only {array_type.__name__} layers (dequantize the others first)")
        else:
            dense[name] = np.asarray(jax.device_get(x))
            if dense[name].ndim == 2 and name.endswith(".weight"):
                not_quantized.add(name[: -len(".weight")])
    if not layers:
        raise ValueError(f"export: no {array_type.__name__} layer to export in the {format_name} format")
    return layers, dense, not_quantized


def _shards(tensors: Mapping[str, np.ndarray], max_bytes: int | None) -> list[list[str]]:
    names = sorted(tensors)
    if max_bytes is None:
        return [names]
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        if shards[-1] and size + tensors[n].nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += tensors[n].nbytes
    return shards


def write_model_dir(
    out_dir: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    config: Mapping[str, Any],
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    max_shard_bytes: int | None = None,
) -> str:
    """Write ``tensors`` and ``config`` as a Hugging Face model directory.

    The directory is built in a staging directory and renamed into place, so a reader
    never sees half of it.

    Args:
        out_dir: directory to create.
        tensors: ``{name: array}`` exactly as stored.
        config: the ``config.json`` dictionary.
        tokenizer_dir: copy the tokenizer files (``TOKENIZER_FILES``) found there.
        overwrite: replace an existing ``out_dir``.
        max_shard_bytes: split the weights into shards with an index; ``None`` = one file.

    Returns:
        The absolute output directory.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is false.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"export: {out_dir} already exists (pass overwrite=True to replace it)")
    staging = staging_dir(out_dir)
    if os.path.exists(staging):
        shutil.rmtree(staging)
    os.makedirs(staging)
    try:
        shards = _shards(tensors, max_shard_bytes)
        if len(shards) == 1:
            write_safetensors(os.path.join(staging, SINGLE_FILE), dict(tensors))
        else:
            weight_map = {}
            for k, names in enumerate(shards):
                fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(os.path.join(staging, fname), {n: tensors[n] for n in names})
                weight_map.update(dict.fromkeys(names, fname))
            total = int(sum(a.nbytes for a in tensors.values()))
            atomic_write_json(os.path.join(staging, INDEX_FILE), {"metadata": {"total_size": total},
                                                                  "weight_map": weight_map})
        if tokenizer_dir is not None:
            for fname in TOKENIZER_FILES:
                src = os.path.join(os.fspath(tokenizer_dir), fname)
                if os.path.isfile(src):
                    shutil.copyfile(src, os.path.join(staging, fname))
        # config.json last: it is what marks a Hugging Face model directory as complete.
        atomic_write_json(os.path.join(staging, CONFIG_FILE), dict(config))
        commit_dir(staging, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a model directory as a dict."""
    path = os.path.join(os.fspath(model_dir), CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_FILE} in model directory {os.fspath(model_dir)!r}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
