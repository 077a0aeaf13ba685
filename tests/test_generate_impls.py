"""Quantized generation through every CPU implementation of ``ops.matmul``.

The issue's criterion: the quantized quickstart model generates the same greedy tokens
through every implementation. The model here has the quickstart ``FAST`` shapes and
random 2×8 g8 AQLM kernels (``random_quantized_state``); which implementation runs is
forced per model with ``use_matmul_impl`` and checked by counting, at trace time, the
calls each implementation receives.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxquant.models import LlamaForCausalLM, ModelConfig, abstract_model, generate
from jaxquant.models.random_quantized import (
    ImplLinear,
    random_additive,
    random_quantized_state,
    resident_bytes,
    use_matmul_impl,
)
from jaxquant.ops import cpu_ffi, dispatch
from jaxquant.qarray import AdditiveQuantized, dequantize, is_quantized
from jaxquant.quickstart import FAST

CPU_IMPLS = (["cpu_ffi"] if cpu_ffi.available() else []) + ["xla_lut", "xla_decode", "reference"]
PROMPT = np.array([72, 101, 108, 108, 111], np.int32)  # "Hello"
NEW_TOKENS = 11  # prompt + new = 16 = bucket: a 16-row prefill, then 1-row decode steps
BUCKET = 16


def _make() -> LlamaForCausalLM:
    return LlamaForCausalLM(FAST.model, rngs=nnx.Rngs(0))


@functools.cache
def _quantized_state() -> nnx.State:
    _, abstract = nnx.split(abstract_model(FAST.model))
    return random_quantized_state(abstract, 3)


def _model_with(impl: str | None, *, fallback: bool = False) -> LlamaForCausalLM:
    model = abstract_model(FAST.model)  # graph only: the weights come from `params`
    if impl is not None:
        use_matmul_impl(model, impl, fallback=fallback)
    return model


def _counting(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Wrap every implementation to count the calls it gets while tracing."""
    counts = {name: 0 for name in dispatch.IMPLEMENTATIONS}
    for name, fn in list(dispatch.IMPLEMENTATIONS.items()):

        def wrapped(x, w, _fn=fn, _name=name):  # noqa: ANN001, ANN202
            counts[_name] += 1
            return _fn(x, w)

        monkeypatch.setitem(dispatch.IMPLEMENTATIONS, name, wrapped)
    return counts


