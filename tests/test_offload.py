"""Expert offloading: the store's tiers, the LRU cache, speculative prefetch, and greedy
tokens equal to the model's own with every expert in memory."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant.models import LlamaForCausalLM, ModelConfig, abstract_model, functional, generate
from jaxquant.models.offload import ExpertCache, ExpertStore, OffloadedGenerator

CFG = ModelConfig(architecture="mixtral", hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                  num_kv_heads=2, head_dim=8, vocab_size=64, max_position_embeddings=64, num_experts=4,
                  experts_per_token=2)
PROMPT = np.array([3, 17, 42, 5, 9, 11], np.int32)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    model = LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))
    # Larger weights than the initialiser's: routing and tokens then vary with the input.
    nnx.update(model, jax.tree.map(lambda a: a * 8.0 if a.ndim == 2 else a, nnx.state(model)))
    return model


@pytest.fixture(scope="module")
def reference(model) -> np.ndarray:
    return generate(model, PROMPT, 12)


@pytest.mark.parametrize("tier, cache_size, prefetch", [("disk", 1, True), ("disk", 2, False), ("host", 2, True),
                                                        ("host", 4, True), ("host", 0, False)])
def test_offloaded_greedy_tokens_equal_the_whole_model(model, reference, tmp_path, tier, cache_size, prefetch):
    store = ExpertStore.from_params(nnx.state(model), tier, tmp_path / "experts")
    assert len(store) == 3 * 4
    gen = OffloadedGenerator(model, store, cache_size=cache_size, prefetch=prefetch)
    streamed = []
    try:
        got = gen.generate(PROMPT, 12, on_token=streamed.append)
    finally:
        gen.close()
    np.testing.assert_array_equal(got, reference)
    assert streamed == got.tolist()
    stats = gen.cache.stats
    summary = stats.summary()
    # Two experts per token and layer, over the prompt's union of experts and 11 single tokens.
    assert 3 * 2 * 11 <= summary["lookups"] <= 3 * 4 + 3 * 2 * 11
    misses = summary["lookups"] - summary["hits"] - summary["prefetch_hits"]
    expert_bytes = store.nbytes(0, 0)
    assert summary["bytes_moved"] == (misses + stats.prefetched) * expert_bytes
    if cache_size == 4:  # every expert fits: each is loaded once at most
        assert misses + stats.prefetched <= 12
    if cache_size == 0:  # nothing kept: every lookup loads
        assert misses == summary["lookups"]
    if prefetch:
        assert stats.guesses > 0 and 0.0 <= summary["prefetch_accuracy"] <= 1.0
    else:
        assert stats.prefetched == 0 and summary["prefetch_hits"] == 0


QWEN2_MOE = ModelConfig(architecture="qwen2_moe", hidden_size=32, intermediate_size=40, num_layers=4, num_heads=4,
                        num_kv_heads=2, head_dim=8, vocab_size=64, max_position_embeddings=64, num_experts=4,
                        experts_per_token=2, expert_size=16, shared_expert_size=24, normalize_routing=False,
                        dense_layers=(1,), qkv_bias=True)


@pytest.mark.parametrize("prefetch", [True, False])
def test_qwen2_moe_offloads_with_a_shared_expert_and_a_dense_layer(tmp_path, prefetch):
    # Qwen2-MoE's pieces outside the routed experts stay resident: the gated shared expert
    # of every sparse layer and the whole dense layer 1; the store holds only routed experts.
    model = LlamaForCausalLM(QWEN2_MOE, rngs=nnx.Rngs(1))
    nnx.update(model, jax.tree.map(lambda a: a * 8.0 if a.ndim == 2 else a, nnx.state(model)))
    store = ExpertStore.from_params(nnx.state(model), "disk", tmp_path / "experts")
    assert len(store) == 3 * 4 and (1, 0) not in store and all((i, j) in store for i in (0, 2, 3) for j in range(4))
    gen = OffloadedGenerator(model, store, cache_size=2, prefetch=prefetch)
    try:
        np.testing.assert_array_equal(gen.generate(PROMPT, 12), generate(model, PROMPT, 12))
    finally:
        gen.close()
    if prefetch:  # layer 2 guesses layer 3's experts; layer 0 guesses nothing (layer 1 is dense)
        assert gen.cache.stats.guesses > 0


def test_quantized_experts_offload_from_disk(model, tmp_path):
    apply_fn, params = functional(model)
    q = jq.quantize(params, None, [("experts", jq.RTN(bits=2, group_size=16)), ("attn", jq.RTN(bits=4, group_size=16))])
    want = generate(model, PROMPT, 6, params=q)
    store = ExpertStore.from_params(q, "disk", tmp_path)
    # A quantized expert moves its codes (a byte each for RTN) and scales, not float32 weights.
    assert store.nbytes(0, 0) < 0.35 * 3 * 32 * 48 * 4
    assert jq.is_quantized(store.read(1, 2)["up_proj"]["kernel"].get_value())
    abstract = abstract_model(CFG)
    gen = OffloadedGenerator(abstract, store, cache_size=2, params=q)
    try:
        np.testing.assert_array_equal(gen.generate(PROMPT, 6), want)
    finally:
        gen.close()


def test_disk_tier_without_page_cache_drops_every_file_it_writes_and_reads(model, reference, tmp_path, monkeypatch):
    dropped = []
    real_drop = ExpertStore._drop_pages
    monkeypatch.setattr(ExpertStore, "_drop_pages", staticmethod(lambda name: (dropped.append(name), real_drop(name))))
    store = ExpertStore.from_params(nnx.state(model), "disk", tmp_path, page_cache=False)
    files = sorted(str(f) for f in tmp_path.glob("*.npy"))
    assert sorted(dropped) == files  # each file once, after it was written
    dropped.clear()
    gen = OffloadedGenerator(model, store, cache_size=1, prefetch=True)
    try:
        np.testing.assert_array_equal(gen.generate(PROMPT, 12), reference)
    finally:
        gen.close()
    loads = gen.cache.stats.bytes_moved // store.nbytes(0, 0)
    arrays_per_expert = len(files) // len(store)
    assert len(dropped) == loads * arrays_per_expert  # every load read its files and dropped them
    with pytest.raises(ValueError, match="page_cache=False"):
        ExpertStore("host", page_cache=False)


def test_lru_cache_evicts_the_least_recently_used(model, tmp_path):
    store = ExpertStore.from_params(nnx.state(model), "host")
    cache = ExpertCache(store, capacity=2, num_layers=3, prefetch_threads=0)
    for e in (0, 1, 0, 2, 1):  # 2 evicts 1 (0 was used since); then 1 evicts 0
        cache.get(0, e)
    assert cache.stats.lookups[0] == 5 and cache.stats.hits[0] == 1
    assert list(cache._lru[0]) == [2, 1]
    for a, b in zip(jax.tree.leaves(cache.get(0, 2)), jax.tree.leaves(nnx.state(model.layers[0].mlp.experts[2]))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_known_loads_ahead_are_misses_and_guesses_are_prefetch_hits(model, tmp_path):
    store = ExpertStore.from_params(nnx.state(model), "disk", tmp_path)
    cache = ExpertCache(store, capacity=2, num_layers=3, prefetch_threads=1)
    try:
        cache.prefetch(0, [1, 3], guess=False)  # needed now: loaded ahead, but not hits
        cache.prefetch(1, [2])  # a guess for the next layer
        for layer, e in ((0, 1), (0, 3), (1, 2)):
            cache.get(layer, e)
        stats = cache.stats
        assert stats.lookups == [2, 1, 0] and stats.hits == [0, 0, 0] and stats.prefetch_hits == [0, 1, 0]
        assert stats.prefetched == 1 and stats.bytes_moved == 3 * store.nbytes(0, 0)
        for a, b in zip(jax.tree.leaves(cache.get(0, 3)), jax.tree.leaves(nnx.state(model.layers[0].mlp.experts[3]))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    finally:
        cache.close()


def test_a_truncated_expert_file_is_named(model, tmp_path):
    store = ExpertStore.from_params(nnx.state(model), "disk", tmp_path)
    name = sorted(tmp_path.glob("layer1-expert2-*.npy"))[0]
    data = name.read_bytes()
    name.write_bytes(data[: len(data) // 4])
    with pytest.raises(OSError, match=f"{name.name}: the file has"):
        store.read(1, 2)


def test_bad_offload_input_is_named(model, tmp_path):
    with pytest.raises(ValueError, match="tier must be one of"):
        ExpertStore("ssd")
    with pytest.raises(ValueError, match="needs a directory"):
        ExpertStore("disk")
    store = ExpertStore("host")
    with pytest.raises(ValueError, match="the store lacks 12 experts"):
        OffloadedGenerator(model, store, cache_size=2)
    with pytest.raises(KeyError, match="no expert 1 of layer 0"):
        store.read(0, 1)
    dense = LlamaForCausalLM(ModelConfig(hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                                         num_kv_heads=2, head_dim=8, vocab_size=64), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="needs a mixture of experts"):
        OffloadedGenerator(dense, store, cache_size=2)
    full = ExpertStore.from_params(nnx.state(model), "host")
    gen = OffloadedGenerator(model, full, cache_size=2, prefetch=False)
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        gen.generate(PROMPT, 60)
    with pytest.raises(ValueError, match=r"must be in \[0, 64\)"):
        gen.generate(np.array([70]), 2)
    with pytest.raises(ValueError, match="capacity must be an int >= 0"):
        ExpertCache(full, -1, 3)


def test_a_second_generator_compiles_nothing_new(model, reference):
    from jaxquant.models import offload

    store = ExpertStore.from_params(nnx.state(model), "host")
    jitted = (offload._front, offload._guess, offload._expert, offload._embed, offload._head, offload._dense_layer)
    first = OffloadedGenerator(model, store, cache_size=2)
    np.testing.assert_array_equal(first.generate(PROMPT, 12), reference)
    sizes = [f._cache_size() for f in jitted]
    second = OffloadedGenerator(model, store, cache_size=3, prefetch=False)
    np.testing.assert_array_equal(second.generate(PROMPT, 12), reference)
    assert [f._cache_size() for f in jitted] == sizes
    first.close(), second.close()


def test_offload_benchmark_runs_at_a_tiny_shape(tmp_path):
    import json

    from benchmark_scripts import load

    report = load("moe_offload").main(["--work", str(tmp_path), "--shape", "tiny", "--new-tokens", "3",
                                       "--caches", "2", "--repeats", "2", "--out", str(tmp_path / "r.json")])
    assert report["same_tokens"] and len(report["rows"]) == 3
    saved = json.loads((tmp_path / "r.json").read_text())
    assert [(r["cache_size"], r["prefetch"]) for r in saved["rows"]] == [(0, False), (2, False), (2, True)]
    assert saved["rows"][0]["hit_rate"] == 0.0 and saved["expert_bytes_on_disk"] > 0
    assert all(len(r["all_decode_tokens_per_s"]) == 2 for r in saved["rows"])


def test_disk_tier_round_trips_every_dtype_and_shape(tmp_path):
    import ml_dtypes

    tree = {"a": np.arange(6, dtype=np.uint16).reshape(2, 3), "b": np.float32(2.5) * np.ones((), np.float32),
            "c": np.linspace(-1, 1, 8).astype(ml_dtypes.bfloat16).reshape(2, 2, 2)}
    store = ExpertStore("disk", tmp_path)
    store.put(0, 0, tree)
    back = store.read(0, 0)
    for k, v in tree.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)
    assert store.nbytes(0, 0) == 12 + 4 + 16 and (0, 0) in store and (0, 1) not in store
