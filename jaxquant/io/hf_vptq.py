"""The Hugging Face VPTQ format's tensors and config, from ``VPTQQuantized`` arrays.

A Hugging Face VPTQ model directory (what ``transformers`` builds through the ``vptq``
package's ``VQuantLinear``, and what published VPTQ checkpoints look like) holds:

* ``config.json`` with ``quantization_config = {"quant_method": "vptq",
  "config_for_layers": {<module>: {...}}, "shared_layer_config": {},
  "modules_to_not_convert": [...]}``: one entry per quantized linear module, with
  ``vector_lens``, ``num_centroids`` and ``num_res_centroids`` as ``[outlier, main]``
  pairs (``-1``: none), ``group_num``, ``group_size``, ``outlier_size``,
  ``in_features``, ``out_features``, ``enable_norm``, ``enable_perm``,
  ``indices_as_float`` and ``is_indice_packed`` (always true);
* safetensors where each quantized module ``<m>`` has
  ``<m>.centroids.weight`` ``[1, K·v]``, ``<m>.indices`` ``[1, d_out/v, words]`` (int32),
  ``<m>.res_centroids.weight`` ``[1, K_res·v]`` with a residual codebook,
  ``<m>.outlier_centroids.weight`` ``[1, K·v]`` and ``<m>.outlier_indices``
  ``[1, d_out/v, n_outliers]`` (int16, not packed) with outlier columns,
  ``<m>.perm`` ``[d_in]`` (int16) with ``enable_perm``, and ``<m>.weight_scale`` /
  ``<m>.weight_bias`` ``[d_in]`` with ``enable_norm``.

The format stores the columns permuted, outlier columns first: stored column ``k`` is
input column ``perm[k]``. Vectors are ``v`` consecutive output rows of one column, as in
``VPTQQuantized``. Main and residual codes of one vector are merged into one integer
(residual code above the main code's bits), and a row's merged codes are written as one
little-endian bit stream in 32-bit words, zero-padded at the end. The weight is
``decoded · weight_scale + weight_bias`` per input column: jaxquant's column scales, with
a zero bias.

The format has no residual codebook for outlier columns, and its reader masks residual
codes to the main code's width, so those two configurations are refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

from jaxquant.io.hf_model_dir import split_layers, stored_floats, write_model_dir
from jaxquant.methods.vptq.array import VPTQQuantized

QUANT_METHOD = "vptq"
_WORD_BITS = 32


def pack_indices(codes: np.ndarray, bits: int, residual_codes: np.ndarray | None = None,
                 residual_bits: int = 0) -> np.ndarray:
    """Codes ``[..., n]`` (and residual codes of the same shape) as the format's packed
    int32 words ``[..., ceil(n · (bits + residual_bits) / 32)]``.

    Raises:
        ValueError: a code outside ``[0, 2**bits)`` (or a residual code outside its
            range), or more than 32 bits per element.
    """
    total = bits + residual_bits
    if not 1 <= bits or total > _WORD_BITS:
        raise ValueError(f"bits={bits} + residual_bits={residual_bits} must be between 1 and {_WORD_BITS}")
    merged = _checked(codes, bits, "codes")
    if residual_bits:
        if residual_codes is None or np.shape(residual_codes) != np.shape(codes):
            raise ValueError(f"residual_codes must have the codes' shape {np.shape(codes)}")
        merged = merged | (_checked(residual_codes, residual_bits, "residual_codes") << np.uint64(bits))
    # Element i's bit b is bit i·total + b of the row's stream, least significant first.
    bits_of = np.unpackbits(merged.astype("<u4")[..., None].view(np.uint8), axis=-1, bitorder="little")
    stream = bits_of[..., :total].reshape(*merged.shape[:-1], -1)
    pad = -stream.shape[-1] % _WORD_BITS
    stream = np.concatenate([stream, np.zeros((*stream.shape[:-1], pad), np.uint8)], axis=-1)
    return np.packbits(stream, axis=-1, bitorder="little").view("<u4").astype(np.uint32).view(np.int32)


def unpack_indices(words: np.ndarray, n: int, bits: int, residual_bits: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """The inverse of ``pack_indices``: ``(codes, residual_codes or None)``, each ``[..., n]`` int64."""
    total = bits + residual_bits
    stream = np.unpackbits(np.ascontiguousarray(words).view("<u4").view(np.uint8), axis=-1, bitorder="little")
    if stream.shape[-1] < n * total:
        raise ValueError(f"{words.shape[-1]} words hold {stream.shape[-1]} bits, fewer than {n} x {total}")
    per_element = stream[..., : n * total].reshape(*stream.shape[:-1], n, total)
    per_element = np.concatenate([per_element, np.zeros((*per_element.shape[:-1], _WORD_BITS - total), np.uint8)], -1)
    merged = np.packbits(per_element, axis=-1, bitorder="little").view("<u4")[..., 0].astype(np.uint64)
    codes = (merged & np.uint64((1 << bits) - 1)).astype(np.int64)
    residual = (merged >> np.uint64(bits)).astype(np.int64) if residual_bits else None
    return codes, residual


def _checked(codes: Any, bits: int, what: str) -> np.ndarray:
    arr = np.asarray(codes).astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= 2**bits):
        raise ValueError(f"{what} must lie in [0, {2**bits}) for {bits}-bit codes, got [{arr.min()}, {arr.max()}]")
    return arr.astype(np.uint64)


def layer_tensors(module: str, q: VPTQQuantized, *, float_dtype: Any = np.float16
                  ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """One quantized layer's tensors and its ``config_for_layers`` entry.

    Raises:
        ValueError: outlier columns with a residual codebook, or residual codes wider than
            the main codes (neither has a place in the format); names the module.
    """
    d_out, d_in, v = q.d_out, q.d_in, q.vector_size
    has_residual = q.residual_codebook is not None
    outliers = np.zeros(0, np.int64) if q.outlier_columns is None else np.asarray(q.outlier_columns).astype(np.int64)
    if has_residual and outliers.size:
        raise ValueError(f"{module}: the VPTQ format has no residual codebook for outlier columns "
                         f"({outliers.size} outlier columns and a {q.residual_bits}-bit residual)")
    if has_residual and q.residual_bits > q.codebook_bits:
        raise ValueError(f"{module}: the VPTQ format reads residual codes at the main codes' width: "
                         f"residual_bits={q.residual_bits} > codebook_bits={q.codebook_bits}")
    is_outlier = np.zeros(d_in, bool)
    is_outlier[outliers] = True
    perm = np.concatenate([outliers, np.flatnonzero(~is_outlier)])
    main = perm[outliers.size:]
    codes = np.asarray(jax.device_get(q.codes)).astype(np.int64)  # [d_out / v, d_in]
    residual = np.asarray(jax.device_get(q.residual_codes)).astype(np.int64) if has_residual else None
    floats = lambda x, what: stored_floats(x, float_dtype, f"{module}.{what}")  # noqa: E731
    tensors = {
        f"{module}.centroids.weight": floats(q.codebook, "codebook").reshape(1, -1),
        f"{module}.indices": pack_indices(codes[:, main], q.codebook_bits,
                                          None if residual is None else residual[:, main],
                                          q.residual_bits if has_residual else 0)[None],
    }
    if has_residual:
        tensors[f"{module}.res_centroids.weight"] = floats(q.residual_codebook, "residual_codebook").reshape(1, -1)
    if outliers.size:
        tensors[f"{module}.outlier_centroids.weight"] = floats(q.outlier_codebook, "outlier_codebook").reshape(1, -1)
        tensors[f"{module}.outlier_indices"] = codes[:, outliers].astype(np.uint16).view(np.int16)[None]
        tensors[f"{module}.perm"] = perm.astype(np.uint16).view(np.int16)
    if q.column_scales is not None:
        tensors[f"{module}.weight_scale"] = floats(q.column_scales, "column_scales")
        tensors[f"{module}.weight_bias"] = np.zeros(d_in, float_dtype)
    k = 2**q.codebook_bits
    layer = {
        "vector_lens": [v if outliers.size else -1, v],
        "num_centroids": [k if outliers.size else -1, k],
        "num_res_centroids": [-1, 2**q.residual_bits if has_residual else -1],
        "group_num": 1,
        "group_size": int(d_in - outliers.size),
        "outlier_size": int(outliers.size),
        "in_features": int(d_in),
        "out_features": int(d_out),
        "enable_norm": q.column_scales is not None,
        "enable_perm": bool(outliers.size),
        "indices_as_float": False,
        "is_indice_packed": True,
    }
    return tensors, layer


def quantization_config(layers: Mapping[str, Mapping[str, Any]], not_quantized: Iterable[str]) -> dict[str, Any]:
    """The ``quantization_config`` entry of ``config.json``."""
    return {"quant_method": QUANT_METHOD, "enable_proxy_error": False, "config_for_layers": dict(sorted(layers.items())),
            "shared_layer_config": {}, "modules_to_not_convert": sorted(set(not_quantized))}


def write_hf_vptq(
    out_dir: Any,
    tensors: Mapping[str, Any],
    config: Mapping[str, Any],
    *,
    extra_not_quantized: Iterable[str] = (),
    tokenizer_dir: Any = None,
    overwrite: bool = False,
    max_shard_bytes: int | None = None,
) -> str:
    """Write a Hugging Face VPTQ model directory from Hugging Face-named tensors.

    Args:
        out_dir: directory to create (written in a staging directory, then renamed).
        tensors: ``{hf weight name: array | VPTQQuantized}``. Dense arrays are in PyTorch
            layout; a quantized entry named ``<module>.weight`` becomes the module's VPTQ
            tensors (module docstring).
        config: the model's ``config.json`` dictionary (``quantization_config`` is set).
        extra_not_quantized: further modules to leave dense (e.g. a tied ``lm_head``).
        tokenizer_dir, overwrite, max_shard_bytes: as ``hf_model_dir.write_model_dir``.

    Returns:
        The absolute output directory.

    Raises:
        ValueError: no ``VPTQQuantized`` layer, a quantized entry not named ``*.weight``,
            or a layer the format cannot hold (``layer_tensors``).
        TypeError: a quantized array of another type.
        FileExistsError: ``out_dir`` exists and ``overwrite`` is false.
    """
    arrays, flat, not_quantized = split_layers(tensors, VPTQQuantized, "VPTQ")
    layers: dict[str, dict[str, Any]] = {}
    for module, q in arrays.items():
        layer_flat, layers[module] = layer_tensors(module, q)
        flat.update(layer_flat)
    not_quantized |= set(extra_not_quantized)
    cfg = {**config, "quantization_config": quantization_config(layers, not_quantized)}
    return write_model_dir(out_dir, flat, cfg, tokenizer_dir=tokenizer_dir, overwrite=overwrite,
                           max_shard_bytes=max_shard_bytes)
