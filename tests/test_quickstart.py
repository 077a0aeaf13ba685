"""The quickstart main job: cached training, the comparison table, results.json and plot."""

import dataclasses
import json
import math
import os

import numpy as np
import pytest

import jaxquant as jq
from jaxquant import quickstart as qs
from jaxquant.data import ByteTokenizer, load_tokenizer
from jaxquant.finetune import distillation as distill_module
from jaxquant.finetune import losses
from jaxquant.models import ModelConfig, abstract_model, from_pretrained, generate
from jaxquant.train import TrainConfig

TINY = qs.QuickstartConfig(
    model=ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16,
                      max_position_embeddings=64, vocab_size=256),
    train=TrainConfig(steps=80, batch_size=8, seqlen=64, warmup_steps=8, peak_lr=1e-2),
    eval_seqlen=64, calib_windows=8, calib_seqlen=64, calib_batch=4,
)
METHODS = tuple(m for m in qs.METHODS if m.label in ("fp32", "RTN 4-bit", "RTN 2-bit", "GPTQ 2-bit"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("out")
    lines = []
    results = qs.run_quickstart(config=TINY, out_dir=str(out), cache_dir=str(cache), methods=METHODS,
                                progress=False, log=lines.append)
    return results, cache, out, lines


def test_results_table_and_files(run):
    results, _, out, lines = run
    rows = {r["method"]: r for r in results["rows"]}
    assert list(rows) == [m.label for m in METHODS]
    assert results["group_size"] == 32
    # Honest bits: codes + float16 scale and zero point per group of 32.
    assert rows["fp32"]["bits_per_weight"] == 32.0
    assert rows["RTN 4-bit"]["bits_per_weight"] == pytest.approx(4 + 32 / 32)
    assert rows["RTN 2-bit"]["bits_per_weight"] == pytest.approx(2 + 32 / 32)
    assert rows["GPTQ 2-bit"]["bits_per_weight"] == pytest.approx(2 + 32 / 32)
    assert rows["RTN 2-bit"]["size_mb"] < rows["fp32"]["size_mb"]
    # The trained model beats the unigram baseline; 2-bit rounding costs perplexity.
    assert rows["fp32"]["perplexity"] < results["unigram_perplexity"]
    assert rows["RTN 2-bit"]["perplexity"] > rows["fp32"]["perplexity"]
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]
    assert (out / "perplexity_vs_bits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = "\n".join(lines)
    assert "GPTQ 2-bit" in table and "unigram baseline perplexity" in table


def test_model_is_cached_in_hf_format(run):
    results, cache, _, _ = run
    model_dir = results["model_dir"]
    assert os.path.dirname(model_dir) == str(cache)
    assert os.path.basename(model_dir) == f"quickstart-{qs.config_hash(TINY, qs.builtin_corpus())}"
    assert sorted(os.listdir(cache)) == [os.path.basename(model_dir)]  # no temporary leftovers
    assert isinstance(load_tokenizer(model_dir), ByteTokenizer)
    lines = []
    model, again_dir, record = qs.train_or_load(TINY, cache_dir=str(cache), progress=False, log=lines.append)
    assert again_dir == model_dir and lines[0].startswith("Using the cached model")
    assert record["steps"] == 80 and len(record["losses"]) == 80
    assert record["losses"][-1] < record["losses"][0]


def test_greedy_generation_from_quickstart_model_cache_equals_no_cache(run):
    model = from_pretrained(run[0]["model_dir"])
    prompt = np.asarray(ByteTokenizer().encode("The "))
    np.testing.assert_array_equal(generate(model, prompt, 24), generate(model, prompt, 24, use_cache=False))


def test_group_size_and_overhead():
    assert qs.group_size_for(qs.DEFAULT.model) == 128
    assert qs.group_size_for(qs.FAST.model) == 64
    # 2x8 codebooks of 8 (float16) over the default model's seven layers per block.
    assert qs.codebook_overhead(qs.DEFAULT.model, 2, 8, 8) == pytest.approx(7 * 2 * 256 * 8 * 16 / (4 * 256**2 + 3 * 256 * 768))


def test_config_hash_depends_on_settings():
    corpus = "abc"
    other = qs.QuickstartConfig(model=TINY.model, train=TrainConfig(steps=31, batch_size=4, seqlen=64, warmup_steps=3))
    assert qs.config_hash(TINY, corpus) == qs.config_hash(TINY, corpus)
    assert qs.config_hash(TINY, corpus) != qs.config_hash(other, corpus)
    assert qs.config_hash(TINY, corpus) != qs.config_hash(TINY, "abd")


@pytest.mark.slow
def test_fast_cli_end_to_end(tmp_path, monkeypatch):
    from jaxquant.cli import main

    monkeypatch.setenv("JAXQUANT_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["quickstart", "--fast", "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == [m.label for m in qs.MAIN_METHODS]
    # The main job's AQLM rows: one-shot, block-wise with fine-tuning, PV-Tuning.
    assert {m.kind for m in qs.MAIN_METHODS} == {"oneshot", "blocks+ft", "pv"}


def test_method_kinds_and_recipe_overrides():
    with pytest.raises(ValueError, match="kind='bogus'"):
        qs.Method("x", lambda g: None, kind="bogus")
    with pytest.raises(ValueError, match="needs a recipe"):
        qs.Method("x", None, kind="pv")
    labels = [m.label for m in qs.METHODS]
    assert len(set(labels)) == len(labels)
    kinds = {m.kind for m in qs.METHODS}
    assert kinds == set(qs.KINDS)
    aqlm = next(m for m in qs.METHODS if m.label == "AQLM 1x8 g4")
    assert qs.DEFAULT.recipe(aqlm, 128).max_rounds == qs.recipes.AQLM().max_rounds
    fast = qs.FAST.recipe(aqlm, 64)
    assert (fast.max_rounds, fast.beam_size, fast.group_size, fast.num_codebooks) == (2, 2, 4, 1)
    # Scalar recipes ignore the AQLM overrides.
    gptq = next(m for m in qs.METHODS if m.label == "GPTQ 2-bit")
    assert qs.FAST.recipe(gptq, 64) == qs.recipes.GPTQ(bits=2, group_size=64)
    # On the default model a 1x8 g4 codebook adds 0.135 bits to the 2 bits of codes.
    assert qs.codebook_overhead(qs.DEFAULT.model, 1, 8, 4) == pytest.approx(7 * 256 * 4 * 16 / (4 * 256**2 + 3 * 256 * 768))


@pytest.mark.slow
def test_global_finetune_improves_kl_without_retracing(run):
    import chex
    import jax
    import jax.numpy as jnp
    import optax

    from jaxquant import quantize, recipes
    from jaxquant.data import builtin_corpus, split_text
    from jaxquant.finetune.losses import kl_divergence
    from jaxquant.finetune.pv import VStep, pv_tuning
    from jaxquant.models import functional
    from jaxquant.qarray import is_quantized

    model = from_pretrained(run[0]["model_dir"])
    apply_fn, params = functional(model)
    qparams = quantize(params, None, recipes.RTN(bits=2, group_size=32))
    train_ids = np.asarray(ByteTokenizer().encode(split_text(builtin_corpus())["train"]), np.int32)
    held_out = jnp.asarray(train_ids[:4 * 64].reshape(4, 64))

    kl_of = jax.jit(lambda qp: kl_divergence(apply_fn(qp, held_out), apply_fn(params, held_out)))  # one program

    def kl(qp):
        return float(kl_of(qp))

    cfg = qs.TuneConfig(steps=12, batch_size=4, seqlen=64, p_lr=3e-3, v_lr=3e-3, update_fraction=0.05,
                        trust_ratio=None, buffer_decay=0.0)
    before = kl(qparams)
    seen = {}
    tuned, kls = qs.global_finetune(apply_fn, params, qparams, train_ids, cfg, mode="pv",
                                    on_step=lambda k, qp: seen.setdefault(k, qp))
    assert len(kls) == 12 and all(np.isfinite(kls))
    assert sorted(seen) == list(range(1, 13))
    # The state after step 4 of the long run is that of a 4-step run (what --eval-at relies on).
    short, _ = qs.global_finetune(apply_fn, params, qparams, train_ids, dataclasses.replace(cfg, steps=4), mode="pv")
    chex.assert_trees_all_close(seen[4], short, rtol=1e-6)
    # The buffers' Adam moments reach the V optimizer: without momentum the codes move differently.
    momentless, _ = qs.global_finetune(apply_fn, params, qparams, train_ids,
                                       dataclasses.replace(cfg, steps=4, v_b1=0.0, v_b2=0.95), mode="pv")
    with pytest.raises(AssertionError):
        chex.assert_trees_all_close(momentless, short, rtol=1e-6)
    assert kl(tuned) < 0.9 * before
    # Same steps and data in both modes, but different updates of the codes.
    ste, ste_kls = qs.global_finetune(apply_fn, params, qparams, train_ids, cfg, mode="ste")
    assert ste_kls[0] == pytest.approx(kls[0], rel=1e-6)
    def codes(tree):
        leaves = jax.tree.leaves(tree, is_leaf=is_quantized)
        return np.concatenate([np.asarray(x.codes).ravel() for x in leaves if is_quantized(x)])

    changed_pv = np.mean(codes(tuned) != codes(qparams))
    assert 0 < changed_pv <= 12 * 0.05 + 1e-9  # at most the requested fraction per step
    assert np.mean(codes(ste) != codes(qparams)) > 0

    # One compilation of the distillation step for every step.
    tuner = pv_tuning(optax.adam(1e-3), optax.adam(1e-3), VStep(update_fraction=0.05))
    traced = chex.assert_max_traces(apply_fn, n=2)  # student + teacher per trace

    def loss_fn(p, teacher, tokens):
        return losses.distillation_loss(traced, traced, teacher)(p, tokens)

    step = distill_module._step_fn(tuner, loss_fn, None, 1)
    qp = jax.tree.map(jnp.copy, qparams)
    state = jax.jit(tuner.init)(qp)
    for i in range(3):
        qp, state, _ = step(qp, state, params, jnp.asarray(train_ids[i * 256:(i + 1) * 256].reshape(4, 64)))


TINY_AQLM = dataclasses.replace(
    TINY,
    block_finetune=qs.BlockFinetuneConfig(lr=1e-3, max_epochs=2),
    tune=qs.TuneConfig(steps=4, batch_size=4, seqlen=64, beam_size=2),
    aqlm_overrides=(("max_rounds", 1), ("adam_steps", 5), ("beam_size", 2), ("kmeans_iters", 5)),
)


def test_tune_config_for_mode():
    cfg = qs.TuneConfig(v_lr=5e-3, ste_v_lr=1e-3, trust_ratio=0.005, buffer_decay=0.1, force_update=True)
    assert cfg.for_mode("pv") == cfg
    ste = cfg.for_mode("ste")
    assert (ste.v_lr, ste.buffer_decay, ste.force_update) == (1e-3, 0.0, False)
    # Nothing else differs.
    assert dataclasses.replace(ste, v_lr=cfg.v_lr, buffer_decay=cfg.buffer_decay, force_update=True) == cfg
    with pytest.raises(ValueError, match="mode='both'"):
        cfg.for_mode("both")


@pytest.mark.parametrize("field", ["v_b1", "v_b2"])
def test_tune_config_rejects_adam_moments_outside_unit_interval(field):
    with pytest.raises(ValueError, match=f"{field}=1.0 must lie in"):
        qs.TuneConfig(**{field: 1.0})


def test_aqlm_pipeline_and_tuning_rows(run, tmp_path):
    cache = os.path.dirname(run[0]["model_dir"])
    labels = ("AQLM 1x8 g4", "AQLM-blk 1x8 g4", "AQLM+FT 1x8 g4", "PV 1x8 g4", "STE 1x8 g4")
    methods = tuple(m for m in qs.METHODS if m.label in labels)
    results = qs.run_quickstart(config=TINY_AQLM, out_dir=str(tmp_path), cache_dir=cache, methods=methods,
                                progress=False, log=lambda _: None)
    rows = {r["method"]: r for r in results["rows"]}
    assert set(rows) == set(labels)
    # The same codes format everywhere: 8 code bits per 4 weights + a 256 x 4 float16 codebook per layer
    # (d = 32: 4 layers of 32 x 32 + 3 of 32 x 64 or 64 x 32 = 10240 weights) + a float16 scale per row.
    expected = 2 + (7 * 256 * 4 * 16 + 16 * (4 * 32 + 2 * 64 + 32)) / 10240
    for r in rows.values():
        assert r["bits_per_weight"] == pytest.approx(expected)
        assert np.isfinite(r["perplexity"]) and r["peak_rss_mb"] > 0
    assert rows["AQLM+FT 1x8 g4"]["block_rel_errors_finetuned"][0] <= rows["AQLM+FT 1x8 g4"]["block_rel_errors"][0]
    assert rows["AQLM-blk 1x8 g4"]["block_rel_errors_finetuned"] == [None]
    for label in ("PV 1x8 g4", "STE 1x8 g4"):
        tune = rows[label]["tune"]
        assert tune["mode"] == rows[label]["kind"] and tune["steps"] == 4
        # Each mode runs with its own V-step rate; straight-through without buffer decay.
        want = dataclasses.asdict(TINY_AQLM.tune.for_mode(tune["mode"]))
        assert {k: tune[k] for k in want} == want
        # Tuning rows count the block fine-tuned start they build on.
        assert rows[label]["seconds"] >= rows["AQLM+FT 1x8 g4"]["seconds"]


def test_quantized_quickstart_model_same_greedy_tokens_through_every_implementation(run):
    """Issue 5's criterion on the trained model: 2x8 AQLM kernels, each CPU implementation forced."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxquant import quantize, recipes
    from jaxquant.calibrate import calibrate
    from jaxquant.models.random_quantized import use_matmul_impl
    from jaxquant.ops import cpu_ffi
    from jaxquant.qarray import dequantize

    model = from_pretrained(run[0]["model_dir"])
    tokenizer = ByteTokenizer()
    text = qs.split_text(qs.builtin_corpus())["train"]
    calib = [jnp.asarray(np.asarray(tokenizer.encode(text[i * 256:(i + 1) * 256]), np.int32).reshape(4, 64))
             for i in range(4)]
    stats = calibrate(model, calib)
    recipe = recipes.AQLM(num_codebooks=2, codebook_bits=8, group_size=8, max_rounds=1, adam_steps=10,
                          beam_size=2, kmeans_iters=5)
    qstate = quantize(nnx.state(model), stats, recipe)
    prompt = np.asarray(tokenizer.encode("The "))
    impls = (["cpu_ffi"] if cpu_ffi.available() else []) + ["xla_lut", "xla_decode", "reference"]
    generated = {}
    for impl in impls:
        graph_only = abstract_model(model.config)
        use_matmul_impl(graph_only, impl)
        generated[impl] = generate(graph_only, prompt, 20, params=qstate, bucket=32)
    for impl, tokens in generated.items():
        np.testing.assert_array_equal(tokens, generated["reference"], err_msg=f"impl={impl}")
    # The dense model with the decoded weights agrees (teacher-forced), with no near ties.
    dense = nnx.merge(nnx.graphdef(model), dequantize(qstate))
    seq = np.concatenate([prompt, generated["reference"][:-1]])[None]
    logits = np.asarray(jax.jit(lambda m, t: m(t))(dense, jnp.asarray(seq)))[0, len(prompt) - 1:]
    np.testing.assert_array_equal(np.argmax(logits, -1), generated["reference"])
    top2 = np.sort(logits, -1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-4


@pytest.mark.slow
def test_reference_quickstart_on_a_small_gguf_model(tmp_path):
    """The main job's whole path (GGUF model, calibration, GPTQ, AQLM, PV, two held-out texts,
    samples, table, plot) on a random 2-layer Llama written as GGUF; SmolLM2 runs it at full size."""
    from gguf_files import write_llama_gguf

    from jaxquant.reference_quickstart import ReferenceConfig, Row, run_reference_quickstart

    path = tmp_path / "tiny.gguf"
    write_llama_gguf(path, tied=True)
    aqlm = jq.AQLM(num_codebooks=1, codebook_bits=4, group_size=4, beam_size=1, max_rounds=1, adam_steps=5,
                   kmeans_iters=3)
    rows = (Row("float32", None, "float"), Row("GPTQ 2-bit g64", jq.GPTQ(bits=2, group_size=64)),
            Row("AQLM", aqlm), Row("AQLM + PV", aqlm, "pv"))
    cfg = ReferenceConfig(model=str(path), eval_seqlen=32, eval_windows=3, calib_windows=8, calib_seqlen=32,
                          tune=qs.TuneConfig(steps=3, batch_size=2, seqlen=32, beam_size=2), sample_tokens=5)
    lines = []
    out = tmp_path / "out"
    res = run_reference_quickstart(out_dir=str(out), rows=rows, config=cfg, progress=False, log=lines.append)
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(res["rows"]))
    assert (out / "perplexity_vs_bits.png").read_bytes()[:4] == b"\x89PNG"
    by = {r["method"]: r for r in res["rows"]}
    assert list(by) == [r.label for r in rows]
    assert by["float32"]["bits_per_weight"] == 32.0
    assert by["GPTQ 2-bit g64"]["bits_per_weight"] == pytest.approx(2.5)  # 2 code bits + fp16 scale/zero per 64
    assert 1.0 < by["AQLM"]["bits_per_weight"] == by["AQLM + PV"]["bits_per_weight"] < 2.0
    for r in res["rows"]:
        assert math.isfinite(r["ppl"]) and math.isfinite(r["ppl_second"]) and r["ppl"] > 1.0
        assert isinstance(r["sample"], str) and r["sample"]
    # Tuning moved the model: the PV row is a different model from its AQLM start.
    assert by["AQLM + PV"]["ppl"] != by["AQLM"]["ppl"] and by["AQLM + PV"]["tune"]["steps"] == 3
    assert res["eval"]["texts"] == {"builtin validation": 96, "stdlib-docs": 96}
    assert any("Greedy continuations" in line for line in lines)


def test_config_hash_ignores_the_router_coefficient_of_a_dense_model():
    corpus = "abc"
    other_coef = qs.QuickstartConfig(model=TINY.model, train=dataclasses.replace(TINY.train, router_aux_loss_coef=0.5))
    assert qs.config_hash(TINY, corpus) == qs.config_hash(other_coef, corpus)
    moe = dataclasses.replace(TINY.model, architecture="mixtral", num_experts=4, experts_per_token=2)
    assert (qs.config_hash(dataclasses.replace(TINY, model=moe), corpus)
            != qs.config_hash(dataclasses.replace(other_coef, model=moe), corpus))
