"""Integer codes packed at their bit width, for storage (checkpoints, the expert store).

In memory a 2- or 3-bit code takes a whole byte, so that kernels index it directly. On
disk that would make a "2-bit" checkpoint as large as an 8-bit one. ``pack_codes`` writes
``bits`` bits per code into a little-endian bit stream: code ``j``'s bit ``k`` is bit
``(bits · j + k) mod 8`` of byte ``(bits · j + k) // 8``, the last byte padded with zeros.
It works on groups of ``8 / gcd(8, bits)`` codes, a whole number of bytes, one code or
byte position of the group at a time over every group (strided columns of ``uint16``),
so no temporary is larger than a column.
"""

from __future__ import annotations

import math

import numpy as np

def _group(bits: int) -> tuple[int, int]:
    """``(codes, bytes)`` of one packed group."""
    codes = 8 // math.gcd(8, bits)
    return codes, bits * codes // 8


def _check_bits(bits: int) -> None:
    # A code then spans at most two bytes of the stream.
    if not (isinstance(bits, int) and 1 <= bits <= 8):
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits pack into (whole groups)."""
    _check_bits(bits)
    codes, nbytes = _group(bits)
    return -(-count // codes) * nbytes


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer codes, each in ``0 .. 2**bits - 1``, into a 1-D ``uint8`` array.

    Args:
        codes: an unsigned integer array of any shape (read in C order).
        bits: bits per code, 1..8.

    Returns:
        ``packed_size(codes.size, bits)`` bytes.

    Raises:
        ValueError: ``bits`` out of range, ``codes`` not unsigned integers, or a code
            that does not fit ``bits`` bits (its position and value are named).
    """
    _check_bits(bits)
    codes = np.asarray(codes)
    if codes.dtype.kind != "u":
        raise ValueError(f"codes must be unsigned integers, got dtype {codes.dtype}")
    flat = codes.reshape(-1)
    if flat.size and int(flat.max()) >= 1 << bits:
        at = int(np.argmax(flat >= 1 << bits))
        raise ValueError(f"code {int(flat[at])} at flat index {at} does not fit {bits} bits")
    per, nbytes = _group(bits)
    groups = -(-flat.size // per)
    padded = np.zeros(groups * per, np.uint8)
    padded[:flat.size] = flat
    columns = padded.reshape(groups, per)
    out = np.zeros((groups, nbytes), np.uint8)
    word = np.empty(groups, np.uint16)
    for j in range(per):
        first, offset = divmod(bits * j, 8)
        np.left_shift(columns[:, j], offset, out=word, dtype=np.uint16)
        out[:, first] |= (word & 0xFF).astype(np.uint8)
        if offset + bits > 8:  # the code's high bits go into the next byte
            out[:, first + 1] |= (word >> 8).astype(np.uint8)
    return out.reshape(-1)


def unpack_codes(packed: np.ndarray, bits: int, shape: tuple[int, ...], dtype: np.dtype | str) -> np.ndarray:
    """Inverse of ``pack_codes``: codes of ``shape`` and ``dtype`` from the packed bytes.

    Raises:
        ValueError: ``bits`` out of range, or ``packed`` has the wrong length for
            ``shape`` (both named).
    """
    _check_bits(bits)
    packed = np.asarray(packed, np.uint8).reshape(-1)
    count = math.prod(shape)
    if packed.size != packed_size(count, bits):
        raise ValueError(f"{packed.size} packed bytes cannot hold {count} codes of {bits} bits of shape {shape} "
                         f"({packed_size(count, bits)} bytes)")
    per, nbytes = _group(bits)
    rows = packed.reshape(-1, nbytes)
    out = np.empty((rows.shape[0], per), dtype)
    mask = (1 << bits) - 1
    for j in range(per):
        first, offset = divmod(bits * j, 8)
        if offset + bits <= 8:
            np.bitwise_and(np.right_shift(rows[:, first], offset), mask, out=out[:, j], casting="unsafe")
        else:
            word = rows[:, first].astype(np.uint16) | (rows[:, first + 1].astype(np.uint16) << 8)
            np.bitwise_and(word >> offset, mask, out=out[:, j], casting="unsafe")
    return out.reshape(-1)[:count].reshape(shape)


__all__ = ["pack_codes", "packed_size", "unpack_codes"]