def _greedy_margins(params: nnx.State, tokens: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 logit at each generated position, teacher-forced, dense float32."""
    seq = np.concatenate([PROMPT, tokens[:-1]])[None]
    logits = np.asarray(nnx.merge(nnx.graphdef(_make()), params)(jnp.asarray(seq)))[0, len(PROMPT) - 1 :]
    top2 = np.sort(logits, axis=-1)[:, -2:]
    assert np.array_equal(np.argmax(logits, axis=-1), tokens), "teacher-forced argmax disagrees with generate"
    return top2[:, 1] - top2[:, 0]


def test_same_greedy_tokens_through_every_implementation(monkeypatch: pytest.MonkeyPatch) -> None:
    params = _quantized_state()
    n_quantized = sum(is_quantized(x) for x in jax.tree.leaves(params, is_leaf=is_quantized))
    assert n_quantized == 7 * FAST.model.num_layers

    counts = _counting(monkeypatch)
    generated = {}
    for impl in CPU_IMPLS:
        for name in counts:
            counts[name] = 0
        generated[impl] = generate(_model_with(impl), PROMPT, NEW_TOKENS, params=params, bucket=BUCKET)
        # Traced twice (prefill, decode step), each with every quantized kernel: all of
        # those calls, and only those, went to the forced implementation.
        assert counts[impl] == 2 * n_quantized, (impl, counts)
        assert sum(counts.values()) == counts[impl], (impl, counts)
    expected = generated["reference"]
    for impl, tokens in generated.items():
        np.testing.assert_array_equal(tokens, expected, err_msg=f"impl={impl}")
    # The dense model with the decoded weights takes the same greedy path (teacher-forced),
    # and no step is a near tie that float rounding could flip, so equality means something.
    margins = _greedy_margins(dequantize(params), expected)
    assert margins.min() > 1e-3, margins
    assert len(set(expected.tolist())) > 2, expected  # a real sequence, not one repeated token


def test_fallback_covers_calls_the_implementation_declines(monkeypatch: pytest.MonkeyPatch) -> None:
    params = _quantized_state()
    tokens = jnp.asarray(np.arange(40, dtype=np.int32)[None] * 3)  # 40 rows: above DECODE_BATCH_ROWS

    def logits(impl: str, fallback: bool) -> np.ndarray:
        graphdef = nnx.graphdef(_model_with(impl, fallback=fallback))
        return np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens))

    reference = logits("reference", fallback=False)
    # A forced lookup-table kernel runs on many rows: the row limit only steers automatic choice.
    np.testing.assert_allclose(logits("xla_lut", fallback=False), reference, rtol=1e-4, atol=1e-4)
    # An implementation that cannot run here (no GPU) declines; with fallback the
    # dispatcher's own order takes over and, at 40 rows, settles on the tile-wise decode.
    with pytest.raises(NotImplementedError, match="backend is not gpu"):
        logits("pallas_gpu", fallback=False)
    counts = _counting(monkeypatch)
    got = logits("pallas_gpu", fallback=True)
    n_quantized = 7 * FAST.model.num_layers
    assert counts["xla_decode"] == n_quantized and counts["reference"] == 0, counts
    assert counts["xla_lut"] == 0 and counts["cpu_ffi"] == 0, counts  # skipped: too many rows
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-4)


def test_use_matmul_impl_keeps_parameters_and_paths() -> None:
    model = _make()
    graphdef, before = nnx.split(model)
    kernel = model.layers[0].attn.q_proj.kernel
    n = use_matmul_impl(model, "xla_lut")
    assert n == 7 * FAST.model.num_layers + 1  # every linear layer, the dense head included
    assert isinstance(model.layers[1].mlp.down_proj, ImplLinear)
    assert model.layers[0].attn.q_proj.kernel is kernel  # same Variable, not a copy
    new_graphdef, after = nnx.split(model)
    assert jax.tree.structure(before) == jax.tree.structure(after)
    assert new_graphdef != graphdef
    # The dense model gives the same logits whichever implementation is named.
    tokens = jnp.asarray(PROMPT[None])
    np.testing.assert_array_equal(
        np.asarray(nnx.merge(new_graphdef, after)(tokens)), np.asarray(nnx.merge(graphdef, before)(tokens))
    )
    with pytest.raises(ValueError, match="impl='fastest'"):
        use_matmul_impl(model, "fastest")


@pytest.mark.parametrize(("m", "bits", "g"), [(2, 8, 8), (1, 16, 8), (1, 4, 4)])
def test_random_additive_shapes_and_statistics(m: int, bits: int, g: int) -> None:
    d_in, d_out = 256, 96
    w = random_additive(0, d_in, d_out, num_codebooks=m, codebook_bits=bits, group_size=g)
    assert isinstance(w, AdditiveQuantized)
    assert w.shape == (d_in, d_out) and w.layout == "in_out"
    assert w.codes.shape == (d_out, d_in // g, m) and w.codebooks.shape == (m, 2**bits, 1, g)
    assert w.codes.dtype == (jnp.uint8 if bits <= 8 else jnp.uint16)
    codes = np.asarray(w.codes).astype(np.int64)
    assert codes.max() < 2**bits and codes.max() >= 2**bits * 0.9  # covers the range
    dense = np.asarray(w.decode())
    assert dense.shape == (d_in, d_out) and np.all(np.isfinite(dense))
    assert abs(dense.std() / (1 / np.sqrt(d_in)) - 1) < 0.25  # 16 codewords of 4 values vary
    assert w.bits_per_weight == pytest.approx((m * bits * d_out * d_in / g + 32 * (m * 2**bits * g + d_out)) / (d_in * d_out))


def test_random_additive_rejects_bad_arguments() -> None:
    key = 0
    with pytest.raises(ValueError, match="d_in=100 is not divisible by group_size=8"):
        random_additive(key, 100, 64)
    with pytest.raises(ValueError, match="codebook_bits=17"):
        random_additive(key, 64, 64, codebook_bits=17)
    with pytest.raises(ValueError, match="d_out=0"):
        random_additive(key, 64, 0)
    with pytest.raises(ValueError, match="layout="):
        random_additive(key, 64, 64, layout="oi")


def test_random_state_of_a_7b_shaped_model_is_under_a_twelfth_of_float32() -> None:
    """Counted abstractly: nothing of the 7B-shaped model is allocated."""
    cfg = ModelConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
        num_kv_heads=32, head_dim=128, max_position_embeddings=4096,
    )
    _, abstract = nnx.split(abstract_model(cfg))
    dense_bytes = 4 * cfg.num_params()
    assert resident_bytes(abstract) == dense_bytes
    q_bf16 = random_quantized_state(abstract, 0, dense_dtype=jnp.bfloat16, abstract=True)
    q_f32 = random_quantized_state(abstract, 0, abstract=True)
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    n_matrices = 32 * 7
    codebooks = n_matrices * 2 * 256 * 8 * 4
    scales = 32 * 4 * (4 * 4096 + 2 * 11008 + 4096)
    norms = (2 * 32 + 1) * 4096
    matrices = cfg.num_params() - linear - norms  # embedding and head
    assert resident_bytes(q_f32) == linear // 4 + codebooks + scales + 4 * matrices + 4 * norms
    assert resident_bytes(q_bf16) == linear // 4 + codebooks + scales + 2 * matrices + 4 * norms
    # Embeddings and head in bfloat16 (as AQLM checkpoints keep them in 16 bits): ≤ 1/12.
    assert resident_bytes(q_bf16) * 12 <= dense_bytes
    assert resident_bytes(q_f32) * 12 > dense_bytes  # float32 embeddings + head alone cost 1 GB


def test_random_state_rejects_bad_kernels() -> None:
    state = {"proj": {"kernel": jax.ShapeDtypeStruct((100, 64), jnp.float32)}}
    with pytest.raises(ValueError, match="d_in=100 is not divisible by group_size=8 at proj/kernel"):
        random_quantized_state(state, 0)
    state3 = {"proj": {"kernel": jax.ShapeDtypeStruct((8, 8, 8), jnp.float32)}}
    with pytest.raises(ValueError, match="proj/kernel: selected leaf has shape"):
        random_quantized_state(state3, 0, where=lambda p, x: True)
