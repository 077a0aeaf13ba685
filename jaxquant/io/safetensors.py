"""Safetensors files and Hugging Face model directories' tensors, read and written without torch.

A file is an 8-byte little-endian header length, a JSON header of ``{name: {dtype, shape,
data_offsets}}``, then raw little-endian bytes; it is parsed here directly, so bfloat16
needs no framework and a corrupt or truncated file is reported precisely.
``read_safetensors``/``write_safetensors`` handle one file (writes are atomic);
``read_checkpoint_tensors`` reads a model directory's ``model.safetensors`` or the shards
its index lists.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import ml_dtypes
import numpy as np

from jaxquant.atomic_files import atomic_write

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


__all__ = ["INDEX_FILE", "SINGLE_FILE", "read_checkpoint_tensors", "read_safetensors", "write_safetensors"]
