"""Hugging Face checkpoints (``config.json`` + safetensors) to and from NNX models, without torch.

Names map through one table, ``NAME_TABLE``: each row pairs a Hugging Face tensor name
pattern with the NNX parameter path and says whether the tensor is a linear weight,
stored ``(d_out, d_in)`` by PyTorch and transposed here, at this one boundary, into a
Flax ``(d_in, d_out)`` kernel.

safetensors files are parsed here directly (an 8-byte little-endian header length, a
JSON header of ``{name: {dtype, shape, data_offsets}}``, then raw little-endian bytes),
so bfloat16 needs no framework and a corrupt or truncated file is reported precisely.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from jaxquant.atomic_files import atomic_write
from jaxquant.known_models import resolve_model
from jaxquant.models.config import ModelConfig, config_from_hf, load_config
from jaxquant.models.llama import LlamaForCausalLM
from jaxquant.qarray import is_quantized

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

# Buffers some checkpoints carry that are recomputed here, never parameters.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias$|\.attn\.bias$)")

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


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


# ----------------------------------------------------------------------------- safetensors


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read every tensor of a ``.safetensors`` file into numpy arrays.

    Raises:
        ValueError: the file is truncated or its header is corrupt (names the file and
            what is wrong).
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"corrupt safetensors file {path}: {size} bytes, too short for a header")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise ValueError(f"corrupt safetensors file {path}: header length {n} exceeds the file size {size}")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"corrupt safetensors file {path}: header is not valid JSON ({e})") from None
        data = f.read()
    if not isinstance(header, dict):
        raise ValueError(f"corrupt safetensors file {path}: header is not a JSON object")
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"corrupt safetensors file {path}: bad header entry for {name!r}: {info!r}") from None
        expected = int(np.prod(shape)) * dtype.itemsize
        if end - begin != expected or begin < 0:
            raise ValueError(
                f"corrupt safetensors file {path}: {name!r} of shape {shape} {info['dtype']} needs "
                f"{expected} bytes, header gives {end - begin}"
            )
        if end > len(data):
            raise ValueError(
                f"truncated safetensors file {path}: {name!r} ends at byte {end} of the data section "
                f"but only {len(data)} bytes are present"
            )
        out[name] = np.frombuffer(data, dtype=dtype, count=int(np.prod(shape)), offset=begin).reshape(shape)
    return out


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to a ``.safetensors`` file atomically (temp file + rename)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if arr.dtype not in _DTYPE_NAMES:
            raise TypeError(f"tensor {name!r} has dtype {arr.dtype}, which safetensors cannot store here")
        header[name] = {"dtype": _DTYPE_NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the format aligns the data section to 8 bytes

    def write(f: Any) -> None:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())

    atomic_write(os.fspath(path), write)


def read_checkpoint_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a model directory: ``model.safetensors`` or shards listed in the index.

    Raises:
        FileNotFoundError: neither file exists, or a shard named by the index is missing.
        ValueError: a file is corrupt, or a shard lacks a tensor its index promises.
    """
    path = os.fspath(path)
    index = os.path.join(path, INDEX_FILE)
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"corrupt index {index}: {e}") from None
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(path, shard)
            if not os.path.isfile(shard_path):
                raise FileNotFoundError(f"shard {shard} listed in {INDEX_FILE} is missing from {path}")
            tensors.update(read_safetensors(shard_path))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ValueError(f"tensors {missing[:5]} listed in {INDEX_FILE} are in none of the shards")
        return tensors
    if os.path.isfile(single):
        return read_safetensors(single)
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in model directory {path!r}")


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
    mapped: dict[str, np.ndarray] = {}
    extra = []
    for name, arr in tensors.items():
        if _IGNORED.search(name):
            continue
        hit = hf_to_nnx_name(name)
        if hit is None or hit[0] not in expected:
            if name == "lm_head.weight" and model.config.tie_word_embeddings:
                continue  # some tied checkpoints store the shared matrix twice
            extra.append(name)
            continue
        nnx_path, transpose = hit
        mapped[nnx_path] = arr.T if transpose else arr
    if extra:
        raise ValueError(f"{source} has tensors the {model.config.architecture} model does not use: {sorted(extra)[:8]}")
    missing = [nnx_to_hf_name(p)[0] if nnx_to_hf_name(p) else p for p in expected if p not in mapped]
    if missing:
        raise ValueError(f"{source} is missing tensors: {missing[:8]}")
    for p, leaf in expected.items():
        if tuple(mapped[p].shape) != tuple(leaf.shape):
            hf_name = nnx_to_hf_name(p)[0]
            shape = mapped[p].shape[::-1] if nnx_to_hf_name(p)[1] else mapped[p].shape
            want = tuple(leaf.shape)[::-1] if nnx_to_hf_name(p)[1] else tuple(leaf.shape)
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
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(0)))
    tensors = read_checkpoint_tensors(path)
    state = state_from_tensors(model, tensors, dtype=dtype, source=f"checkpoint {os.fspath(path)}")
    nnx.update(model, state)
    return model


def _load_gguf_model(path: str, dtype: Any, config: ModelConfig | None) -> LlamaForCausalLM:
    from jaxquant.io import gguf  # noqa: PLC0415 - io sits above models; lazy by design

    checkpoint = gguf.read_gguf(path)
    config = config_from_hf(checkpoint.hf_config) if config is None else config
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(0)))
    nnx.update(model, state_from_tensors(model, checkpoint.tensors, dtype=dtype, source=f"GGUF file {path}"))
    return model


def _load_quantized_model(path: str | os.PathLike, dtype: Any) -> LlamaForCausalLM | None:
    """The model of a quantized directory (HF AQLM or jaxquant run), or ``None`` for a dense one."""
    from jaxquant.io import checkpoint, hf_aqlm  # noqa: PLC0415 - io sits above models; lazy by design

    if hf_aqlm.is_hf_aqlm(path):
        return hf_aqlm.load_hf_aqlm(path, dtype)
    if not any(checkpoint.is_checkpoint(os.path.join(path, sub)) for sub in ("params", "checkpoint", "quantized")):
        return None
    config, params = hf_aqlm.load_quantized_dir(path)
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(0)))
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
        hit = nnx_to_hf_name(p)
        if hit is None:
            raise ValueError(f"parameter {p} has no Hugging Face name in the name table")
        name, transpose = hit
        arr = np.asarray(jax.device_get(leaf))
        out[name] = np.ascontiguousarray(arr.T if transpose else arr)
    del config
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
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    return sorted(nnx_to_hf_name(p)[0] for p in _state_paths(nnx.state(model, nnx.Param)))
