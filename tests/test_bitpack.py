"""Codes packed at their width: the bit stream against a bit-by-bit reference, and every
method's checkpoint holding about the bits it claims."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant import io as jio
from jaxquant.bitpack import pack_codes, packed_size, unpack_codes
from jaxquant.quantize import quantize_weight
from jaxquant.recipes_named import named_recipe

# orbax's private event loop may warn at garbage collection (see test_io_checkpoint.py).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _reference_stream(codes: np.ndarray, bits: int) -> np.ndarray:
    """Little-endian bit stream, one bit at a time: code j's bit k is stream bit bits*j + k."""
    stream = ((codes.reshape(-1)[:, None].astype(np.int64) >> np.arange(bits)) & 1).astype(np.uint8)
    return np.packbits(stream.reshape(-1), bitorder="little")


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [0, 13, 24_579])
def test_packed_codes_are_the_little_endian_bit_stream_and_round_trip(bits, count, rng):
    codes = rng.integers(0, 2**bits, size=count).astype(np.uint8)
    packed = pack_codes(codes, bits)
    reference = _reference_stream(codes, bits)
    assert packed.dtype == np.uint8 and packed.size == packed_size(count, bits) >= reference.size
    np.testing.assert_array_equal(packed[:reference.size], reference)
    assert not packed[reference.size:].any()  # the last group is padded with zeros
    np.testing.assert_array_equal(unpack_codes(packed, bits, (count,), np.uint8), codes)


def test_unpacking_restores_shape_and_dtype(rng):
    codes = rng.integers(0, 64, size=(6, 35)).astype(np.uint16)
    back = unpack_codes(pack_codes(codes, 6), 6, (6, 35), np.uint16)
    assert back.dtype == np.uint16 and back.shape == (6, 35)
    np.testing.assert_array_equal(back, codes)


def test_bad_packing_input_is_named():
    with pytest.raises(ValueError, match="bits must be an int in 1..8, got 9"):
        pack_codes(np.zeros(4, np.uint16), 9)
    with pytest.raises(ValueError, match="unsigned integers, got dtype int8"):
        pack_codes(np.zeros(4, np.int8), 2)
    with pytest.raises(ValueError, match="code 4 at flat index 2 does not fit 2 bits"):
        pack_codes(np.array([0, 3, 4], np.uint8), 2)
    with pytest.raises(ValueError, match=r"3 packed bytes cannot hold 16 codes of 2 bits of shape \(4, 4\) \(4 bytes\)"):
        unpack_codes(np.zeros(3, np.uint8), 2, (4, 4), np.uint8)


@pytest.mark.parametrize("name", ["rtn-2-g64", "rtn-3-g64", "spqr-3", "kashin-1-1"])
def test_a_checkpoint_holds_about_the_bits_a_method_claims(name, tmp_path, rng):
    w = jnp.asarray(rng.standard_normal((256, 1024)), jnp.float32)
    x = rng.standard_normal((2048, 1024)).astype(np.float32)
    q = quantize_weight(w, jnp.asarray(x.T @ x), named_recipe(name), jax.random.key(0))
    path = jio.save(tmp_path / "ck", {"w": q})
    stored = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(path, "arrays"))
                 for f in fs if os.sep + "d" in d)  # orbax's data files, not its metadata
    # Orbax adds about 2 KB of index per array.
    assert stored <= 1.05 * q.storage_bits / 8 + 20_000, (stored, q.storage_bits / 8)
    assert stored < q.resident_bytes  # codes a byte each in memory
    np.testing.assert_array_equal(np.asarray(jio.load(path)["w"].decode()), np.asarray(q.decode()))


def test_the_packing_benchmark_reports_both_sizes(tmp_path, rng, monkeypatch):
    import json

    from benchmark_scripts import load

    from jaxquant.io import checkpoint
    from jaxquant.qarray import ScalarQuantized

    q = ScalarQuantized(codes=jnp.asarray(rng.integers(0, 4, (256, 1024)), jnp.uint8),
                        scales=jnp.ones((256, 16), jnp.float16), zeros=None, bits=2, group_size=64,
                        shape=(256, 1024), layout="out_in")
    with monkeypatch.context() as m:  # a checkpoint as written before packing
        m.setattr(checkpoint, "_packable", lambda x, bits: False)
        m.setattr(checkpoint, "VERSION", 1)
        jio.save(tmp_path / "old", {"w": q})
    out = tmp_path / "sizes.json"
    assert load("checkpoint_packing").main(["--work", str(tmp_path / "work"), f"sq2={tmp_path / 'old'}",
                                            "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["source_version"] == 1 and row["version"] == 2 and row["bit_identical"]
    assert row["mb_after"] < 0.5 * row["mb_before"]
