"""Orbax checkpoints of quantized trees: bit-identical round trips, NNX, sharding, damage."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

import jaxquant.io as jio
from jaxquant.io import checkpoint as ckpt
from jaxquant.qarray import AdditiveQuantized, ScalarQuantized, is_quantized

# orbax (0.12.8) closes its private asyncio loop while a thread may still schedule a
# callback on it; the resulting "Event loop is closed" surfaces at garbage collection
# in whichever test runs then. It is orbax-internal and harmless to the data written.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _aq(rng: np.random.Generator, d_out: int = 16, d_in: int = 32, m: int = 2, bits: int = 8, layout="in_out"):
    og, ig = 1, 8
    dt = np.uint8 if bits <= 8 else np.uint16
    return AdditiveQuantized(
        codes=jnp.asarray(rng.integers(0, 2**bits, (d_out // og, d_in // ig, m)), dt),
        codebooks=jnp.asarray(rng.standard_normal((m, 2**bits, og, ig)), jnp.float16),
        scales=jnp.asarray(rng.standard_normal((d_out // og, 1, 1, 1)), jnp.float16),
        codebook_bits=bits,
        shape=(d_in, d_out) if layout == "in_out" else (d_out, d_in),
        layout=layout,
    )


def _sq(rng: np.random.Generator, symmetric: bool):
    return ScalarQuantized(
        codes=jnp.asarray(rng.integers(0, 8, (8, 16)), jnp.uint8),
        scales=jnp.asarray(rng.random((8, 4)), jnp.bfloat16),
        zeros=None if symmetric else jnp.asarray(rng.integers(0, 8, (8, 4)), jnp.uint8),
        bits=3,
        group_size=4,
        shape=(8, 16),
        layout="out_in",
    )


def _assert_bit_identical(a, b, where="<root>"):
    """Same structure, leaf types, static fields, dtypes, shapes and bytes."""
    fa, ta = jax.tree_util.tree_flatten_with_path(a, is_leaf=is_quantized)
    fb, tb = jax.tree_util.tree_flatten_with_path(b, is_leaf=is_quantized)
    assert ta == tb, f"structure differs at {where}: {ta} vs {tb}"
    for (path, x), (_, y) in zip(fa, fb, strict=True):
        assert type(x) is type(y), (path, type(x), type(y))
        if is_quantized(x):
            for f in ("shape", "layout"):
                assert getattr(x, f) == getattr(y, f), (path, f)
            _assert_bit_identical(jax.tree.leaves(x), jax.tree.leaves(y), where=str(path))
            continue
        if isinstance(x, bool | int | float):
            assert x == y and type(x) is type(y), (path, x, y)
            continue
        xa, ya = np.asarray(x), np.asarray(y)
        assert xa.dtype == ya.dtype and xa.shape == ya.shape, (path, xa.dtype, ya.dtype, xa.shape, ya.shape)
        assert xa.tobytes() == ya.tobytes(), f"bytes differ at {path}"


def test_round_trip_mixed_tree_is_bit_identical(tmp_path, rng):
    tree = {
        "aq8": _aq(rng),
        "aq16": _aq(rng, m=1, bits=16, layout="out_in"),
        "sq_sym": _sq(rng, True),
        "sq_asym": _sq(rng, False),
        "dense": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32),
        "bf16": jnp.asarray(rng.standard_normal((4,)), jnp.bfloat16),
        "host64": rng.standard_normal((3, 2)),  # float64 stays float64 on the host
        "host_bf16": rng.standard_normal(3).astype(ml_dtypes.bfloat16),
        "misc": [1, 2.5, True, None, (np.float64(3.25), np.arange(4, dtype=np.int16))],
        "ints": {7: {"nested": {"empty": {}, "t": ()}}, 3: jnp.ones(2, jnp.int32)},
    }
    jio.save(tmp_path / "ck", tree)
    restored = jio.load(tmp_path / "ck")
    _assert_bit_identical(tree, restored)
    assert isinstance(restored["host64"], np.ndarray) and restored["host64"].dtype == np.float64
    assert isinstance(restored["dense"], jax.Array)
    assert restored["aq16"].codes.dtype == jnp.uint16 and restored["aq16"].codebook_bits == 16
    assert restored["sq_sym"].zeros is None
    assert isinstance(restored["misc"][4], tuple) and isinstance(restored["misc"][4][0], np.float64)
    np.testing.assert_array_equal(restored["aq8"].decode(), tree["aq8"].decode())


class _Tiny(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(32, 16, rngs=rngs) for _ in range(2)])
        self.norm = nnx.RMSNorm(16, rngs=rngs)
        self.steps = nnx.BatchStat(jnp.zeros((), jnp.int32))


def test_nnx_state_restores_as_state_and_updates_model(tmp_path, rng):
    model = _Tiny(nnx.Rngs(0))
    state = nnx.state(model)
    q = _aq(rng, d_out=16, d_in=32)  # replaces the (32, 16) Flax kernel, layout in_out
    state["layers"][1]["kernel"].set_value(q)
    jio.save(tmp_path / "nnx", state)
    restored = jio.load(tmp_path / "nnx")
    assert isinstance(restored, nnx.State)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    _assert_bit_identical(state, restored)
    assert type(restored["steps"]) is nnx.BatchStat
    assert type(restored["layers"][1]["kernel"]) is nnx.Param

    fresh = _Tiny(nnx.Rngs(1))
    nnx.update(fresh, restored)
    kernel = fresh.layers[1].kernel.get_value()
    assert isinstance(kernel, AdditiveQuantized)
    np.testing.assert_array_equal(np.asarray(kernel.codes), np.asarray(q.codes))
    np.testing.assert_array_equal(
        np.asarray(fresh.layers[0].kernel.get_value()), np.asarray(model.layers[0].kernel.get_value())
    )


def test_sharded_arrays_save_and_restore(tmp_path, rng):
    mesh = jax.make_mesh((4,), ("x",))
    rows = NamedSharding(mesh, P("x"))
    dense = jax.device_put(jnp.asarray(rng.standard_normal((8, 6)), jnp.float32), rows)
    q = _aq(rng, d_out=16, d_in=32, layout="out_in")
    q = AdditiveQuantized(
        codes=jax.device_put(q.codes, rows),  # output groups sharded, as beam search does
        codebooks=q.codebooks,
        scales=jax.device_put(q.scales, rows),
        codebook_bits=q.codebook_bits,
        shape=q.shape,
        layout=q.layout,
    )
    tree = {"w": dense, "q": q}
    jio.save(tmp_path / "sh", tree)

    default = jio.load(tmp_path / "sh")
    _assert_bit_identical(tree, default)
    assert isinstance(default["w"].sharding, SingleDeviceSharding)

    same = jio.load(tmp_path / "sh", shardings="saved")
    _assert_bit_identical(tree, same)
    assert same["w"].sharding.is_equivalent_to(rows, 2)
    assert same["q"].codes.sharding.is_equivalent_to(rows, 3)
    assert isinstance(same["q"].codebooks.sharding, SingleDeviceSharding)

    replicated = NamedSharding(mesh, P())
    given = jio.load(tmp_path / "sh", shardings=replicated)
    assert given["q"].codes.sharding == replicated
    _assert_bit_identical(tree, given)

    seen = []

    def pick(path, sds):
        seen.append((path, sds.shape))
        return rows if path == "q/codes" else None

    chosen = jio.load(tmp_path / "sh", shardings=pick)
    assert chosen["q"].codes.sharding == rows
    assert isinstance(chosen["w"].sharding, SingleDeviceSharding)
    assert ("q/codes", (16, 4, 2)) in seen and ("w", (8, 6)) in seen
    _assert_bit_identical(tree, chosen)


def test_save_refuses_to_clobber_and_overwrites_atomically(tmp_path, rng):
    path = tmp_path / "ck"
    jio.save(path, {"a": jnp.ones(3)})
    with pytest.raises(FileExistsError, match="already exists"):
        jio.save(path, {"a": jnp.zeros(3)})
    jio.save(path, {"b": jnp.full(2, 7.0)}, overwrite=True)
    assert set(jio.load(path)) == {"b"}
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no staging or trash left behind


def test_interrupted_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "ck"
    jio.save(path, {"a": jnp.arange(3.0)})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed before the manifest was committed")

    monkeypatch.setattr(ckpt, "_write_json_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        jio.save(path, {"a": jnp.zeros(3)}, overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        jio.save(tmp_path / "new", {"a": jnp.zeros(3)})
    monkeypatch.undo()
    np.testing.assert_array_equal(np.asarray(jio.load(path)["a"]), np.arange(3.0, dtype=np.float32))
    assert not (tmp_path / "new").exists() and not jio.is_checkpoint(tmp_path / "new")
    # The half-written staging directory is never mistaken for a checkpoint and the
    # next save of that path clears it.
    staging = tmp_path / ".new.jaxquant-partial"
    assert staging.is_dir() and not (staging / "manifest.json").exists()
    with pytest.raises(jio.CheckpointError, match="manifest.json is missing"):
        jio.load(staging)
    jio.save(tmp_path / "new", {"a": jnp.ones(3)})
    assert not staging.exists()


@pytest.fixture
def saved(tmp_path, rng):
    tree = {"layer": {"kernel": _aq(rng)}, "bias": jnp.arange(4.0)}
    path = tmp_path / "ck"
    jio.save(path, tree)
    return path, tree


def _edit_codes_record(path, **fields):
    """Overwrite fields of the manifest's record of ``layer/kernel``'s codes."""
    m = json.loads((path / "manifest.json").read_text())
    leaf = next(x for x in m["leaves"] if x["path"] == "layer/kernel")
    leaf["arrays"]["codes"].update(fields)
    (path / "manifest.json").write_text(json.dumps(m))


def test_missing_or_corrupt_manifest(saved, tmp_path):
    path, _ = saved
    with pytest.raises(jio.CheckpointError, match="no checkpoint directory"):
        jio.load(tmp_path / "nowhere")
    (path / "manifest.json").write_text('{"format": "jaxquant-checkpoint", "vers')
    with pytest.raises(jio.CheckpointError, match=r"manifest.json is corrupt"):
        jio.load(path)
    (path / "manifest.json").unlink()
    with pytest.raises(jio.CheckpointError, match=rf"{path}.*incomplete"):
        jio.load(path)


def test_manifest_disagreeing_with_arrays_names_the_leaf(saved):
    path, _ = saved

    _edit_codes_record(path, shape=[16, 2, 2])
    with pytest.raises(jio.CheckpointError, match=r"layer/kernel/codes is stored as uint8\[16, 4, 2\]"):
        jio.load(path)

    _edit_codes_record(path, shape=[16, 4, 2], dtype="uint16")
    with pytest.raises(jio.CheckpointError, match=r"layer/kernel/codes.*expects uint16"):
        jio.load(path)


def test_missing_array_files(saved):
    path, _ = saved
    import shutil

    shutil.rmtree(path / "arrays")
    with pytest.raises(jio.CheckpointError, match=rf"{path} has no arrays/"):
        jio.load(path)


def test_missing_array_data_is_detected(saved):
    path, _ = saved
    data_files = [
        os.path.join(d, f) for d, _, fs in os.walk(path / "arrays") for f in fs if os.sep + "d" in d
    ]
    assert data_files, "expected orbax data files under arrays/"
    for f in data_files:
        os.remove(f)
    with pytest.raises(jio.CheckpointError, match=rf"checkpoint at {path}"):
        jio.load(path)


def test_corrupted_bytes_fail_the_checksum(saved):
    path, tree = saved
    data_files = [os.path.join(d, f) for d, _, fs in os.walk(path / "arrays") for f in fs if os.sep + "d" in d]
    biggest = max(data_files, key=os.path.getsize)  # the float16 codebooks (8 KiB)
    raw = bytearray(open(biggest, "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    open(biggest, "wb").write(bytes(raw))
    with pytest.raises(jio.CheckpointError, match=rf"checkpoint at {path}: the bytes of layer/kernel/codebooks"):
        jio.load(path)


def test_checksum_is_checked_per_array(saved):
    path, tree = saved

    _edit_codes_record(path, sha256="0" * 64)
    with pytest.raises(jio.CheckpointError, match=r"layer/kernel/codes do not match their checksum"):
        jio.load(path)
    _assert_bit_identical(tree, jio.load(path, verify=False))


def test_unsupported_leaves_name_their_path(tmp_path):
    with pytest.raises(TypeError, match=r"str at a/b"):
        jio.save(tmp_path / "x", {"a": {"b": "text"}})
    with pytest.raises(TypeError, match=r"key \(1, 2\)"):
        jio.save(tmp_path / "y", {(1, 2): jnp.ones(1)})
    assert not (tmp_path / "x").exists() and not (tmp_path / ".x.jaxquant-partial").exists()


def test_zero_size_arrays_round_trip(tmp_path):
    """Orbax cannot write zero-size arrays (an SpQR layer without outliers has some): the
    manifest describes them and load rebuilds them."""
    tree = {"empty": jnp.zeros((0, 3), jnp.float16), "np": np.zeros((0,), np.int32), "full": jnp.arange(3.0)}
    back = jio.load(jio.save(tmp_path / "ck", tree))
    assert back["empty"].shape == (0, 3) and back["empty"].dtype == jnp.float16 and isinstance(back["empty"], jax.Array)
    assert back["np"].shape == (0,) and isinstance(back["np"], np.ndarray)
    np.testing.assert_array_equal(back["full"], tree["full"])
    only_empty = jio.load(jio.save(tmp_path / "ck2", {"e": jnp.zeros((0,))}))
    assert only_empty["e"].shape == (0,)


def _array_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path / "arrays") for f in fs)


def test_narrow_codes_are_stored_packed_and_earlier_checkpoints_load(tmp_path, rng, monkeypatch):
    from jaxquant.rotations import RotatedQuantized

    def sq(bits: int, d_out: int = 64, d_in: int = 512) -> ScalarQuantized:
        return ScalarQuantized(codes=jnp.asarray(rng.integers(0, 2**bits, (d_out, d_in)), jnp.uint8),
                               scales=jnp.asarray(rng.random((d_out, d_in // 64)), jnp.float16), zeros=None,
                               bits=bits, group_size=64, shape=(d_out, d_in), layout="out_in")

    rotated = RotatedQuantized(inner=sq(3), in_signs=jnp.ones(512, jnp.int8), out_signs=-jnp.ones(64, jnp.int8),
                               kind="hadamard", shape=(64, 512), layout="out_in")
    tree = {"two": sq(2), "rotated": rotated, "aq6": _aq(rng, d_out=64, d_in=512, bits=6), "aq8": _aq(rng)}
    back = jio.load(jio.save(tmp_path / "new", tree))
    _assert_bit_identical(tree, back)
    assert isinstance(back["two"].codes, jax.Array) and back["two"].codes.dtype == jnp.uint8
    manifest = json.loads((tmp_path / "new" / "manifest.json").read_text())
    assert manifest["version"] == 2
    packed = {leaf["path"]: {name: rec.get("packed_bits") for name, rec in leaf["arrays"].items() if rec}
              for leaf in manifest["leaves"]}
    assert packed["two"]["codes"] == 2 and packed["rotated"]["inner__codes"] == 3
    assert packed["aq6"]["codes"] == 6 and packed["aq8"]["codes"] is None  # a byte is its width
    assert packed["rotated"]["in_signs"] is None
    bad = dataclasses.replace(tree["two"], codes=tree["two"].codes.at[0, 3].set(4))
    with pytest.raises(ValueError, match=r"layer/codes: code 4 at flat index 3 does not fit 2 bits"):
        jio.save(tmp_path / "bad", {"layer": bad})
    # A checkpoint written before packing (version 1, codes a byte each) loads the same.
    monkeypatch.setattr(ckpt, "_packable", lambda x, bits: False)
    monkeypatch.setattr(ckpt, "VERSION", 1)
    jio.save(tmp_path / "old", tree)
    monkeypatch.undo()
    _assert_bit_identical(tree, jio.load(tmp_path / "old"))
    # Packing saves 6, 5 and 2 bits of every byte of 2-, 3- and 6-bit codes.
    saving = (64 * 512 * (6 + 5) + 64 * 64 * 2 * 2) // 8
    assert _array_bytes(tmp_path / "old") - _array_bytes(tmp_path / "new") >= 0.9 * saving
