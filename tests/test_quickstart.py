"""The quickstart main job: cached training, the comparison table, results.json and plot."""

import json
import os

import numpy as np
import pytest

from jaxquant import quickstart as qs
from jaxquant.data import ByteTokenizer, load_tokenizer
from jaxquant.models import ModelConfig, from_pretrained, generate
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
    assert [r["method"] for r in rows] == [m.label for m in qs.METHODS]
