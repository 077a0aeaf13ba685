"""The tree transform: structure, layouts, statistics lookup, keys, and bad input."""

from __future__ import annotations

import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant.quantize import leaf_key, leaf_layout
from jaxquant.select import flatten_with_paths
from jaxquant.stats import LayerStats

KEY = jax.random.key(0)


class _MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(10, 32, rngs=rngs)
        self.up = nnx.Linear(32, 64, rngs=rngs)
        self.down = nnx.Linear(64, 32, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.down(jax.nn.relu(self.up(self.embed(tokens))))


def _xtx(rng, d):
    x = rng.standard_normal((4 * d, d)).astype(np.float32)
    return jnp.asarray(x.T @ x / x.shape[0])


def test_nnx_state_rtn_and_gptq(rng):
    model = _MLP(nnx.Rngs(0))
    state = nnx.state(model)
    stats = {"up/kernel": LayerStats(_xtx(rng, 32) * 100.0, jnp.asarray(100)), "down/kernel": _xtx(rng, 64)}
    for recipe in (jq.RTN(bits=4, group_size=16), jq.GPTQ(bits=4, group_size=16)):
        q = jq.quantize(state, stats, recipe, key=KEY)
        leaves = dict(flatten_with_paths(q))
        assert set(p for p, v in leaves.items() if jq.is_quantized(v)) == {"up/kernel", "down/kernel"}
        assert leaves["up/kernel"].layout == "in_out" and leaves["up/kernel"].shape == (32, 64)
        # Biases and embeddings are the very same arrays.
        for path in ("up/bias", "down/bias", "embed/embedding"):
            assert leaves[path] is dict(flatten_with_paths(state))[path]
        dense = jq.dequantize(q)
        assert jax.tree.structure(dense) == jax.tree.structure(state)
        for (p, a), (_, b) in zip(flatten_with_paths(dense), flatten_with_paths(state)):
            assert a.shape == b.shape, p
            err = float(jnp.max(jnp.abs(a - b)))
            assert err < (0.1 if p.endswith("kernel") else 1e-12), (p, err)
        nnx.update(model, dense)  # the dequantized state plugs straight back into the model
        assert model(jnp.arange(4)).shape == (4, 32)


def test_linen_params_dict_and_layout_consistency(rng):
    class Net(nn.Module):
        @nn.compact
        def __call__(self, t):
            h = nn.relu(nn.Dense(48)(nn.Embed(10, 32)(t)))  # Dense_0: 32 -> 48
            return nn.Dense(16)(h)  # Dense_1: 48 -> 16

    params = Net().init(jax.random.key(1), jnp.arange(3))
    stats = {"params/Dense_0/kernel": _xtx(rng, 32), "params/Dense_1/kernel": _xtx(rng, 48)}
    q = jq.quantize(params, stats, jq.GPTQ(bits=3, group_size=16), key=KEY)
    assert jq.is_quantized(q["params"]["Dense_0"]["kernel"])
    assert q["params"]["Dense_0"]["bias"] is params["params"]["Dense_0"]["bias"]
    assert q["params"]["Embed_0"]["embedding"] is params["params"]["Embed_0"]["embedding"]
    # A Flax kernel (d_in, d_out) gives the same codes as its transpose quantized as a
    # PyTorch-style (d_out, d_in) weight: the layout is converted in one place only.
    kernel = params["params"]["Dense_1"]["kernel"]
    direct = jq.quantize_weight(kernel.T, stats["params/Dense_1/kernel"], jq.GPTQ(bits=3, group_size=16), KEY, layout="out_in")
    np.testing.assert_array_equal(np.asarray(q["params"]["Dense_1"]["kernel"].codes), np.asarray(direct.codes))
    np.testing.assert_array_equal(np.asarray(jq.dequantize(q)["params"]["Dense_1"]["kernel"]), np.asarray(direct.decode().T))


def test_weight_leaves_are_out_in_and_layout_override(rng):
    tree = {"layer": {"weight": jnp.asarray(rng.standard_normal((8, 32)), jnp.float32)}}
    q = jq.quantize(tree, None, jq.RTN(bits=2, group_size=16))
    assert q["layer"]["weight"].layout == "out_in" and q["layer"]["weight"].scales.shape == (8, 2)
    tree2 = {"layer": {"w": jnp.asarray(rng.standard_normal((32, 8)), jnp.float32)}}
    with pytest.raises(ValueError, match="cannot infer the layout of the leaf 'layer/w'"):
        jq.quantize(tree2, None, jq.RTN(bits=2, group_size=16), where="layer/w")
    q2 = jq.quantize(tree2, None, jq.RTN(bits=2, group_size=16), where="layer/w", layout="in_out")
    assert q2["layer"]["w"].d_in == 32 and q2["layer"]["w"].decode().shape == (32, 8)


def test_per_pattern_recipes(rng):
    tree = {"attn": {"kernel": jnp.ones((32, 8))}, "mlp": {"kernel": jnp.ones((32, 8))}}
    q = jq.quantize(tree, None, {"attn": jq.RTN(bits=4, group_size=16), "mlp": jq.RTN(bits=2, group_size=32)})
    assert q["attn"]["kernel"].bits == 4 and q["mlp"]["kernel"].bits == 2
    assert q["mlp"]["kernel"].bits_per_weight == 2 + 32 / 32


def test_leaf_keys_are_stable_and_distinct():
    a = leaf_key(KEY, "params/a/kernel")
    assert jnp.array_equal(jax.random.key_data(a), jax.random.key_data(leaf_key(KEY, "params/a/kernel")))
    assert not jnp.array_equal(jax.random.key_data(a), jax.random.key_data(leaf_key(KEY, "params/b/kernel")))
    # Unsalted: the same in every process.
    expected = jax.random.fold_in(KEY, zlib.crc32(b"params/a/kernel") & 0x7FFFFFFF)
    assert jnp.array_equal(jax.random.key_data(a), jax.random.key_data(expected))
    assert leaf_layout("x/kernel") == "in_out" and leaf_layout("x/weight") == "out_in"


# ----------------------------------------------------------------------- bad input
PATH = "params/layers_3/mlp/up/kernel"


def _tree(leaf):
    return {"params": {"layers_3": {"mlp": {"up": {"kernel": leaf}}}}}


def test_group_size_not_dividing():
    with pytest.raises(ValueError, match=f"d_in=4095 is not divisible by group_size=8 at {PATH}"):
        jq.quantize(_tree(jnp.zeros((4095, 16))), None, jq.RTN(bits=2, group_size=8))
    with pytest.raises(ValueError, match=f"d_out=6 is not divisible by out_group_size=4 at {PATH}"):
        jq.quantize_weight(jnp.zeros((16, 6)), jnp.eye(16), jq.AQLM(group_size=8, out_group_size=4), KEY, layout="in_out", path=PATH)


def test_nan_inf_in_weight_and_statistics():
    w = np.ones((16, 8), np.float32)
    w[3, 2] = np.nan
    with pytest.raises(ValueError, match=f"weight at {PATH} holds NaN or Inf"):
        jq.quantize(_tree(jnp.asarray(w)), None, jq.RTN(bits=2, group_size=8))
    h = np.eye(16, dtype=np.float32)
    h[0, 1] = np.inf
    with pytest.raises(ValueError, match=f"statistics.*for {PATH} hold NaN or Inf"):
        jq.quantize(_tree(jnp.ones((16, 8))), {PATH: jnp.asarray(h)}, jq.GPTQ(bits=2, group_size=8))


def test_statistics_shape_mismatch_and_missing():
    with pytest.raises(ValueError, match=rf"statistics for {PATH} have shape \(8, 8\), expected \(16, 16\)"):
        jq.quantize(_tree(jnp.ones((16, 8))), {PATH: jnp.eye(8)}, jq.GPTQ(bits=2, group_size=8))
    with pytest.raises(ValueError, match=f"needs XᵀX statistics, but stats has no entry for {PATH}"):
        jq.quantize(_tree(jnp.ones((16, 8))), {"other/kernel": jnp.eye(16)}, jq.GPTQ(bits=2, group_size=8))
    with pytest.raises(ValueError, match=f"needs XᵀX statistics, but none were given for {PATH}"):
        jq.quantize_weight(jnp.ones((16, 8)), None, jq.GPTQ(bits=2, group_size=8), KEY, layout="in_out", path=PATH)


def test_integer_or_1d_leaf_selected():
    with pytest.raises(TypeError, match=f"leaf at {PATH} has dtype int32"):
        jq.quantize(_tree(jnp.ones((16, 8), jnp.int32)), None, jq.RTN(bits=2, group_size=8), where="kernel")
    with pytest.raises(ValueError, match=rf"leaf at {PATH} has shape \(16,\); only 2-D"):
        jq.quantize(_tree(jnp.ones((16,))), None, jq.RTN(bits=2, group_size=8), where="kernel")


def test_not_positive_definite_statistics_name_the_path():
    h = np.eye(16, dtype=np.float32)
    h[0, 1] = h[1, 0] = 3.0  # indefinite, and damping by 1% of the mean diagonal cannot fix it
    with pytest.raises(ValueError, match=f"XᵀX at {PATH} is not positive definite"):
        jq.quantize(_tree(jnp.ones((16, 8))), {PATH: jnp.asarray(h)}, jq.GPTQ(bits=2, group_size=8))


def test_scales_out_of_float16_range():
    with pytest.raises(ValueError, match=f"weight at {PATH} has max .*float16"):
        jq.quantize(_tree(jnp.full((16, 8), 1e6)), None, jq.RTN(bits=2, group_size=8))
    q = jq.quantize(_tree(jnp.full((16, 8), 1e6)), None, jq.RTN(bits=2, group_size=8, param_dtype="float32"))
    assert float(jnp.max(jnp.abs(jq.dequantize(q)["params"]["layers_3"]["mlp"]["up"]["kernel"] - 1e6))) == 0.0
