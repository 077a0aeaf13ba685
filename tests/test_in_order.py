"""jaxquant.in_order: per-layer work one layer at a time inside one compiled program."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.in_order import alike_groups, map_stacked, stack, unstack


def test_alike_groups_stack_and_unstack_round_trip(rng):
    trees = [{"w": jnp.ones((2, 3)), "c": jnp.zeros(4, jnp.uint8)},
             {"w": jnp.ones((3, 2)), "c": jnp.zeros(4, jnp.uint8)},   # other shape
             {"w": jnp.full((2, 3), 2.0), "c": jnp.ones(4, jnp.uint8)},
             {"w": jnp.ones((2, 3), jnp.float16), "c": jnp.zeros(4, jnp.uint8)},  # other dtype
             {"w": jnp.ones((2, 3))}]  # other structure
    assert alike_groups(trees) == [[0, 2], [1], [3], [4]]
    stacked = stack([trees[0], trees[2]])
    assert stacked["w"].shape == (2, 2, 3) and stacked["c"].dtype == jnp.uint8
    for got, want in zip(unstack(stacked, 2), [trees[0], trees[2]], strict=True):
        chex.assert_trees_all_equal(got, want)


def test_map_stacked_equals_map_and_holds_one_layer_at_a_time(rng):
    # Two kinds of independent "layers", each with a layer-sized temporary (the transpose)
    # before a small result.
    kinds = [jnp.asarray(rng.standard_normal((6, 256, 384)), jnp.float32),
             jnp.asarray(rng.standard_normal((6, 384, 256)), jnp.float32)]
    idx = jnp.asarray(rng.integers(0, 16, 256 * 384 // 4), jnp.int32)

    def layer(m):
        groups = m.T.reshape(-1, 4) * 1.5
        return jax.ops.segment_sum(groups, idx, num_segments=16)

    def plain(ks):
        return [jnp.stack([layer(m) for m in k]) for k in ks]

    def mapped(ks):
        return map_stacked(layer, [(k,) for k in ks])

    for a, b in zip(jax.jit(plain)(kinds), jax.jit(mapped)(kinds), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6)
    temp = {f.__name__: jax.jit(f).lower(kinds).compile().memory_analysis().temp_size_in_bytes
            for f in (plain, mapped)}
    layer_bytes = 256 * 384 * 4
    assert temp["mapped"] <= 2 * layer_bytes, temp  # XLA 0.10: 1 layer mapped, 12 plain
    assert temp["plain"] >= temp["mapped"], temp
