"""A whole new method defined in this file alone runs through every part of jaxquant.

The method is a 1-bit sign quantizer with a per-row scale: ``W[o, i] ≈ s[o] · sign(W[o, i])``
with ``s[o] = mean |W[o, :]|``, the scale that minimises the row's squared error. Its array
type, recipe, quantize function and re-encoder are written here and registered with one
``jq.register_method`` call; nothing elsewhere knows it. ``docs/extending.md`` walks
through the same code.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant.finetune import pv
from jaxquant.methods.reencoding import accept_changes
from jaxquant.models.config import ModelConfig
from jaxquant.models.llama import LlamaForCausalLM
from jaxquant.ops.xla import decode_matmul
from jaxquant.pipeline import run as run_module
from jaxquant.pipeline.run import quantize_model
from jaxquant.qarray import flatten_by_path

# ----------------------------------------------------------------------------- the method


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, repr=False)
class SignQuantized(jq.QuantizedArray):
    """``W[o, i] = scales[o] · (2 · codes[o, i] - 1)``: one bit per weight, one float per row."""

    codes: jax.Array  # uint8 in {0, 1}, [d_out, d_in]
    scales: jax.Array  # float32, [d_out, 1]
    shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
    layout: str = dataclasses.field(default="out_in", metadata=dict(static=True))

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"codes": (self.d_out, self.d_in), "scales": (self.d_out, 1)}

    def decode_rows(self, start: jax.Array, n_rows: int) -> jax.Array:
        codes = jax.lax.dynamic_slice_in_dim(self.codes, start, n_rows, axis=0).astype(jnp.float32)
        scales = jax.lax.dynamic_slice_in_dim(self.scales, start, n_rows, axis=0)
        return (2.0 * codes - 1.0) * scales

    @property
    def storage_bits(self) -> int:
        return self.d_out * self.d_in + self.scales.size * 32

    @property
    def resident_bytes(self) -> int:
        return self.codes.size + self.scales.size * 4

    @property
    def scheme(self) -> str:
        return "sign per-row"

    @property
    def code_widths(self) -> dict[str, int]:
        return {"codes": 1}


@dataclasses.dataclass(frozen=True)
class Sign:
    """Recipe of the sign quantizer (it has no settings)."""

    @property
    def name(self) -> str:
        return "sign"


def quantize_sign(w: jax.Array, xtx: Any, recipe: Sign, key: jax.Array, *, layout: str, path: str) -> SignQuantized:
    del xtx, recipe, key, path  # data-free and deterministic
    d_out, d_in = w.shape
    return SignQuantized(
        codes=(w >= 0).astype(jnp.uint8),
        scales=jnp.mean(jnp.abs(w), axis=1, keepdims=True),
        shape=(d_out, d_in) if layout == "out_in" else (d_in, d_out),
        layout=layout,
    )


def reencode_sign(q: SignQuantized, target: jax.Array, idx: jax.Array, *, beam_size: int,
                  trust_ratio: float | None = None, force: bool = False) -> SignQuantized:
    """Each selected weight takes the sign of its target; a flip moves it by ``2 · s``."""
    del beam_size, force  # the nearest of two values needs no search, and any change moves it
    cur = q.codes.reshape(-1)[idx]
    new = (target.reshape(-1)[idx] >= 0).astype(jnp.uint8)
    scale = jnp.repeat(q.scales[:, 0], q.d_in)[idx]
    w_sq = jnp.sum(q.decode_out_in() ** 2)
    keep = accept_changes(new != cur, (2 * scale) ** 2, w_sq, trust_ratio)
    codes = q.codes.reshape(-1).at[idx].set(jnp.where(keep, new, cur)).reshape(q.codes.shape)
    return dataclasses.replace(q, codes=codes)


SIGN = jq.register_method(jq.Method(
    family="sign",
    recipe_type=Sign,
    quantize=quantize_sign,
    needs_statistics=False,
    name_pattern=r"sign",
    from_name=lambda match, d_ins: Sign(),
    examples=("sign",),
    array_type=SignQuantized,
    reencoder=jq.Reencoder(
        num_groups=lambda q: q.d_out * q.d_in,
        group_sums=lambda q, per_weight: per_weight.reshape(-1),
        reencode=reencode_sign,
    ),
))

# ----------------------------------------------------------------------------- the checks


def _reference(w_out_in: np.ndarray) -> np.ndarray:
    """The sign quantizer in numpy, on the storage layout."""
    return np.where(w_out_in >= 0, 1.0, -1.0) * np.abs(w_out_in).mean(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def tree() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {"mlp": {"kernel": jnp.asarray(rng.normal(size=(48, 32)), jnp.float32)},
            "norm": {"scale": jnp.ones((32,), jnp.float32)}}


def test_quantize_by_recipe_and_by_name(tree):
    q = jq.quantize(tree, None, Sign(), where="kernel")
    leaf = q["mlp"]["kernel"]
    assert isinstance(leaf, SignQuantized) and leaf.layout == "in_out" and leaf.shape == (48, 32)
    np.testing.assert_allclose(np.asarray(leaf.decode()), _reference(np.asarray(tree["mlp"]["kernel"]).T).T,
                               rtol=1e-6)
    assert jq.named_recipe("sign") == Sign()
    assert jq.recipe_from_dict({"method": "sign"}) == Sign()
    assert jq.recipe_to_dict(Sign()) == {"method": "sign"}
    assert "sign" in repr(leaf) and "\n" not in repr(leaf)
    with pytest.raises(ValueError, match="family 'sign' is taken by Sign"):
        jq.register_method(jq.Method(family="sign", recipe_type=dict, quantize=quantize_sign))


def test_matmul_every_path_agrees_with_the_decoded_weight(tree):
    leaf = jq.quantize(tree, None, Sign(), where="kernel")["mlp"]["kernel"]
    x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 48)), jnp.float32)
    want = np.asarray(x) @ np.asarray(leaf.decode())
    for impl in (None, "xla_decode", "reference"):
        np.testing.assert_allclose(np.asarray(jq.ops.matmul(x, leaf, impl=impl)), want, rtol=1e-5, atol=1e-5)
    tiled = decode_matmul(x, leaf, tile_rows=8)  # several tiles through decode_rows
    np.testing.assert_allclose(np.asarray(tiled), want, rtol=1e-5, atol=1e-5)


def test_tree_bits_and_split_see_the_new_type(tree):
    q = jq.quantize(tree, None, Sign(), where="kernel")
    bits = jq.tree_bits(q)
    assert bits["quantized_weights"] == 48 * 32
    assert bits["bits_per_weight"] == pytest.approx(1 + 32 / 48)  # 32 row scales over 48 inputs each
    assert q["mlp"]["kernel"].dtype == jnp.float32  # the interface's: its first floating-point field
    continuous, discrete = jq.split(q)
    assert continuous["mlp"]["kernel"].codes is None and discrete["mlp"]["kernel"].scales is None
    merged = jq.merge(continuous, discrete)["mlp"]["kernel"]
    np.testing.assert_array_equal(np.asarray(merged.decode()), np.asarray(q["mlp"]["kernel"].decode()))


def test_checkpoint_round_trip_names_the_type(tree, tmp_path):
    q = jq.quantize(tree, None, Sign(), where="kernel")
    jq.io.save(tmp_path / "ckpt", q)
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert "SignQuantized" in {leaf["kind"] for leaf in manifest["leaves"]}
    leaf = next(leaf for leaf in manifest["leaves"] if leaf["kind"] == "SignQuantized")
    assert leaf["arrays"]["codes"]["packed_bits"] == 1  # stored at one bit per code
    back = jq.io.load(tmp_path / "ckpt")
    assert isinstance(back["mlp"]["kernel"], SignQuantized)
    np.testing.assert_array_equal(np.asarray(back["mlp"]["kernel"].codes), np.asarray(q["mlp"]["kernel"].codes))
    np.testing.assert_array_equal(np.asarray(back["mlp"]["kernel"].scales), np.asarray(q["mlp"]["kernel"].scales))
    bad = dataclasses.replace(q["mlp"]["kernel"], scales=jnp.ones((3, 1), jnp.float32))
    with pytest.raises(ValueError, match=r"SignQuantized.scales has shape \(3, 1\), expected \(32, 1\)"):
        bad.check_shapes()


def test_v_step_reencodes_the_furthest_weights_within_the_fraction(tree):
    q = jq.quantize(tree, None, Sign(), where="kernel")["mlp"]["kernel"]
    target = -q.decode_out_in() * jnp.linspace(0.1, 2.0, q.d_out * q.d_in).reshape(q.d_out, q.d_in)
    n = pv.num_groups(q)
    k = pv.num_selected(n, 0.1)
    out = jax.jit(lambda q, t: pv.v_step_leaf(q, t, pv.VStep(update_fraction=0.1, beam_size=1)))(q, target)
    changed = np.flatnonzero(np.asarray(out.codes != q.codes).reshape(-1))
    furthest = np.argsort(-np.asarray(pv.group_distances(q, target)))[:k]
    assert len(changed) == k and set(changed) == set(furthest.tolist())


def test_pv_tuning_moves_codes_toward_a_sign_flipped_teacher(tree):
    params = jq.quantize(tree, None, Sign(), where="kernel")
    flipped = -params["mlp"]["kernel"].decode()  # the teacher wants every sign flipped
    x = jnp.asarray(np.random.default_rng(2).normal(size=(64, 48)), jnp.float32)

    def loss_fn(p: Any) -> jax.Array:
        return jnp.mean((jq.ops.matmul(x, p["mlp"]["kernel"]) - x @ flipped) ** 2)

    tuner = jq.pv_tuning(optax.sgd(0.0), optax.sgd(50.0), pv.VStep(update_fraction=0.25))
    state = tuner.init(params)
    value_and_grad = jq.decoded_value_and_grad(loss_fn)

    @jax.jit
    def step(p: Any, s: Any) -> tuple[Any, Any, jax.Array]:
        loss, grads = value_and_grad(p)
        return (*tuner.update(grads, s, p), loss)

    losses = []
    for _ in range(4):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    flipped_share = float(jnp.mean(params["mlp"]["kernel"].decode() * flipped > 0))
    assert flipped_share > 0.5 and losses[-1] < losses[0]
    assert step._cache_size() == 1  # one compilation for every step


CFG = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=16,
                  vocab_size=256, max_position_embeddings=32)


def test_pipeline_resumes_a_sign_run(tmp_path, monkeypatch):
    model = LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(3).integers(0, CFG.vocab_size, size=(4, 16), dtype=np.int32)
    key = jax.random.key(0)
    whole = quantize_model(model, tokens, Sign(), key=key, progress=False, batch_size=4)

    real = run_module._quantize_block

    def stop_at_second(blockwise: Any, i: int, *args: Any) -> Any:
        if i == 1:
            raise KeyboardInterrupt
        return real(blockwise, i, *args)

    out = pathlib.Path(tmp_path) / "run"
    monkeypatch.setattr(run_module, "_quantize_block", stop_at_second)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(model, tokens, Sign(), key=key, out_dir=out, progress=False, batch_size=4)
    monkeypatch.undo()
    resumed = quantize_model(model, tokens, Sign(), key=key, out_dir=out, resume=True, progress=False, batch_size=4)

    want = {p: leaf for p, leaf in flatten_by_path(whole.params)[0] if jq.is_quantized(leaf)}
    got = {p: leaf for p, leaf in flatten_by_path(resumed.params)[0] if jq.is_quantized(leaf)}
    assert len(want) == 14 and set(got) == set(want)  # 7 linear layers per block
    for p, leaf in want.items():
        assert isinstance(got[p], SignQuantized)
        np.testing.assert_array_equal(np.asarray(got[p].codes), np.asarray(leaf.codes), err_msg=p)
    saved = jq.io.load(out / "params")
    assert sum(isinstance(leaf, SignQuantized) for _, leaf in flatten_by_path(saved)[0]) == 14
