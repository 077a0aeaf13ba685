"""Leaf selection: the default linear-kernel selector, patterns, predicates, recipe maps."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxquant import select
from jaxquant.qarray import ScalarQuantized
from jaxquant.recipes import GPTQ, RTN


def _f32(*shape: int) -> jax.Array:
    return jnp.zeros(shape, jnp.float32)


class TinyLM(nnx.Module):
    """The leaf kinds of a language model: embedding, norms, attention, MLP, head."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(32, 16, rngs=rngs)
        self.attn_norm = nnx.RMSNorm(16, rngs=rngs)
        self.attn = nnx.Dict(q_proj=nnx.Linear(16, 16, rngs=rngs), o_proj=nnx.Linear(16, 16, rngs=rngs))
        self.mlp_norm = nnx.LayerNorm(16, rngs=rngs)
        self.mlp = nnx.Dict(up=nnx.Linear(16, 32, rngs=rngs), down=nnx.Linear(32, 16, rngs=rngs))
        self.lm_head = nnx.Linear(16, 32, use_bias=False, rngs=rngs)


NNX_SELECTED = ["attn/o_proj/kernel", "attn/q_proj/kernel", "mlp/down/kernel", "mlp/up/kernel"]


def test_default_selector_on_nnx_state():
    state = nnx.state(TinyLM(nnx.Rngs(0)))
    assert select.selected_paths(state) == NNX_SELECTED
    paths = [p for p, _ in select.flatten_with_paths(state)]
    # The skipped kinds really are in the tree.
    for skipped in ("embed/embedding", "attn_norm/scale", "mlp_norm/scale", "mlp/up/bias", "lm_head/kernel"):
        assert skipped in paths


