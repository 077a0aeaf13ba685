"""The Hugging Face AQLM format's tensors and config, to and from quantized arrays.

Mapping them onto a model's parameters (loading a directory into a model, exporting a
model) is ``jaxquant.models.quantized_dirs``.

A Hugging Face AQLM model directory (what ``transformers`` loads through the ``aqlm``
package, and what published AQLM checkpoints look like) holds:

* ``config.json`` with ``quantization_config = {"quant_method": "aqlm",
  "nbits_per_codebook": B, "num_codebooks": M, "in_group_size": ig, "out_group_size":
  og, "linear_weights_not_to_quantize": [...]}`` — one configuration for every
  quantized layer;
* safetensors where each quantized linear module ``<m>`` has ``<m>.codes``
  ``[d_out/og, d_in/ig, M]`` (int8 for B ≤ 8, int16 for B ≤ 16), ``<m>.codebooks``
  ``[M, 2^B, og, ig]`` (float16) and ``<m>.scales`` ``[d_out/og, 1, 1, 1]`` (float16),
  plus ``<m>.bias`` if any; every other tensor is stored as usual;
* the tokenizer files.

Codes are unsigned code indices packed into signed integers exactly as the reference
does (``aqlm.utils.pack_int_data``): a value ``v ≥ 2^(B-1)`` is stored as ``v - 2^B``;
readers recover it as ``stored mod 2^B``. For B = 8 and 16 this is the two's-complement
reinterpretation of the unsigned bits.

``linear_weights_not_to_quantize``: older readers (transformers < 4.5x, the AQLM repo's
converter) compare ``<module>.weight`` strings; transformers 5.x matches entries
against *module* names, so a list holding only ``"lm_head.weight"`` makes it quantize
the head (NaN logits). Export therefore lists both ``"<module>"`` and
``"<module>.weight"`` for every unquantized 2-D weight; import accepts either form.

Layouts: ``AdditiveQuantized`` stores codes in ``(d_out, d_in)`` order whatever its
``layout``, which is the AQLM order, so codes, codebooks and scales cross this boundary
untouched; only dense linear weights are transposed between Flax ``(d_in, d_out)``
kernels and PyTorch ``(d_out, d_in)`` weights, by the models' name table.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.io.hf_model_dir import CONFIG_FILE, read_config, split_layers, stored_floats, write_model_dir
from jaxquant.io.safetensors import read_checkpoint_tensors
from jaxquant.qarray import AdditiveQuantized, code_dtype

QUANT_METHOD = "aqlm"
_PARTS = ("codes", "codebooks", "scales")


# ----------------------------------------------------------------------------- format


@dataclasses.dataclass(frozen=True)
class AqlmFormat:
    """The one AQLM configuration a Hugging Face AQLM checkpoint applies to all its layers."""

    nbits_per_codebook: int
    num_codebooks: int
    in_group_size: int
    out_group_size: int

    @classmethod
    def of(cls, q: AdditiveQuantized) -> AqlmFormat:
        return cls(q.codebook_bits, q.num_codebooks, q.in_group_size, q.out_group_size)

    @classmethod
    def from_config(cls, qc: Mapping[str, Any], source: str = "config") -> AqlmFormat:
        if qc.get("quant_method") != QUANT_METHOD:
            raise ValueError(f"{source}: quantization_config.quant_method={qc.get('quant_method')!r}, expected 'aqlm'")
        try:
            # transformers' AqlmConfig defaults, for configs that leave fields out.
            fmt = cls(
                int(qc.get("nbits_per_codebook", 16)),
                int(qc.get("num_codebooks", 1)),
                int(qc.get("in_group_size", 8)),
                int(qc.get("out_group_size", 1)),
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: malformed AQLM quantization_config {dict(qc)}: {e}") from None
        if not 1 <= fmt.nbits_per_codebook <= 16:
            raise ValueError(f"{source}: nbits_per_codebook={fmt.nbits_per_codebook} must be in 1..16")
        for name in ("num_codebooks", "in_group_size", "out_group_size"):
            if getattr(fmt, name) < 1:
                raise ValueError(f"{source}: {name}={getattr(fmt, name)} must be ≥ 1")
        return fmt


def stored_code_dtype(bits: int) -> np.dtype:
    """Signed integer dtype the reference stores ``bits``-bit codes in (int8 / int16)."""
    if not 1 <= bits <= 16:
        raise ValueError(f"codebook bits={bits} must be in 1..16 for the AQLM format")
    return np.dtype(np.int8 if bits <= 8 else np.int16)


def pack_codes(codes: Any, bits: int) -> np.ndarray:
    """Unsigned codes -> the reference's signed storage (``aqlm.utils.pack_int_data``).

    Raises:
        ValueError: a code is negative or ≥ ``2**bits``.
    """
    c = np.asarray(codes).astype(np.int64)
    if c.size and (c.min() < 0 or c.max() >= 2**bits):
        raise ValueError(f"codes range over [{c.min()}, {c.max()}], outside [0, {2**bits}) for bits={bits}")
    c = np.where(c >= 2 ** (bits - 1), c - 2**bits, c)
    return c.astype(stored_code_dtype(bits))


def unpack_codes(stored: Any, bits: int) -> np.ndarray:
    """The reference's signed storage -> unsigned codes in jaxquant's code dtype."""
    return (np.asarray(stored).astype(np.int64) % (2**bits)).astype(code_dtype(bits))


def layer_tensors(module: str, q: AdditiveQuantized, *, float_dtype: Any = np.float16) -> dict[str, np.ndarray]:
    """``{<module>.codes, <module>.codebooks, <module>.scales}`` for one quantized layer."""
    n_out, n_in, m = q.codes.shape
    if (n_out * q.out_group_size, n_in * q.in_group_size) != (q.d_out, q.d_in) or m != q.num_codebooks:
        raise ValueError(
            f"{module}: codes {tuple(q.codes.shape)} and codebooks {tuple(q.codebooks.shape)} do not tile "
            f"(d_out, d_in)=({q.d_out}, {q.d_in})"
        )
    codebooks = stored_floats(q.codebooks, float_dtype, f"{module}.codebooks")
    scales = stored_floats(q.scales, float_dtype, f"{module}.scales")
    return {
        f"{module}.codes": pack_codes(jax.device_get(q.codes), q.codebook_bits),
        f"{module}.codebooks": codebooks,
        f"{module}.scales": scales.reshape(n_out, 1, 1, 1),
    }


def additive_from_tensors(
    module: str,
    codes: np.ndarray,
    codebooks: np.ndarray,
    scales: np.ndarray,
    fmt: AqlmFormat,
    *,
    layout: str = "out_in",
) -> AdditiveQuantized:
    """Rebuild an ``AdditiveQuantized`` from one layer's stored tensors.

    Codebooks and scales keep their stored dtype (float16 in published checkpoints), so
    export -> import is bit-identical.

    Raises:
        ValueError: shapes disagree with each other or with ``fmt`` (names the module).
    """
    m, k, og, ig = fmt.num_codebooks, 2**fmt.nbits_per_codebook, fmt.out_group_size, fmt.in_group_size
    if codebooks.shape != (m, k, og, ig):
        raise ValueError(f"{module}.codebooks has shape {tuple(codebooks.shape)}, the config implies {(m, k, og, ig)}")
    if codes.ndim != 3 or codes.shape[2] != m:
        raise ValueError(f"{module}.codes has shape {tuple(codes.shape)}, expected [d_out/{og}, d_in/{ig}, {m}]")
    n_out, n_in, _ = codes.shape
    if scales.size != n_out:
        raise ValueError(f"{module}.scales has shape {tuple(scales.shape)}, expected [{n_out}, 1, 1, 1]")
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"{module}.codes has dtype {codes.dtype}, expected an integer type")
    d_out, d_in = n_out * og, n_in * ig
    return AdditiveQuantized(
        codes=jnp.asarray(unpack_codes(codes, fmt.nbits_per_codebook)),
        codebooks=jnp.asarray(codebooks),
        scales=jnp.asarray(scales.reshape(n_out, 1, 1, 1)),
        codebook_bits=fmt.nbits_per_codebook,
        shape=(d_out, d_in) if layout == "out_in" else (d_in, d_out),
        layout=layout,  # type: ignore[arg-type]
    )


def not_quantized_entries(modules: Iterable[str]) -> list[str]:
    """``linear_weights_not_to_quantize`` for old and new readers: each module and its weight."""
    out: set[str] = set()
    for m in modules:
        m = m[: -len(".weight")] if m.endswith(".weight") else m
        out.update((m, f"{m}.weight"))
    return sorted(out)


def modules_not_quantized(entries: Iterable[str] | None) -> set[str]:
    """Module names from a ``linear_weights_not_to_quantize`` list in either form."""
    return {e[: -len(".weight")] if e.endswith(".weight") else e for e in entries or ()}


def quantization_config(fmt: AqlmFormat, not_quantized: Iterable[str]) -> dict[str, Any]:
    """The ``quantization_config`` entry of ``config.json``."""
    return {
        "quant_method": QUANT_METHOD,
        "nbits_per_codebook": fmt.nbits_per_codebook,
        "num_codebooks": fmt.num_codebooks,
        "in_group_size": fmt.in_group_size,
        "out_group_size": fmt.out_group_size,
        "linear_weights_not_to_quantize": not_quantized_entries(not_quantized),
    }


# ----------------------------------------------------------------------------- files


def write_hf_aqlm(
    out_dir: str | os.PathLike,
    tensors: Mapping[str, Any],
    config: Mapping[str, Any],
    *,
    extra_not_quantized: Iterable[str] = (),
    tokenizer_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    max_shard_bytes: int | None = None,
) -> str:
    """Write a Hugging Face AQLM model directory from Hugging Face-named tensors.

    Args:
        out_dir: directory to create (written in a staging directory, then renamed).
        tensors: ``{hf weight name: array | AdditiveQuantized}``. Dense arrays are in
            PyTorch layout (``(d_out, d_in)`` for linear weights); a quantized entry
            named ``<module>.weight`` becomes ``<module>.codes/.codebooks/.scales``.
        config: the model's ``config.json`` dictionary (``quantization_config`` is set).
        extra_not_quantized: further modules to list as unquantized (e.g. a tied
            ``lm_head`` that has no tensor of its own).
        tokenizer_dir: copy the tokenizer files found there.
        overwrite: replace an existing ``out_dir``.
        max_shard_bytes: split the weights into shards with an index; ``None`` = one file.

    Returns:
        The absolute output directory.

    Raises:
        ValueError: no quantized layer, layers with different AQLM configurations
            (Hugging Face AQLM has one per model), or a quantized entry not named
            ``*.weight``.
        FileExistsError: ``out_dir`` exists and ``overwrite`` is false.
    """

    arrays, flat, not_quantized = split_layers(tensors, AdditiveQuantized, "AQLM")
    not_quantized |= set(extra_not_quantized)
    formats: dict[AqlmFormat, list[str]] = {}
    for module, q in arrays.items():
        formats.setdefault(AqlmFormat.of(q), []).append(module)
        flat.update(layer_tensors(module, q))
    if len(formats) > 1:
        detail = "; ".join(f"{f}: {mods[:3]}" for f, mods in formats.items())
        raise ValueError(f"export: the AQLM format has one configuration per model, found {len(formats)}: {detail}")
    (fmt,) = formats
    cfg = dict(config)
    cfg["quantization_config"] = quantization_config(fmt, not_quantized)

    return write_model_dir(out_dir, flat, cfg, tokenizer_dir=tokenizer_dir, overwrite=overwrite,
                           max_shard_bytes=max_shard_bytes)


def is_hf_aqlm(model_dir: str | os.PathLike) -> bool:
    """True when ``model_dir``'s ``config.json`` declares ``quant_method = "aqlm"``."""
    try:
        cfg = read_config(model_dir)
    except (FileNotFoundError, ValueError):
        return False
    qc = cfg.get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def read_hf_aqlm(model_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a Hugging Face AQLM directory into Hugging Face-named tensors.

    Returns:
        ``(config, tensors)``: the ``config.json`` dict and ``{hf weight name: array |
        AdditiveQuantized}``, where each quantized module ``<m>`` appears once as
        ``<m>.weight`` holding an ``AdditiveQuantized`` with ``layout="out_in"``.

    Raises:
        ValueError: not an AQLM config; a module with some but not all of codes,
            codebooks and scales; a module both quantized and listed as not quantized;
            shapes inconsistent with the config.
    """

    model_dir = os.fspath(model_dir)
    cfg = read_config(model_dir)
    qc = cfg.get("quantization_config")
    if not isinstance(qc, dict):
        raise ValueError(f"{model_dir}/{CONFIG_FILE} has no quantization_config: not an AQLM checkpoint")
    fmt = AqlmFormat.from_config(qc, source=f"{model_dir}/{CONFIG_FILE}")
    skip = modules_not_quantized(qc.get("linear_weights_not_to_quantize"))
    raw = read_checkpoint_tensors(model_dir)
    modules: dict[str, dict[str, np.ndarray]] = {}
    out: dict[str, Any] = {}
    for name, arr in raw.items():
        module, _, part = name.rpartition(".")
        if part in _PARTS:
            modules.setdefault(module, {})[part] = arr
        else:
            out[name] = arr
    for module, parts in sorted(modules.items()):
        missing = [p for p in _PARTS if p not in parts]
        if missing:
            raise ValueError(f"{model_dir}: quantized module {module} lacks {[f'{module}.{p}' for p in missing]}")
        if module in skip:
            raise ValueError(
                f"{model_dir}: {module} has AQLM codes but linear_weights_not_to_quantize lists it as unquantized"
            )
        if f"{module}.weight" in out:
            raise ValueError(f"{model_dir}: {module} has both a dense weight and AQLM codes")
        out[f"{module}.weight"] = additive_from_tensors(
            module, parts["codes"], parts["codebooks"], parts["scales"], fmt
        )
    return cfg, out
