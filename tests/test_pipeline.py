"""Block-sequential quantization (jaxquant.pipeline): references, logs, bad input."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant.calibrate import calibrate
from jaxquant.models.config import ModelConfig
from jaxquant.models.llama import LlamaForCausalLM
from jaxquant.models import LlamaBlocks
from jaxquant.pipeline import quantize_model
from jaxquant.pipeline import run as run_module
from jaxquant.recipes import GPTQ, RTN
from jaxquant.select import flatten_with_paths

# Every linear layer 64 x 64: one compilation per method serves them all.
CFG = ModelConfig(hidden_size=64, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16,
                  vocab_size=256, max_position_embeddings=64)
KEY = jax.random.key(3)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (8, 32)).astype(np.int32)


def _quantized(tree) -> dict:
    return {p: leaf for p, leaf in flatten_with_paths(tree) if jq.is_quantized(leaf)}


@pytest.fixture(scope="module")
def gptq_run(model, tokens, tmp_path_factory):
    out = tmp_path_factory.mktemp("gptq") / "run"
    return out, quantize_model(model, tokens, GPTQ(bits=2, group_size=32), key=KEY, out_dir=out, progress=False,
                               batch_size=8)


def test_rtn_equals_one_shot_quantize(model, tokens, capsys):
    # RTN ignores data, and layer keys derive from full paths exactly as in jaxquant.quantize.
    recipe = RTN(bits=3, group_size=32)
    res = quantize_model(model, tokens, recipe, key=KEY, progress=False, batch_size=4, log=True)
    # Without bars, one line per block, numbered from 1.
    said = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in said] == ["block 1/2", "block 2/2"] and "7 layers" in said[0]
    ref = jq.quantize(nnx.state(model), None, recipe, key=KEY)
    got, want = _quantized(res.params), _quantized(ref)
    assert sorted(got) == sorted(want) and len(got) == 14
    for p in want:
        np.testing.assert_array_equal(np.asarray(got[p].codes), np.asarray(want[p].codes))
        np.testing.assert_array_equal(np.asarray(got[p].scales), np.asarray(want[p].scales))
    # Dense leaves are the model's own, and the accounting is honest: 3 + 2*16/32 bits.
    for p, leaf in flatten_with_paths(res.params):
        if not jq.is_quantized(leaf):
            np.testing.assert_array_equal(np.asarray(leaf), np.asarray(dict(flatten_with_paths(nnx.state(model)))[p]))
    assert res.summary["bits_per_weight"] == pytest.approx(4.0)
    assert [r["name"] for r in res.layers] == [p for p in sorted(want, key=lambda s: (s.split("/")[1], s))]
    # The quantized tree runs in the model.
    logits = jq.models.functional(model)[0](res.params, jnp.asarray(tokens[:2]))
    assert bool(jnp.all(jnp.isfinite(logits)))
    quantize_model(model, tokens, recipe, key=KEY, progress=False, batch_size=4)
    assert capsys.readouterr().out == ""  # the library is silent unless asked


def test_gptq_matches_block_by_block_reference(model, tokens, gptq_run):
    out, res = gptq_run
    blockwise = LlamaBlocks(model)
    recipe = GPTQ(bits=2, group_size=32)
    x = np.asarray(blockwise.embed(blockwise.params, jnp.asarray(tokens)), np.float32)
    got = _quantized(res.params)
    for i in range(CFG.num_layers):
        fn, fp = blockwise.block_fn(i), blockwise.block_params(blockwise.params, i)
        stats = calibrate(fn, fp, [x])
        qblock = jq.quantize(fp, stats, recipe)
        for rel, q in _quantized(qblock).items():
            np.testing.assert_array_equal(np.asarray(got[f"layers/{i}/{rel}"].codes), np.asarray(q.codes))
        # The logged error is ||(W - Ŵ) Xᵀ||² / ||W Xᵀ||², recomputed here in float64.
        for rec in [r for r in res.layers if r["block"] == i]:
            rel = rec["name"].split("/", 2)[2]
            w = np.asarray(fp_leaf(fp, rel), np.float64).T
            d = w - np.asarray(got[rec["name"]].decode_out_in(), np.float64)
            h = np.asarray(stats[rel].xtx, np.float64)
            assert rec["rel_error"] == pytest.approx(np.sum((d @ h) * d) / np.sum((w @ h) * w), rel=1e-4)
            assert rec["bits"] == pytest.approx(3.0) and rec["scheme"] == "int2 asym g32"
        x = np.asarray(fn(qblock, jnp.asarray(x)), np.float32)
    # GPTQ beats RTN on its own objective at equal bits.
    rtn = quantize_model(model, tokens, RTN(bits=2, group_size=32), key=KEY, progress=False, batch_size=8)
    assert np.mean([r["rel_error"] for r in res.layers]) < 0.8 * np.mean([r["rel_error"] for r in rtn.layers])
    # The log on disk holds exactly the returned records; the final checkpoint loads back.
    with open(out / "layers.jsonl", encoding="utf-8") as f:
        assert [json.loads(line) for line in f] == json.loads(json.dumps(res.layers))
    loaded = _quantized(jq.io.load(out / "params"))
    for p, q in got.items():
        np.testing.assert_array_equal(np.asarray(loaded[p].codes), np.asarray(q.codes))
    assert sorted(os.listdir(out / "state")) == ["progress.json"]


def fp_leaf(tree, rel):
    return dict(flatten_with_paths(tree))[rel]


def test_offload_equals_in_memory(model, tokens, gptq_run, tmp_path):
    _, res = gptq_run
    off = quantize_model(model, tokens, GPTQ(bits=2, group_size=32), key=KEY, out_dir=tmp_path / "off",
                         progress=False, batch_size=8, offload=True)
    a, b = _quantized(res.params), _quantized(off.params)
    for p in a:
        np.testing.assert_array_equal(np.asarray(a[p].codes), np.asarray(b[p].codes))
    assert off.layers == res.layers or [r["rel_error"] for r in off.layers] == [r["rel_error"] for r in res.layers]


def test_per_pattern_recipes(model, tokens):
    res = quantize_model(model, tokens, [("attn", RTN(bits=4, group_size=32)), ("mlp", RTN(bits=2, group_size=16))],
                         key=KEY, progress=False, batch_size=4)
    schemes = {r["name"]: r["scheme"] for r in res.layers}
    assert all(s == ("int4 asym g32" if "/attn/" in p else "int2 asym g16") for p, s in schemes.items())
    # 4 attn layers at 4 + 1 bits, 3 mlp layers at 2 + 2 bits, all of 64 x 64 weights.
    assert res.summary["bits_per_weight"] == pytest.approx((4 * 5.0 + 3 * 4.0) / 7)


def _snapshot(path) -> dict:
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = f.read()
    return out


def test_bad_input_is_reported_and_nothing_is_overwritten(model, tokens, gptq_run, tmp_path):
    out, _ = gptq_run
    before = _snapshot(out)
    recipe = GPTQ(bits=2, group_size=32)
    with pytest.raises(ValueError, match=r"recipe patterns \['nothing_here'\] match no selected leaf"):
        quantize_model(model, tokens, [("attn", recipe), ("nothing_here", recipe)], key=KEY, out_dir=tmp_path / "a")
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="holds a different run .*recipe"):
        quantize_model(model, tokens, GPTQ(bits=3, group_size=32), key=KEY, out_dir=out, progress=False, batch_size=8)
    with pytest.raises(ValueError, match="holds a different run .*key"):
        quantize_model(model, tokens, recipe, key=jax.random.key(4), out_dir=out, resume=True, progress=False,
                       batch_size=8)
    with pytest.raises(ValueError, match="holds a different run .*calibration"):
        quantize_model(model, tokens[:4], recipe, key=KEY, out_dir=out, resume=True, batch_size=8)
    with pytest.raises(ValueError, match="already holds this run; pass resume=True"):
        quantize_model(model, tokens, recipe, key=KEY, out_dir=out, progress=False, batch_size=8)
    assert _snapshot(out) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no jaxquant quantize run"):
        quantize_model(model, tokens, recipe, key=KEY, out_dir=other)
    assert os.listdir(other) == ["notes.txt"]
    with pytest.raises(ValueError, match="d_in=64 is not divisible by group_size=128 at layers/0/attn"):
        quantize_model(model, tokens, GPTQ(bits=2), key=KEY, out_dir=tmp_path / "b")
    with pytest.raises(ValueError, match=r"lie outside the model's blocks"):
        quantize_model(model, tokens, RTN(bits=4, group_size=32), key=KEY, where="kernel", out_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        quantize_model(model, tokens + 256, recipe, key=KEY)
    with pytest.raises(ValueError, match=r"\[nsamples, seqlen\]"):
        quantize_model(model, tokens[0], recipe, key=KEY)
    with pytest.raises(TypeError, match="PRNG key"):
        quantize_model(model, tokens, recipe, key=3)
    assert not any((tmp_path / n).exists() for n in ("b", "c"))


def _interrupted_run(model, tokens, out, monkeypatch) -> None:
    """A GPTQ run (the settings of ``gptq_run``) stopped after its first block is committed."""
    real = run_module._quantize_block

    def stop_at_second(blockwise, i, *args):
        if i == 1:
            raise KeyboardInterrupt
        return real(blockwise, i, *args)

    monkeypatch.setattr(run_module, "_quantize_block", stop_at_second)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(model, tokens, GPTQ(bits=2, group_size=32), key=KEY, out_dir=out, progress=False, batch_size=8)
    monkeypatch.undo()


@pytest.mark.parametrize("damage", ["block", "inputs"])
def test_resume_redoes_what_was_damaged(model, tokens, gptq_run, tmp_path, monkeypatch, capsys, damage):
    out = tmp_path / "run"
    _interrupted_run(model, tokens, out, monkeypatch)
    state = out / "state"
    if damage == "block":
        victim = max((p for p in (state / "block-0000").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        expected = "the checkpoint of block 1"
    else:
        victim = state / "inputs-0001.npy"
        expected = f"{victim} is damaged"
    victim.write_bytes(b"garbage")
    capsys.readouterr()
    res = quantize_model(model, tokens, GPTQ(bits=2, group_size=32), key=KEY, out_dir=out, resume=True,
                         progress=False, batch_size=8, log=True)
    said = capsys.readouterr().out
    assert expected in said and "is damaged" in said
    assert ("from block 2/2" in said) == (damage == "inputs")  # a damaged block 1 is redone from scratch
    got, want = _quantized(res.params), _quantized(gptq_run[1].params)
    for p in want:
        np.testing.assert_array_equal(np.asarray(got[p].codes), np.asarray(want[p].codes), err_msg=p)
    assert [r["name"] for r in res.layers] == [r["name"] for r in gptq_run[1].layers]


def test_a_damaged_progress_record_is_named(model, tokens, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _interrupted_run(model, tokens, out, monkeypatch)
    (out / "state" / "progress.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"progress.json is damaged .*Delete .*state to start the run over"):
        quantize_model(model, tokens, GPTQ(bits=2, group_size=32), key=KEY, out_dir=out, resume=True, progress=False,
                       batch_size=8)


def test_damped_statistics_fill_up_to_the_token_floor(rng):
    x = jnp.asarray(rng.standard_normal((5, 8)), jnp.float32)
    stats = jq.LayerStats(x.T @ x, jnp.asarray(5, jnp.int32))
    got = jq.stats.damped(stats, 20)
    energy = float(jnp.sum(x * x)) / (5 * 8)
    np.testing.assert_allclose(np.asarray(got.xtx), np.asarray(x.T @ x) + 15 * energy * np.eye(8), rtol=1e-5)
    assert int(got.count) == 20
    assert jq.stats.damped(stats, 5) is stats
    empty = jq.stats.damped(jq.LayerStats(jnp.zeros((8, 8)), jnp.asarray(0, jnp.int32)), 20)
    np.testing.assert_array_equal(np.asarray(empty.mean()), np.eye(8))


def test_experts_are_calibrated_on_their_own_tokens_and_sparse_ones_damped(tokens):
    moe = LlamaForCausalLM(ModelConfig(**{**CFG.__dict__, "architecture": "mixtral", "num_experts": 4,
                                          "experts_per_token": 1}), rngs=nnx.Rngs(1))
    few = tokens[:2, :24]  # 48 tokens in all: the floor is 48, about 12 per expert
    with pytest.warns(UserWarning, match=r"block 1: \d+ layers saw fewer than 48 calibration tokens \(.*"
                                         r"layers/0/mlp/experts/\d/gate_proj/kernel \d+") as said:
        res = quantize_model(moe, few, GPTQ(bits=3, group_size=32), key=KEY, progress=False, batch_size=2)
    # Dense layers saw every token: never floored, even with fewer than 64 tokens in all.
    assert not any("router" in str(w.message) or "attn" in str(w.message) for w in said)
    records = {r["name"]: r for r in res.layers}
    for block in range(2):
        experts = [records[f"layers/{block}/mlp/experts/{e}/up_proj/kernel"]["calibration_tokens"] for e in range(4)]
        assert sum(experts) == 48  # one expert per token
        assert records[f"layers/{block}/mlp/router/kernel"]["calibration_tokens"] == 48
        assert records[f"layers/{block}/attn/q_proj/kernel"]["calibration_tokens"] == 48
    assert all(np.isfinite(r["rel_error"]) for r in res.layers)
    assert all(np.all(np.isfinite(np.asarray(jq.dequantize(leaf)))) for leaf in _quantized(res.params).values())
