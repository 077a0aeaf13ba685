"""Write ``notebooks/03_kernels.ipynb`` (outputs cleared) from the cells below.

    python notebooks/make_03_kernels.py
"""

from __future__ import annotations

from pathlib import Path

from notebook_builder import write

CELLS = [
    ("md", """# Decode kernels: memory and speed of a quantized model against dense

At batch size 1, generating a token multiplies a vector by every weight matrix once: the
time goes into *reading the weights*. A 2×8 AQLM weight (two 8-bit codes per group of 8
inputs, ≈ 2 bits per weight) holds 1/16 of the bytes of float32. `jaxquant.ops.matmul`
turns that into speed on CPU with a **lookup-table GEMV**: per group of 8 inputs, the dot
products of `x` with all 256 codewords of each codebook are computed once, then every
output row just gathers and sums by its codes — the dense weight is never built.

This notebook measures, on the CPU it runs on (no GPU needed):
1. **memory** — parameter bytes of Llama-2-7B shapes quantized, counted without allocating anything;
2. **one layer** — `x @ W` for a 4096×4096 layer, dense float32 against each CPU implementation;
3. **generation** — tokens per second of greedy decoding, dense against quantized, and that both produce the same tokens.

Weights are random (speed does not depend on the values). Timings on a shared machine are
noisy: compare the ratios within one run."""),
    ("code", """import os
import statistics
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from jaxquant.models import LlamaForCausalLM, ModelConfig, generate
from jaxquant.models.random_quantized import random_additive, random_quantized_state, resident_bytes
from jaxquant.ops import cpu_ffi, dispatch, matmul
from jaxquant.qarray import dequantize, tree_bits

print('jax', jax.__version__, '| backend:', jax.default_backend(), '| CPUs:', os.cpu_count(),
      '| load average:', os.getloadavg())
print('native CPU kernel (cpu_ffi) available:', cpu_ffi.available())"""),
    ("md", """## 1. Memory: a 7B-shaped model, counted abstractly

`nnx.eval_shape` gives the parameter shapes of Llama-2-7B without allocating its 27 GB;
`random_quantized_state(..., abstract=True)` says what each quantized leaf would hold.
Embeddings and the head are kept dense (AQLM checkpoints keep them in 16 bits)."""),
    ("code", """LLAMA2_7B = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                        num_heads=32, num_kv_heads=32, head_dim=128, max_position_embeddings=4096)
_, shapes = nnx.split(nnx.eval_shape(lambda: LlamaForCausalLM(LLAMA2_7B, rngs=nnx.Rngs(0))))

sizes = {
    'dense float32': resident_bytes(shapes),
    'dense bfloat16': resident_bytes(jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16), shapes)),
}
for m, b, label in [(1, 16, 'AQLM 1x16 g8'), (2, 8, 'AQLM 2x8 g8'), (1, 8, 'AQLM 1x8 g8')]:
    q = random_quantized_state(shapes, 0, num_codebooks=m, codebook_bits=b, dense_dtype=jnp.bfloat16, abstract=True)
    sizes[label] = resident_bytes(q)
dense = sizes['dense float32']
for label, n in sizes.items():
    print(f'{label:>15}: {n / 2**30:6.2f} GiB  = 1/{dense / n:5.2f} of float32')
assert sizes['AQLM 2x8 g8'] * 12 <= dense  # the issue's bar: at most 1/12 of float32"""),
    ("md", """Codes of 16-bit codebooks (1×16) take two bytes in memory, like 2×8; their
codebooks are 65536 × 8 floats per layer. What remains besides the codes is mostly the
dense embedding and head (2 × 32000 × 4096 in bfloat16 ≈ 0.5 GiB)."""),
    ("code", """fig, ax = plt.subplots(figsize=(7, 3))
labels = list(sizes)
ax.barh(labels, [sizes[k] / 2**30 for k in labels], color=['#999', '#bbb', '#4c72b0', '#4c72b0', '#55a868'])
for i, k in enumerate(labels):
    ax.text(sizes[k] / 2**30, i, f' {sizes[k] / 2**30:.1f} GiB', va='center')
ax.axvline(24, color='r', ls='--', lw=1)
ax.text(24, len(labels) - 0.5, ' 24 GiB machine', color='r', va='center')
ax.set_xlabel('parameter bytes (GiB)')
ax.set_title('Llama-2-7B shapes: parameter memory')
ax.invert_yaxis()
plt.tight_layout()
plt.show()"""),
    ("md", """## 2. One layer: `x @ W` at batch size 1

A 4096×4096 layer (one of Llama-2-7B's attention projections). The dense baseline is
float32 `lax.dot_general` contracting the weight's input axis (the best dense form on
CPU). Each quantized implementation is forced by name; the dispatcher's own choice is
printed too. Candidates are timed in alternation and the medians compared."""),
    ("code", """def interleaved_ms(fns, repeats=15, warmup=2):
    for f in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(f())
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(f())
            times[k].append(time.perf_counter() - t)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


d = 4096
w_q = random_additive(0, d, d)  # 2x8 g8, Flax (d_in, d_out) layout
w_dense = w_q.decode(jnp.float32)  # the same weight, dense (d_in, d_out)
x = jnp.asarray(np.random.default_rng(1).standard_normal((1, d)), jnp.float32)
print(w_q)
print('dispatcher picks:', dispatch.select_impl(x, w_q))

impls = [i for i in ('cpu_ffi', 'xla_lut', 'xla_decode') if i != 'cpu_ffi' or cpu_ffi.available()]
dense_matmul = jax.jit(lambda x, w: matmul(x, w))
fns = {'dense f32': lambda: dense_matmul(x, w_dense)}
for impl in impls:
    f = jax.jit(lambda x, w, impl=impl: matmul(x, w, impl=impl))
    fns[impl] = lambda f=f: f(x, w_q)
ref = np.asarray(fns['dense f32']())
for impl in impls:  # every implementation computes the same product
    np.testing.assert_allclose(np.asarray(fns[impl]()), ref, rtol=2e-3, atol=2e-3)
layer_ms = interleaved_ms(fns)
for k, v in layer_ms.items():
    print(f'{k:>10}: {v:7.3f} ms   {layer_ms["dense f32"] / v:5.2f}x dense')"""),
    ("code", """fig, ax = plt.subplots(figsize=(6, 2.8))
ax.bar(list(layer_ms), list(layer_ms.values()), color=['#999'] + ['#4c72b0'] * len(impls))
ax.set_ylabel('ms per call (median)')
ax.set_title(f'x @ W, {d}x{d}, batch 1 (load {os.getloadavg()[0]:.1f})')
plt.tight_layout()
plt.show()"""),
    ("md", """## 3. Greedy generation, dense against quantized

A two-block Llama with hidden size 2048 (d_ff 5504, 16 heads): big enough that weight
traffic dominates a decode step, small enough for this notebook. The quantized model is
random 2×8; the dense model holds **exactly the decoded weights**, so both must generate
the same greedy tokens. Decode speed is measured as in `benchmarks/generate.py`:
`generate(prompt, N)` minus `generate(prompt, 1)` at the same buffer length leaves
`N − 1` decode steps of the jit-compiled loop."""),
    ("code", """cfg = ModelConfig(vocab_size=256, hidden_size=2048, intermediate_size=5504, num_layers=2, num_heads=16,
                  num_kv_heads=16, head_dim=128, max_position_embeddings=128)
model = nnx.eval_shape(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))  # graph only
_, shapes = nnx.split(model)
q_params = random_quantized_state(shapes, 0)
d_params = dequantize(q_params)
print(f"quantized: {resident_bytes(q_params) / 2**20:.1f} MiB ({tree_bits(q_params)['bits_per_weight']:.3f} bits/weight "
      f"on the kernels) | dense: {resident_bytes(d_params) / 2**20:.1f} MiB")

prompt = np.arange(8, dtype=np.int32) * 11
N = 24
runs = {'dense f32': d_params, 'quantized 2x8': q_params}
tokens = {k: generate(model, prompt, N, params=p, bucket=len(prompt) + N) for k, p in runs.items()}  # compiles
for k, t in tokens.items():
    print(f'{k:>14}: {t.tolist()}')
np.testing.assert_array_equal(tokens['quantized 2x8'], tokens['dense f32'])"""),
    ("code", """fns = {}
for k, p in runs.items():
    fns[(k, N)] = lambda p=p: generate(model, prompt, N, params=p, bucket=len(prompt) + N)
    fns[(k, 1)] = lambda p=p: generate(model, prompt, 1, params=p, bucket=len(prompt) + N)
gen_ms = interleaved_ms(fns, repeats=3, warmup=1)
decode_ms = {k: (gen_ms[(k, N)] - gen_ms[(k, 1)]) / (N - 1) for k in runs}
for k in runs:
    print(f'{k:>14}: {decode_ms[k]:6.2f} ms/token = {1e3 / decode_ms[k]:6.1f} tokens/s; '
          f'first token {gen_ms[(k, 1)]:.0f} ms | {decode_ms["dense f32"] / decode_ms[k]:.2f}x dense')

fig, axes = plt.subplots(1, 2, figsize=(9, 2.8))
mib = {'dense f32': resident_bytes(d_params) / 2**20, 'quantized 2x8': resident_bytes(q_params) / 2**20}
axes[0].bar(list(mib), list(mib.values()), color=['#999', '#4c72b0'])
axes[0].set_ylabel('parameter MiB')
axes[1].bar(list(decode_ms), [1e3 / v for v in decode_ms.values()], color=['#999', '#4c72b0'])
axes[1].set_ylabel('decode tokens / s')
fig.suptitle(f'2-block Llama, hidden 2048, batch 1 (load {os.getloadavg()[0]:.1f})')
plt.tight_layout()
plt.show()"""),
    ("md", """## What to take away

- Memory: 2×8 AQLM puts the 27 GB float32 Llama-2-7B into about 2 GB, below 1/12 of
  float32; `benchmarks/memory_7b.py` actually builds that model on a 24 GiB machine and
  generates tokens from it.
- Speed: the native lookup-table kernel reads a quarter of a byte per weight instead of
  four; at Llama-2-7B layer sizes it beats the dense float32 product
  (`benchmarks/decode.py`, `benchmarks/generate.py`). On tiny layers that fit in cache
  (the quickstart model) the dense product is as fast or faster: there is no memory
  traffic to save.
- Every implementation computes the same product, so the quantized model generates the
  same tokens whichever one runs (`tests/test_generate_impls.py`)."""),
]


if __name__ == "__main__":
    write(CELLS, Path(__file__).with_name("03_kernels.ipynb"))
