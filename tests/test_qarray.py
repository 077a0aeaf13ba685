"""Quantized array types: decode against numpy, honest bits, split/merge, pytree behaviour."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxquant as jq
from reference_decode import additive_decode_np
from jaxquant.qarray import AdditiveQuantized, ScalarQuantized, code_dtype, decode_additive


# --- builders: random codes (never all zeros), random continuous parts ---------------


def _scalar(rng, d_out, d_in, bits, group, *, symmetric, layout="out_in", dtype=np.float16):
    codes = rng.integers(1, 2**bits, size=(d_out, d_in)) if bits > 1 else rng.integers(0, 2, size=(d_out, d_in))
    n_groups = d_in // group
    scales = rng.uniform(0.1, 2.0, size=(d_out, n_groups)).astype(dtype)
    zeros = None if symmetric else rng.integers(0, 2**bits, size=(d_out, n_groups)).astype(dtype)
    shape = (d_out, d_in) if layout == "out_in" else (d_in, d_out)
    q = ScalarQuantized(
        codes=jnp.asarray(codes.astype(code_dtype(bits))),
        scales=jnp.asarray(scales),
        zeros=None if zeros is None else jnp.asarray(zeros),
        bits=bits,
        group_size=group,
        shape=shape,
        layout=layout,
    )
    return q, codes, scales, zeros


def _np_scalar_decode(codes, scales, zeros, bits, group):
    """Element by element: W[o, i] = (codes[o, i] - zero[o, i // g]) * scale[o, i // g]."""
    d_out, d_in = codes.shape
    w = np.empty((d_out, d_in), np.float64)
    for o in range(d_out):
        for i in range(d_in):
            z = (2**bits - 1) / 2 if zeros is None else float(zeros[o, i // group])
            w[o, i] = (codes[o, i] - z) * float(scales[o, i // group])
    return w


def _additive(rng, d_out, d_in, m, b, og, ig, *, layout="out_in", dtype=np.float16):
    codes = rng.integers(1, 2**b, size=(d_out // og, d_in // ig, m))
    codebooks = rng.standard_normal((m, 2**b, og, ig)).astype(dtype)
    scales = rng.uniform(0.5, 1.5, size=(d_out // og, 1, 1, 1)).astype(dtype)
    shape = (d_out, d_in) if layout == "out_in" else (d_in, d_out)
    q = AdditiveQuantized(
        codes=jnp.asarray(codes.astype(code_dtype(b))),
        codebooks=jnp.asarray(codebooks),
        scales=jnp.asarray(scales),
        codebook_bits=b,
        shape=shape,
        layout=layout,
    )
    return q, codes, codebooks, scales


# --- decode round trips ------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_scalar_decode_matches_numpy(rng, symmetric, layout, bits):
    q, codes, scales, zeros = _scalar(rng, 6, 16, bits, 4, symmetric=symmetric, layout=layout)
    ref = _np_scalar_decode(codes, scales, zeros, bits, 4)
    np.testing.assert_allclose(np.asarray(q.decode_out_in()), ref, rtol=1e-6, atol=1e-6)
    out = np.asarray(q.decode())
    assert out.shape == q.shape
    np.testing.assert_allclose(out, ref if layout == "out_in" else ref.T, rtol=1e-6, atol=1e-6)
    assert q.decode(jnp.bfloat16).dtype == jnp.bfloat16
    assert (q.d_out, q.d_in) == (6, 16)


def test_symmetric_grid_is_centred(rng):
    q, *_ = _scalar(rng, 1, 4, 2, 4, symmetric=True)
    q = ScalarQuantized(jnp.asarray([[0, 1, 2, 3]], jnp.uint8), jnp.ones((1, 1), jnp.float32), None, 2, 4, (1, 4))
    np.testing.assert_array_equal(np.asarray(q.decode()), [[-1.5, -0.5, 0.5, 1.5]])


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("m,b,og,ig", [(2, 8, 1, 8), (1, 4, 2, 4), (3, 3, 1, 2)])
def test_additive_decode_matches_numpy(rng, layout, m, b, og, ig):
    q, codes, codebooks, scales = _additive(rng, 8, 16, m, b, og, ig, layout=layout)
    ref = additive_decode_np(codes, codebooks, scales)
    np.testing.assert_allclose(np.asarray(q.decode_out_in()), ref, rtol=1e-5, atol=1e-5)
    out = np.asarray(q.decode())
    np.testing.assert_allclose(out, ref if layout == "out_in" else ref.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(decode_additive(q.codes, q.codebooks, q.scales)), ref, rtol=1e-5, atol=1e-5)
    assert (q.num_codebooks, q.codebook_bits, q.out_group_size, q.in_group_size) == (m, b, og, ig)


# --- bits accounting ---------------------------------------------------------------


def test_bits_scalar_hand_counted(rng):
    # 2-bit g128 asym, fp16 scale + zero on 256x512: 2 + (16 + 16) / 128 = 2.25
    q, *_ = _scalar(rng, 256, 512, 2, 128, symmetric=False)
    assert q.bits_per_weight == pytest.approx(2.25)
    assert q.storage_bits == 256 * 512 * 2 + 2 * 256 * 4 * 16
    # symmetric: no zero point stored -> 2 + 16/128
    qs, *_ = _scalar(rng, 256, 512, 2, 128, symmetric=True)
    assert qs.bits_per_weight == pytest.approx(2.125)
    # 4-bit per-channel (one group per row), float32 scales: 4 + 2*32/512
    qc, *_ = _scalar(rng, 8, 512, 4, 512, symmetric=False, dtype=np.float32)
    assert qc.bits_per_weight == pytest.approx(4 + 64 / 512)
    # memory now: codes unpacked at one byte each
    assert q.resident_bytes == 256 * 512 + 2 * 256 * 4 * 2


def test_bits_additive_hand_counted(rng):
    # AQLM 2x8 g8 on 512x512, fp16 codebooks and scales
    q, *_ = _additive(rng, 512, 512, 2, 8, 1, 8)
    expected = 2 + 2 * 256 * 8 * 16 / (512 * 512) + 512 * 16 / (512 * 512)
    assert q.bits_per_weight == pytest.approx(expected)
    assert expected == pytest.approx(2.28125)
    # 1x16 g8 (uint16 codes count 16 bits each): 16/8 + 65536*8*16/512^2 + 1/32
    q16, *_ = _additive(rng, 512, 512, 1, 16, 1, 8)
    assert q16.codes.dtype == jnp.uint16
    assert q16.bits_per_weight == pytest.approx(2 + 65536 * 8 * 16 / 512**2 + 512 * 16 / 512**2)
    # layout does not change the count
    qt, *_ = _additive(rng, 512, 512, 2, 8, 1, 8, layout="in_out")
    assert qt.bits_per_weight == pytest.approx(expected)


def test_tree_bits_counts_everything(rng):
    q, *_ = _scalar(rng, 256, 512, 2, 128, symmetric=False)
    tree = {"layer": {"kernel": q, "bias": jnp.zeros((256,), jnp.float32)}}
    tb = jq.tree_bits(tree)
    assert tb["quantized_weights"] == 256 * 512
    assert tb["bits_per_weight"] == pytest.approx(2.25)
    assert tb["other_params"] == 256 and tb["other_bits"] == 256 * 32
    assert tb["total_bytes"] == (256 * 512 * 2.25 + 256 * 32) / 8


# --- split / merge and optax ------------------------------------------------------


def test_split_merge_round_trip_and_adam(rng):
    qs, *_ = _scalar(rng, 8, 16, 3, 8, symmetric=False, dtype=np.float32)
    qa, *_ = _additive(rng, 8, 16, 2, 4, 1, 4, dtype=np.float32)
    tree = {"a": qs, "b": {"kernel": qa, "bias": jnp.ones((8,), jnp.float32)}}
    cont, disc = jq.split(tree)
    # No integer leaf reaches optax; no float leaf is in the discrete part.
    assert all(jnp.issubdtype(x.dtype, jnp.floating) for x in jax.tree.leaves(cont))
    assert all(jnp.issubdtype(x.dtype, jnp.integer) for x in jax.tree.leaves(disc))
    assert len(jax.tree.leaves(cont)) + len(jax.tree.leaves(disc)) == len(jax.tree.leaves(tree))
    chex.assert_trees_all_equal(jq.merge(cont, disc), tree)

    opt = optax.adam(1e-2)
    state = opt.init(cont)
    grads = jax.tree.map(jnp.ones_like, cont)
    # optax's bias correction computes float ** int32-count, which strict promotion rejects.
    with jax.numpy_dtype_promotion("standard"):
        updates, state = jax.jit(opt.update)(grads, state, cont)
    new = jq.merge(optax.apply_updates(cont, updates), disc)
    # Continuous parts moved by exactly -lr (first Adam step with unit gradients), codes kept.
    np.testing.assert_allclose(np.asarray(new["b"]["kernel"].codebooks), np.asarray(qa.codebooks) - 1e-2, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new["a"].scales), np.asarray(qs.scales) - 1e-2, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(new["a"].codes), np.asarray(qs.codes))
    assert new["b"]["kernel"].codes.dtype == jnp.uint8


# --- dequantize on nested trees ---------------------------------------------------


def test_dequantize_dict_tree(rng):
    q, codes, scales, zeros = _scalar(rng, 6, 16, 4, 8, symmetric=False, layout="in_out")
    bias = jnp.arange(6, dtype=jnp.float32)
    out = jq.dequantize({"params": {"dense": {"kernel": q, "bias": bias}}, "step": 3})
    np.testing.assert_allclose(np.asarray(out["params"]["dense"]["kernel"]), _np_scalar_decode(codes, scales, zeros, 4, 8).T, rtol=1e-6)
    assert out["params"]["dense"]["bias"] is bias and out["step"] == 3
    assert jq.dequantize({"k": q}, jnp.bfloat16)["k"].dtype == jnp.bfloat16


def test_dequantize_nnx_state(rng):
    model = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
    state = nnx.state(model)
    qa, codes, codebooks, scales = _additive(rng, 8, 16, 2, 4, 1, 4, layout="in_out", dtype=np.float32)
    state["kernel"].set_value(qa)
    dense = jq.dequantize(state)
    kernel = dense["kernel"].get_value()
    assert kernel.shape == (16, 8)
    np.testing.assert_allclose(np.asarray(kernel), additive_decode_np(codes, codebooks, scales).T, rtol=1e-5, atol=1e-5)
    nnx.update(model, dense)
    x = jnp.ones((2, 16), jnp.float32)
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(x @ kernel), rtol=1e-5, atol=1e-5)


# --- repr, pytree behaviour ------------------------------------------------------


def test_repr_is_one_line_with_scheme_shape_bits(rng):
    q, *_ = _scalar(rng, 256, 512, 2, 128, symmetric=False, layout="in_out")
    r = repr(q)
    assert "\n" not in r and "int2 asym g128" in r and "(512, 256)" in r and "2.250 bits" in r
    qa, *_ = _additive(rng, 512, 512, 2, 8, 1, 8)
    ra = repr(qa)
    assert "\n" not in ra and "aqlm 2x8 g8" in ra and "(512, 512)" in ra and "2.281 bits" in ra
    assert len(ra) < 200


@pytest.mark.parametrize("kind", ["scalar", "additive"])
def test_pytree_flatten_unflatten_under_jit(rng, kind):
    if kind == "scalar":
        q, *_ = _scalar(rng, 8, 16, 3, 8, symmetric=False, layout="in_out", dtype=np.float32)
    else:
        q, *_ = _additive(rng, 8, 16, 2, 4, 2, 4, layout="in_out", dtype=np.float32)
    chex.clear_trace_counter()  # the parametrized cases share one function body
    leaves, treedef = jax.tree.flatten(q)
    assert len(leaves) == 3  # arrays only; metadata is static
    chex.assert_trees_all_equal(jax.tree.unflatten(treedef, leaves), q)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def scaled_decode(q, s):
        # Decoding is linear in the scales of both types.
        q2 = dataclasses.replace(q, scales=q.scales * s)
        return q2, q2.decode()

    for s in (1.0, 2.0, 3.0):
        q2, w = scaled_decode(q, jnp.float32(s))
        assert type(q2) is type(q) and q2.layout == q.layout and q2.shape == q.shape
        np.testing.assert_allclose(np.asarray(w), s * np.asarray(q.decode()), rtol=1e-5, atol=1e-5)


# --- hypothesis over shapes and configs -------------------------------------------

# One compiled decode per drawn shape instead of many small eager ops.
_jit_decode = jax.jit(lambda q: q.decode())


@settings(max_examples=12, deadline=None)
@given(
    n_out=st.integers(1, 4),
    n_groups=st.integers(1, 4),
    group=st.sampled_from([1, 2, 4, 8]),
    bits=st.integers(1, 8),
    symmetric=st.booleans(),
    layout=st.sampled_from(["out_in", "in_out"]),
    seed=st.integers(0, 2**16),
)
def test_scalar_hypothesis(n_out, n_groups, group, bits, symmetric, layout, seed):
    rng = np.random.default_rng(seed)
    d_out, d_in = 2 * n_out, n_groups * group
    q, codes, scales, zeros = _scalar(rng, d_out, d_in, bits, group, symmetric=symmetric, layout=layout)
    ref = _np_scalar_decode(codes, scales, zeros, bits, group)
    np.testing.assert_allclose(np.asarray(_jit_decode(q)), ref if layout == "out_in" else ref.T, rtol=1e-5, atol=1e-5)
    param_bits = 16 * (1 if symmetric else 2) / group
    assert q.bits_per_weight == pytest.approx(bits + param_bits)


@settings(max_examples=12, deadline=None)
@given(
    m=st.integers(1, 3),
    b=st.integers(1, 6),
    og=st.sampled_from([1, 2]),
    ig=st.sampled_from([1, 2, 4]),
    n_o=st.integers(1, 3),
    n_i=st.integers(1, 3),
    layout=st.sampled_from(["out_in", "in_out"]),
    seed=st.integers(0, 2**16),
)
def test_additive_hypothesis(m, b, og, ig, n_o, n_i, layout, seed):
    rng = np.random.default_rng(seed)
    d_out, d_in = n_o * og, n_i * ig
    if b == 1:
        b = 2  # codes drawn from [1, 2**b): keep more than one non-zero choice
    q, codes, codebooks, scales = _additive(rng, d_out, d_in, m, b, og, ig, layout=layout)
    ref = additive_decode_np(codes, codebooks, scales)
    np.testing.assert_allclose(np.asarray(_jit_decode(q)), ref if layout == "out_in" else ref.T, rtol=1e-4, atol=1e-4)
    expected = (n_o * n_i * m * b + m * 2**b * og * ig * 16 + n_o * 16) / (d_out * d_in)
    assert q.bits_per_weight == pytest.approx(expected)


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_check_shapes_accepts_real_arrays_and_names_a_wrong_field(rng, layout):
    sq = _scalar(rng, 6, 16, 3, 8, symmetric=False, layout=layout)[0]
    aq = _additive(rng, 8, 12, 2, 3, 2, 4, layout=layout)[0]
    sq.check_shapes()
    aq.check_shapes()
    with pytest.raises(ValueError, match=r"ScalarQuantized.zeros has shape \(6, 1\), expected \(6, 2\)"):
        dataclasses.replace(sq, zeros=sq.zeros[:, :1]).check_shapes()
    with pytest.raises(ValueError, match=r"AdditiveQuantized.codes has shape"):
        dataclasses.replace(aq, codes=aq.codes[:, :1]).check_shapes()
    # A checkpoint whose static fields disagree with its arrays is refused on load.
    import json  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        jq.io.save(f"{tmp}/c", {"w": sq})
        manifest = json.loads(open(f"{tmp}/c/manifest.json").read())
        manifest["leaves"][0]["static"]["group_size"] = 4
        open(f"{tmp}/c/manifest.json", "w").write(json.dumps(manifest))
        with pytest.raises(ValueError, match="inconsistent: ScalarQuantized.scales has shape"):
            jq.io.load(f"{tmp}/c")
