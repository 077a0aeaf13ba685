"""Linen interceptor and NNX module swap give the outputs of the dequantized dense model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.ops.intercept import QuantizedLinear, quantized_linen_interceptor, swap_linear
from jaxquant.qarray import dequantize
from test_ops_xla import random_aq, random_sq


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(32, name="up")(x)
        h = nn.DenseGeneral((2, 8), axis=-1, name="heads")(jax.nn.relu(h))  # [.., 2, 8]
        h = nn.DenseGeneral(16, axis=(-2, -1), name="merge")(h)
        h = nn.Einsum((16, 24), "...i,io->...o", name="ein")(h)
        return nn.Dense(8, use_bias=False, name="out")(h)


def test_linen_interceptor_matches_dequantized(rng):
    model = Tiny()
    x = jnp.asarray(rng.standard_normal((3, 5, 16)).astype(np.float32))
    params = model.init(jax.random.key(0), x)["params"]
    q = dict(params)
    q["up"] = {**params["up"], "kernel": random_aq(rng, 32, 16, 2, 8, 8, layout="in_out")}
    q["heads"] = {**params["heads"], "kernel": random_sq(rng, 16, 32, 4, 16, False, layout="in_out")}
    q["merge"] = {**params["merge"], "kernel": random_aq(rng, 16, 16, 1, 8, 4, layout="in_out")}
    q["ein"] = {**params["ein"], "kernel": random_aq(rng, 24, 16, 2, 8, 8, layout="in_out")}
    q["out"] = {"kernel": random_aq(rng, 8, 24, 1, 16, 8, layout="in_out")}
    dense = dequantize(q)
    dense["heads"]["kernel"] = dense["heads"]["kernel"].reshape(32, 2, 8)
    dense["merge"]["kernel"] = dense["merge"]["kernel"].reshape(2, 8, 16)
    want = model.apply({"params": dense}, x)
    with nn.intercept_methods(quantized_linen_interceptor):
        got = jax.jit(lambda p, x: model.apply({"params": p}, x))(q, x)
    assert got.shape == want.shape == (3, 5, 8)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(want))))


def test_linen_interceptor_leaves_dense_layers_alone(rng):
    model = Tiny()
    x = jnp.asarray(rng.standard_normal((2, 16)).astype(np.float32))
    params = model.init(jax.random.key(1), x)["params"]
    want = model.apply({"params": params}, x)
    with nn.intercept_methods(quantized_linen_interceptor):
        got = model.apply({"params": params}, x)
    np.testing.assert_array_equal(got, want)


class Mlp(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(16, 32, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(32, 32, rngs=rngs), nnx.Linear(32, 8, use_bias=False, rngs=rngs)])

    def __call__(self, x):
        h = jax.nn.relu(self.up(x))
        return self.layers[1](jax.nn.relu(self.layers[0](h)))


def test_nnx_swap_matches_dequantized(rng):
    model = Mlp(nnx.Rngs(0))
    q = {"up": random_aq(rng, 32, 16, 2, 8, 8, layout="in_out"),
         "l0": random_sq(rng, 32, 32, 3, 16, True, layout="in_out"),
         "l1": random_aq(rng, 8, 32, 1, 8, 8, layout="in_out")}
    x = jnp.asarray(rng.standard_normal((4, 16)).astype(np.float32))
    model.up.kernel.set_value(q["up"].decode())
    model.layers[0].kernel.set_value(q["l0"].decode())
    model.layers[1].kernel.set_value(q["l1"].decode())
    want = model(x)
    model.up.kernel.set_value(q["up"])
    model.layers[0].kernel.set_value(q["l0"])
    model.layers[1].kernel.set_value(q["l1"])
    assert swap_linear(model) == 3
    assert isinstance(model.up, QuantizedLinear) and isinstance(model.layers[1], QuantizedLinear)
    got = nnx.jit(lambda m, x: m(x))(model, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(want))))
    forced = QuantizedLinear(q["up"], None, impl="xla_decode")(x)
    np.testing.assert_allclose(forced, x @ q["up"].decode(), rtol=1e-4, atol=1e-4)
