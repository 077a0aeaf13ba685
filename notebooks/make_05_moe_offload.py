"""Write ``notebooks/05_moe_offload.ipynb`` (outputs cleared) from the cells below.

    python notebooks/make_05_moe_offload.py
"""

from __future__ import annotations

from pathlib import Path

from notebook_builder import write

CELLS = [
    ("md", """# Mixture of experts: quantize per expert, generate with the experts offloaded

In a mixture of experts (Mixtral and its family) most weights sit in experts, and each
token uses only a few of them. jaxquant exploits both facts (Eliseev and Mazur, 2023):

1. **Per-expert quantization.** Calibration counts, for each expert, only the tokens the
   router sent to it; a recipe map gives attention, experts and router their own recipes.
2. **Offloading.** `OffloadedGenerator` keeps the quantized experts in a slow tier (files
   on disk here; host memory when there is an accelerator) and a small LRU cache of each
   layer's recent experts in fast memory.
3. **Speculative prefetch.** While layer *i* runs, the router of layer *i + 1* is applied
   to layer *i*'s hidden state: its guess is read in by a background thread.

This notebook trains a tiny byte-level Mixtral (about a minute), quantizes it, and watches
the expert cache at work. The speed figures of a Mixtral-8x7B-shaped model are in the
README (`benchmarks/moe_offload.py`)."""),
    ("code", """import tempfile
import time

import jax
import matplotlib.pyplot as plt
import numpy as np

import jaxquant as jq
from jaxquant import quickstart as qs
from jaxquant.data import ByteTokenizer, builtin_corpus, calibration_windows, split_text
from jaxquant.eval import perplexity
from jaxquant.models import functional, generate
from jaxquant.models.offload import ExpertStore, OffloadedGenerator"""),
    ("md", """## 1. A tiny trained mixture of experts

`quickstart.MOE_FAST`: 4 layers, 8 experts per layer, 2 picked per token, trained with
the router's load-balancing loss on the built-in corpus (cached after the first run)."""),
    ("code", """model, model_dir, record = qs.train_or_load(qs.MOE_FAST, progress=False)
config = model.config
print(config.architecture, config.num_layers, "layers,", config.num_experts, "experts of which",
      config.experts_per_token, "per token;", f"{config.num_params() / 1e6:.2f} M parameters")
tok = ByteTokenizer()
parts = split_text(builtin_corpus())
train_tokens = np.asarray(tok.encode(parts["train"]), np.int32)
val_tokens = np.asarray(tok.encode(parts["validation"]), np.int32)
apply_fn, params = functional(model)
print("float32 validation perplexity", round(perplexity(apply_fn, params, val_tokens, 128), 3))"""),
    ("md", """## 2. Quantize: attention at 4 bits, experts at 2, router in float

Patterns pick the recipes (first match wins); the router matches none and stays as it
is. Every expert is calibrated on its own tokens: the records say how many it saw."""),
    ("code", """recipe = {"/attn/": jq.GPTQ(bits=4, group_size=64), "/experts/": jq.GPTQ(bits=2, group_size=64)}
windows = calibration_windows(train_tokens, 32, 128, seed=0)
result = jq.pipeline.quantize_model(model, windows, recipe, key=jax.random.key(0), progress=False)
qparams = result.params
print("bits per weight:", round(jq.tree_bits(qparams)["bits_per_weight"], 3))
print("quantized validation perplexity", round(perplexity(apply_fn, qparams, val_tokens, 128), 3))
tokens_seen = np.zeros((config.num_layers, config.num_experts), int)
for rec in result.layers:
    if rec["name"].endswith("gate_proj/kernel"):
        layer, expert = int(rec["name"].split("/")[1]), int(rec["name"].split("/")[4])
        tokens_seen[layer, expert] = rec["calibration_tokens"]
print("calibration tokens per expert (rows: layers)")
print(tokens_seen)"""),
    ("md", """## 3. Offload the experts to disk and generate

The store writes each expert's quantized arrays to files; the generator keeps the rest of
the model resident. With or without the cache and the prefetch, the greedy tokens are
those of `jaxquant.models.generate` on the whole quantized model."""),
    ("code", """work = tempfile.mkdtemp(prefix="jaxquant-experts-")
store = ExpertStore.from_params(qparams, "disk", work)
print(len(store), "experts on disk,", store.nbytes(0, 0), "bytes each")
prompt = np.asarray(tok.encode("The for statement"), np.int32)
new_tokens = 48
reference = generate(model, prompt, new_tokens, params=qparams)
print(repr(tok.decode(list(prompt) + reference.tolist())))"""),
    ("md", """### The cache at work

An LRU cache of 2 experts per layer with the prefetch on. After every token the cache's
counters are read, giving each layer's hit rate so far."""),
    ("code", """gen = OffloadedGenerator(model, store, cache_size=2, prefetch=True, params=qparams)
history = []
try:
    tokens = gen.generate(prompt, new_tokens, on_token=lambda _: history.append(
        [(h + p) / max(n, 1) for h, p, n in zip(gen.cache.stats.hits, gen.cache.stats.prefetch_hits,
                                                gen.cache.stats.lookups)]))
finally:
    gen.close()
assert np.array_equal(tokens, reference), "offloading must not change the tokens"
summary = gen.cache.stats.summary()
print({k: round(v, 3) if isinstance(v, float) else v for k, v in summary.items() if k != "hit_rate_per_layer"})
history = np.asarray(history)
fig, ax = plt.subplots(figsize=(6, 3.5))
for layer in range(config.num_layers):
    ax.plot(np.arange(1, len(history) + 1), history[:, layer], label=f"layer {layer}")
ax.set_xlabel("tokens generated"); ax.set_ylabel("hit rate so far"); ax.set_ylim(0, 1); ax.legend(); plt.show()"""),
    ("md", """### Tokens per second against the cache size

Each setting decodes the same prompt (the first run of the loop compiles). On a model this
small the cost is mostly Python and dispatch, so the differences are small; the
Mixtral-8x7B shape in the README shows them at full size."""),
    ("code", """rows = []
for cache_size in (0, 1, 2, 4, 8):
    for prefetch in ((False,) if cache_size == 0 else (False, True)):
        gen = OffloadedGenerator(model, store, cache_size=cache_size, prefetch=prefetch, params=qparams)
        arrivals = []
        try:
            tokens = gen.generate(prompt, new_tokens, on_token=lambda _: arrivals.append(time.perf_counter()))
        finally:
            gen.close()
        assert np.array_equal(tokens, reference)
        rows.append((cache_size, prefetch, (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]),
                     gen.cache.stats.hit_rate(), gen.cache.stats.prefetch_accuracy()))
        print(f"cache {cache_size}, prefetch {prefetch!s:5}: {rows[-1][2]:6.1f} tokens/s, hit rate {rows[-1][3]:.2f}, "
              f"prefetch accuracy {rows[-1][4]:.2f}")
fig, ax = plt.subplots(figsize=(5, 3.5))
for prefetch in (False, True):
    pts = [(c, s) for c, p, s, _, _ in rows if p == prefetch or c == 0]
    ax.plot(*zip(*pts), marker="o", label="LRU + prefetch" if prefetch else "LRU")
ax.set_xlabel("experts cached per layer"); ax.set_ylabel("tokens / s"); ax.legend(); plt.show()"""),
]


if __name__ == "__main__":
    write(CELLS, Path(__file__).with_name("05_moe_offload.ipynb"), id_prefix="moe")
