"""A GGUF file's metadata and tensor table, parsed in one pass over a memory map.

The ``gguf`` package's ``GGUFReader`` keeps a numpy view for every metadata item, which
makes a tokenizer of tens of thousands of strings slow to read. Here strings and arrays are
decoded straight from the bytes; tensor data stay views of the memory map, laid out as
``GGUFReader`` lays them out (typed arrays for the plain types, rows of bytes for
block-quantized ones), so ``gguf.quants.dequantize`` reads them unchanged.
``tests/test_gguf.py`` checks that both readers agree.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
# GGUF metadata value types (the format's numbering): struct codes of the scalars.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# Plain tensor types (GGML numbering) and their numpy dtypes; every other type is blocks of bytes.
_PLAIN_TENSOR_DTYPES = {0: "f4", 1: "f2", 24: "i1", 25: "i2", 26: "i4", 27: "i8", 28: "f8"}


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file.

    Attributes:
        name: llama.cpp's name (``blk.0.attn_q.weight``).
        tensor_type: the GGML storage type (``gguf.GGMLQuantizationType``).
        shape: dimensions as the file lists them, fastest-varying first.
        data: a read-only view of the file: the values in numpy order for plain types,
            ``[..., bytes per row]`` for block-quantized ones.
    """

    name: str
    tensor_type: Any
    shape: tuple[int, ...]
    data: np.ndarray


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    """A parsed GGUF file: its format version, metadata by key, and tensors in file order."""

    path: str
    version: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensor]


class _Cursor:
    """Sequential reads from a buffer in one byte order; running past the end is a ValueError."""

    def __init__(self, buf: memoryview, order: str) -> None:
        self.buf, self.order, self.pos = buf, order, 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise ValueError(f"it ends at byte {len(self.buf)}, inside a field that needs {n} bytes from byte {self.pos}")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, code: str) -> Any:
        fmt = self.order + code
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return str(self.take(self.scalar("Q")), "utf-8")

    def value(self, value_type: int) -> Any:
        if value_type in _SCALARS:
            return self.scalar(_SCALARS[value_type])
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type, count = self.scalar("I"), self.scalar("Q")
            if item_type in _SCALARS and item_type != 7:
                dtype = np.dtype(self.order + _SCALARS[item_type])
                return np.frombuffer(self.take(count * dtype.itemsize), dtype).tolist()
            # Strings, booleans and nested arrays (flattened, as gguf's reader gives them).
            items = [self.value(item_type) for _ in range(count)]
            return [x for item in items for x in item] if item_type == _ARRAY else items
        raise ValueError(f"unknown metadata value type {value_type} at byte {self.pos - 4}")


def read_gguf_file(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file's metadata and tensor table; tensor data are mapped, not read.

    Raises:
        ValueError: not a GGUF file, an unsupported version, or a truncated or corrupt
            file (the message names the file and what is wrong).
        ImportError: the ``gguf`` package (for the tensor type table) is missing.
    """
    try:
        import gguf  # noqa: PLC0415 - only GGUF files need it
    except ImportError:
        raise ImportError("reading GGUF files needs the 'gguf' package: pip install gguf") from None
    path = os.fspath(path)
    mapped = np.memmap(path, mode="r") if os.path.getsize(path) else np.zeros(0, np.uint8)
    if bytes(mapped[:4]) != GGUF_MAGIC:
        raise ValueError(f"{path!r} is not a GGUF file (it does not start with the bytes 'GGUF')")
    try:
        return _parse(path, mapped, gguf)
    except (ValueError, struct.error, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt GGUF file {path!r}: {e}") from None


def _parse(path: str, mapped: np.ndarray, gguf: Any) -> GGUFFile:
    buf = memoryview(mapped)
    version_le = struct.unpack_from("<I", buf, 4)[0] if len(buf) >= 8 else 0
    # A file written on a big-endian machine reads as a version with zero low bytes.
    order = ">" if version_le & 0xFFFF == 0 else "<"
    cur = _Cursor(buf, order)
    cur.take(4)
    version = cur.scalar("I")
    if version not in _SUPPORTED_VERSIONS:
        raise ValueError(f"GGUF version {version} (this reader knows {_SUPPORTED_VERSIONS})")
    n_tensors, n_fields = cur.scalar("Q"), cur.scalar("Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_fields):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = tuple(cur.scalar("Q") for _ in range(cur.scalar("I")))
        infos.append((name, dims, cur.scalar("I"), cur.scalar("Q")))
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not (isinstance(alignment, int) and alignment > 0 and alignment & (alignment - 1) == 0):
        raise ValueError(f"general.alignment={alignment!r} is not a power of two")
    data_start = -(-cur.pos // alignment) * alignment
    tensors, seen = [], set()
    for name, dims, type_id, offset in infos:
        if name in seen:
            raise ValueError(f"tensor {name!r} appears twice")
        seen.add(name)
        try:
            tensor_type = gguf.GGMLQuantizationType(type_id)
        except ValueError:
            raise ValueError(f"tensor {name!r} has the unknown storage type {type_id}") from None
        block, block_bytes = gguf.GGML_QUANT_SIZES[tensor_type]
        n = int(np.prod(dims, dtype=np.int64))
        numpy_shape = tuple(reversed(dims))
        if type_id in _PLAIN_TENSOR_DTYPES:
            dtype, count = np.dtype(order + _PLAIN_TENSOR_DTYPES[type_id]), n
        else:
            if not dims or dims[0] % block:
                raise ValueError(f"tensor {name!r} of type {tensor_type.name} has rows of {dims[:1]} values, "
                                 f"not a multiple of its block of {block}")
            dtype, count = np.dtype(np.uint8), n // block * block_bytes
            numpy_shape = (*numpy_shape[:-1], dims[0] // block * block_bytes)
        start = data_start + offset
        if start + count * dtype.itemsize > len(mapped):
            raise ValueError(f"tensor {name!r} runs past the end of the file ({len(mapped)} bytes)")
        data = np.frombuffer(buf, dtype, count, start).reshape(numpy_shape)
        tensors.append(GGUFTensor(name=name, tensor_type=tensor_type, shape=dims, data=data))
    return GGUFFile(path=path, version=version, metadata=metadata, tensors=tensors)


__all__ = ["GGUFFile", "GGUFTensor", "read_gguf_file"]
