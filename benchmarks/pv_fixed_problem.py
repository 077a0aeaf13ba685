"""PV-Tuning on fixed small problems: a hash of the final codes, and every loss.

The problems: ``pv_tuning`` on one AQLM layer, and the quickstart's distillation loop
(``global_finetune``, the main job's PV row) on a small random Llama quantized with RTN.

Usage: ``python benchmarks/pv_fixed_problem.py [--out RESULT.json]``

``benchmarks/compare_refs.py`` runs it at two commits to show that a change to PV-Tuning's
code left its numbers alone. It speaks both the ``VStep`` API and the keyword API that came
before it. AQLM's ``grad_dtype`` is pinned, so the starting codes do not depend on the
machine or on that default.
"""

import argparse
import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxquant as jq
from jaxquant.finetune import pv

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--out", default=None)
args = parser.parse_args()

key = jax.random.key(0)
w = jax.random.normal(key, (64, 96), jnp.float32) / 8
x = jax.random.normal(jax.random.key(1), (256, 96), jnp.float32)
xtx = x.T @ x
q = jq.quantize_weight(w, xtx, jq.AQLM(num_codebooks=2, codebook_bits=4, group_size=4, adam_steps=5, max_rounds=2,
                                       grad_dtype="bfloat16"), jax.random.key(2))
params = {"w": q, "b": jnp.zeros((64,), jnp.float32)}
y = x @ w.T + 0.05 * jax.random.normal(jax.random.key(3), (256, 64))

def loss_fn(p, x, y):
    return jnp.mean((x @ p["w"].T + p["b"] - y) ** 2)

results = {}
kw = dict(update_fraction=0.05, trust_ratio=0.05, beam_size=4, buffer_decay=0.1)
for mode in ("pv", "ste"):
    if hasattr(pv, "VStep"):  # the API since issue 25; before it, keywords
        tuner = pv.pv_tuning(optax.adam(1e-3), pv.adam(1e-2, b1=0.0), pv.VStep(mode=mode, **kw), every=2)
    else:
        tuner = pv.pv_tuning(optax.adam(1e-3), pv.adam(1e-2, b1=0.0), mode=mode, every=2, **kw)
    p, state = params, tuner.init(params)

    @jax.jit
    def step(p, state):
        loss, grads = pv.decoded_value_and_grad(loss_fn)(p, x, y)
        p, state = tuner.update(grads, state, p)
        return p, state, loss

    losses = []
    for _ in range(12):
        p, state, loss = step(p, state)
        losses.append(float(loss))
    h = hashlib.sha256(np.asarray(p["w"].codes).tobytes() + np.asarray(p["w"].codebooks).tobytes()).hexdigest()[:16]
    results[mode] = {"hash": h, "losses": losses}
    print(mode, h, " ".join(f"{v:.9g}" for v in losses), flush=True)
# The quickstart's distillation loop (the main job's PV row) on a small random Llama.
from flax import nnx  # noqa: E402

from jaxquant import quickstart as qs  # noqa: E402
from jaxquant.models import LlamaForCausalLM, ModelConfig, functional  # noqa: E402

model = LlamaForCausalLM(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=2,
                                     head_dim=16, vocab_size=64, max_position_embeddings=64), rngs=nnx.Rngs(0))
apply_fn, teacher = functional(model)
tokens = np.random.default_rng(0).integers(0, 64, size=4096).astype(np.int32)
qparams = jq.quantize(teacher, None, jq.RTN(bits=2, group_size=16))
tune = qs.TuneConfig(steps=6, batch_size=4, seqlen=32, beam_size=2, update_fraction=0.1, trust_ratio=0.05)
for mode in ("pv", "ste"):
    tuned, kls = qs.global_finetune(apply_fn, teacher, qparams, tokens, tune, mode=mode)
    codes = b"".join(np.asarray(leaf.codes).tobytes() for leaf in jax.tree.leaves(tuned, is_leaf=jq.is_quantized)
                     if jq.is_quantized(leaf))
    h = hashlib.sha256(codes).hexdigest()[:16]
    results[f"global_finetune_{mode}"] = {"hash": h, "losses": [float(v) for v in kls]}
    print(f"global_finetune {mode}", h, " ".join(f"{v:.9g}" for v in kls), flush=True)
if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
