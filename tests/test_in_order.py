"""jaxquant.in_order: per-layer work one layer at a time inside one compiled program."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.in_order import after, map_in_order


def test_after_changes_no_value(rng):
    tree = {"w": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32),
            "h": jnp.asarray(rng.standard_normal(4), jnp.float16),
            "codes": jnp.asarray(rng.integers(0, 255, (6,)), jnp.uint8),
            "neg_zero": jnp.asarray([-0.0, 1.0], jnp.float32)}
    token = (jnp.asarray([-3.5, 2.0]), jnp.asarray([7], jnp.int32), jnp.asarray(np.inf))
    out = jax.jit(after)(tree, token)
    for k in ("w", "h", "codes"):
        assert out[k].dtype == tree[k].dtype
        np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(tree[k]))
    np.testing.assert_array_equal(np.asarray(out["neg_zero"]), [0.0, 1.0])  # -0.0 + 0.0 is 0.0
    assert after(tree, ()) is tree  # nothing to wait for


def test_after_propagates_a_nan_token(rng):
    out = after(jnp.ones(3), jnp.asarray([np.nan, 1.0]))
    assert np.isnan(np.asarray(out)).all()


def test_map_in_order_equals_map_and_holds_one_layer_at_a_time(rng):
    # Independent "layers", each with a layer-sized temporary (the transpose) before a
    # small result: XLA:CPU runs every transpose first unless the layers are ordered.
    mats = [jnp.asarray(rng.standard_normal((256, 384)), jnp.float32) for _ in range(12)]
    idx = jnp.asarray(rng.integers(0, 16, 256 * 384 // 4), jnp.int32)

    def layer(m):
        groups = m.T.reshape(-1, 4) * 1.5
        return jax.ops.segment_sum(groups, idx, num_segments=16)

    def plain(ms):
        return [layer(m) for m in ms]

    def ordered(ms):
        return map_in_order(layer, [(m,) for m in ms])

    for a, b in zip(jax.jit(plain)(mats), jax.jit(ordered)(mats), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6)
    temp = {f.__name__: jax.jit(f).lower(mats).compile().memory_analysis().temp_size_in_bytes
            for f in (plain, ordered)}
    layer_bytes = 256 * 384 * 4
    assert temp["ordered"] <= 2 * layer_bytes, temp  # XLA 0.10: 1 layer ordered, 12 plain
    assert temp["plain"] >= temp["ordered"], temp