def test_default_selector_on_linen_params():
    class M(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            x = nn.Embed(32, 16, name="embed")(tokens)
            x = nn.LayerNorm(name="ln_1")(x)
            x = nn.Dense(16, name="fc")(x)
            return nn.Dense(32, name="lm_head")(x)

    variables = M().init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    assert select.selected_paths(variables) == ["params/fc/kernel"]


def test_default_selector_on_torch_style_names():
    tree = {
        "model": {
            "embed_tokens": {"weight": _f32(32, 16)},
            "layers": [
                {
                    "input_layernorm": {"weight": _f32(16)},
                    "self_attn": {"q_proj": {"weight": _f32(16, 16), "bias": _f32(16)}},
                    "mlp": {"gate_proj": {"weight": _f32(32, 16)}},
                }
            ],
            "norm": {"weight": _f32(16)},
        },
        "lm_head": {"weight": _f32(32, 16)},
        "wte": {"weight": _f32(32, 16)},
    }
    assert select.selected_paths(tree) == [
        "model/layers/0/mlp/gate_proj/weight",
        "model/layers/0/self_attn/q_proj/weight",
    ]


@pytest.mark.parametrize(
    "leaf,name,expected",
    [
        (_f32(4, 8), "kernel", True),
        (_f32(4, 8), "weight", True),
        (jnp.zeros((4, 8), jnp.bfloat16), "kernel", True),
        (_f32(8), "kernel", False),  # 1-D
        (_f32(2, 4, 8), "kernel", False),  # 3-D (e.g. DenseGeneral heads)
        (jnp.zeros((4, 8), jnp.int32), "kernel", False),  # integer
        (_f32(4, 8), "bias", False),
        (_f32(4, 8), "scale", False),
        (_f32(4, 8), "embedding", False),
    ],
)
def test_linear_kernels_leaf_rules(leaf, name, expected):
    assert select.linear_kernels(f"block/dense/{name}", leaf) is expected


def test_quantized_leaf_is_not_selected_again():
    q = ScalarQuantized(jnp.zeros((4, 8), jnp.uint8), jnp.ones((4, 1), jnp.float16), None, 4, 8, (8, 4), "in_out")
    tree = {"a": {"kernel": q}, "b": {"kernel": _f32(8, 4)}}
    assert select.selected_paths(tree) == ["b/kernel"]
    # and the quantized array is one leaf in the flattening, not three
    assert [p for p, _ in select.flatten_with_paths(tree)] == ["a/kernel", "b/kernel"]


def test_path_to_str_drops_nnx_value():
    state = nnx.state(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    raw_paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert [select.path_to_str(p) for p in raw_paths] == ["bias", "kernel"]
    assert select.path_to_str((jax.tree_util.DictKey("a"), jax.tree_util.SequenceKey(3))) == "a/3"


def test_patterns_lists_and_predicates():
    state = nnx.state(TinyLM(nnx.Rngs(0)))
    assert select.selected_paths(state, "mlp/.*/kernel") == ["mlp/down/kernel", "mlp/up/kernel"]
    assert select.selected_paths(state, ["q_proj/kernel", "lm_head"]) == ["attn/q_proj/kernel", "lm_head/kernel"]
    big = lambda path, leaf: leaf.ndim == 2 and leaf.shape[1] == 32  # noqa: E731
    assert select.selected_paths(state, big) == ["lm_head/kernel", "mlp/up/kernel"]
    # matching(): the default rules restricted to a pattern (lm_head stays excluded)
    assert select.selected_paths(state, select.matching("up|head")) == ["mlp/up/kernel"]
    assert select.selected_paths(state, [select.matching("up"), "lm_head/kernel"]) == [
        "lm_head/kernel",
        "mlp/up/kernel",
    ]


def test_resolve_single_recipe():
    state = nnx.state(TinyLM(nnx.Rngs(0)))
    r = RTN(bits=3)
    assert select.resolve_recipes(state, r) == dict.fromkeys(NNX_SELECTED, r)


@pytest.mark.parametrize("as_dict", [True, False])
def test_resolve_per_pattern_first_match_wins(as_dict):
    state = nnx.state(TinyLM(nnx.Rngs(0)))
    attn, up, rest = GPTQ(bits=4), GPTQ(bits=2), RTN(bits=3)
    pairs = [("attn", attn), ("mlp/up", up), ("mlp", rest), ("kernel", RTN(bits=8))]
    # the last pattern matches everything, but every leaf is claimed earlier -> unused
    with pytest.raises(ValueError, match=r"\['kernel'\] match no selected leaf"):
        select.resolve_recipes(state, dict(pairs) if as_dict else pairs)
    pairs = pairs[:3]
    out = select.resolve_recipes(state, dict(pairs) if as_dict else tuple(pairs))
    assert out == {
        "attn/o_proj/kernel": attn,
        "attn/q_proj/kernel": attn,
        "mlp/down/kernel": rest,
        "mlp/up/kernel": up,
    }


def test_leaves_no_pattern_covers_are_left_out():
    state = nnx.state(TinyLM(nnx.Rngs(0)))
    out = select.resolve_recipes(state, [("mlp", RTN())])
    assert sorted(out) == ["mlp/down/kernel", "mlp/up/kernel"]


def test_pattern_matching_nothing_is_named():
    state = nnx.state(TinyLM(nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"\['ffn'\] match no selected leaf"):
        select.resolve_recipes(state, {"mlp": RTN(), "ffn": GPTQ()})
    # a pattern that only matches an unselected leaf (the head) is also unused
    with pytest.raises(ValueError, match="lm_head"):
        select.resolve_recipes(state, {"lm_head": RTN()})


def test_selector_matching_nothing():
    with pytest.raises(ValueError, match="matched no leaf.*norm/scale"):
        select.resolve_recipes({"norm": {"scale": _f32(4)}}, RTN())


def test_empty_recipe_map_is_rejected():
    state = nnx.state(TinyLM(nnx.Rngs(0)))
    for empty in ([], {}, ()):
        with pytest.raises(ValueError, match="recipe"):
            select.resolve_recipes(state, empty)


def test_recipe_list_without_patterns_is_rejected():
    state = nnx.state(TinyLM(nnx.Rngs(0)))
    with pytest.raises(TypeError, match=r"\(pattern, recipe\) pairs"):
        select.resolve_recipes(state, [RTN(), GPTQ()])


@settings(max_examples=30, deadline=None)
@given(
    names=st.lists(st.sampled_from(["kernel", "weight", "bias", "scale", "embedding"]), min_size=1, max_size=6),
    ndims=st.lists(st.integers(1, 3), min_size=6, max_size=6),
    prefixes=st.lists(st.sampled_from(["mlp", "attn", "embed", "norm", "lm_head", "blk"]), min_size=6, max_size=6),
)
def test_default_selector_hypothesis(names, ndims, prefixes):
    tree = {f"{prefixes[i]}{i}": {name: np.zeros((2,) * ndims[i], np.float32)} for i, name in enumerate(names)}
    got = select.selected_paths(tree)
    expected = [
        f"{prefixes[i]}{i}/{name}"
        for i, name in enumerate(names)
        if name in ("kernel", "weight") and ndims[i] == 2 and prefixes[i] in ("mlp", "attn", "blk")
    ]
    assert got == sorted(expected)
