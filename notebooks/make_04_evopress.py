"""Write ``notebooks/04_evopress.ipynb`` (outputs cleared) from the cells below.

    python notebooks/make_04_evopress.py
"""

from __future__ import annotations

from pathlib import Path

from notebook_builder import write

CELLS = [
    ("md", """# Mixed precision by evolutionary search (EvoPress)

Layers do not suffer equally from quantization, so one bit width everywhere wastes the
budget. `jaxquant.search` chooses a *level* per layer — any recipe the toolkit has: GPTQ at
2–4 bits, with or without rotation, AQLM, PVQ, … — under a global average of bits per
weight, by the (1+λ) evolutionary search of EvoPress (Sieberling et al., 2024):

1. a **level database**: the model quantized once per level; every option knows its
   honest bits (codes, scales, codebooks, rotation signs);
2. **mutation**: a few layers one level up, random layers one level down until the
   budget holds again;
3. **selection** in stages: many offspring on a little calibration data, the best few on
   more, the parent among them (elitism); the fitness is the KL divergence to the
   full-precision model, one compiled forward pass per candidate.

Part 1 runs the whole API on a tiny random Llama (a minute on a laptop). Part 2 plots the
searches on SmolLM2-135M that `benchmarks/evopress.py` ran with `jaxquant search`."""),
    ("code", """import glob
import json
import os

import jax
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

import jaxquant as jq
from jaxquant.models import LlamaForCausalLM, ModelConfig, functional
from jaxquant.search import (BitsBudget, DecodedOptions, EvolutionConfig, KLFitness, error_sum_greedy, evolve,
                             uniform_within)"""),
    ("md", """## 1. The API on a tiny model

`jq.pipeline.build_level_database` quantizes the model once per level, block by block,
each level in its own resumable directory (a second call loads them)."""),
    ("code", """import tempfile

config = ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                     vocab_size=256, max_position_embeddings=64)
model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
calib = np.random.default_rng(0).integers(0, 256, (8, 32)).astype(np.int32)
levels = {name: jq.named_recipe(name) for name in ("rtn-2-g32", "rtn-3-g32", "gptq-3-g32", "rtn-4-g32")}
database, report = jq.pipeline.build_level_database(model, calib, levels, tempfile.mkdtemp(),
                                                    key=jax.random.key(0), progress=False, log=False)
for r in report:
    print(f"{r['name']:>10}: {r['bits_per_weight']:.2f} bits/weight, {r['quantize_seconds']:.1f} s")
print(database.num_layers, "layers x", database.num_levels, "levels")"""),
    ("md", """A budget of 3.5 bits per weight, the KL fitness on calibration windows, and 30
generations. `DecodedOptions` decodes every option once, so a candidate is a new tree of
existing arrays and the compiled forward pass is reused (`fitness.traces` stays 1)."""),
    ("code", """budget = BitsBudget(database.bits, database.sizes, average=3.5, tolerance=0.15)
apply_fn, float_params = functional(model)
options = DecodedOptions(database)
windows = np.random.default_rng(1).integers(0, 256, (16, 32)).astype(np.int32)
fitness = KLFitness(apply_fn, float_params, windows, batch_size=2)

def score(choice, window_ids):
    return fitness(options.tree(float_params, choice), window_ids)

result = evolve(budget, score, fitness.num_windows,
                EvolutionConfig(generations=30, offspring=8, survivors=(2, 1), windows=(2, 8), seed=0),
                progress=False)
print(f"searched: {database.average_bits(result.choice):.3f} bits/weight, KL {score(result.choice, range(16)):.4f}"
      f" on all windows; compilations: {fitness.traces}")
for k in uniform_within(budget, slack=0.15):
    print(f"uniform {database.level_names[k]}: {database.average_bits(database.uniform(k)):.3f} bits/weight, "
          f"KL {score(database.uniform(k), range(16)):.4f}")
greedy = error_sum_greedy(database.errors, budget)
print(f"error-sum greedy: {database.average_bits(greedy):.3f} bits/weight, KL {score(greedy, range(16)):.4f}")"""),
    ("md", """The result is a parameter tree like any other: `database.assemble` puts the chosen
quantized arrays into the model's tree, and `jq.tree_bits` counts them honestly."""),
    ("code", """quantized = database.assemble(float_params, result.choice)
print(f"{jq.tree_bits(quantized)['bits_per_weight']:.3f} bits/weight;", database.level_counts(result.choice))"""),
    ("md", """## 2. SmolLM2-135M

`jaxquant search smollm2-135m --budget B --levels ... --out DIR` writes `search.json` with
the assignment, the fitness per generation and held-out perplexities; the runs of
`benchmarks/evopress.py` are kept in `benchmarks/results/evopress/runs/`. The heatmap shows
the bits the search gave each layer (blocks × projection), for search seed 1 of each
configuration."""),
    ("code", """ROOT = next(p for p in (".", "..") if os.path.isdir(os.path.join(p, "benchmarks")))  # the repository
runs = {os.path.basename(p)[:-5]: json.load(open(p))
        for p in sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "evopress", "runs", "*.json")))}
print(f"{len(runs)} searches:", ", ".join(runs))
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

def bits_map(run):
    bits = {r["name"]: r["bits_per_weight"] for r in run["levels"]}
    blocks = 1 + max(int(p.split("/")[1]) for p in run["assignment"])
    grid = np.full((blocks, len(PROJECTIONS)), np.nan)
    for path, level in run["assignment"].items():
        grid[int(path.split("/")[1]), PROJECTIONS.index(path.split("/")[-2])] = bits[level]
    return grid"""),
    ("code", """first_seed = {name: run for name, run in runs.items() if name.endswith("-seed1")}
if first_seed:
    fig, axes = plt.subplots(1, len(first_seed), figsize=(2.2 * len(first_seed), 6), squeeze=False)
    for ax, (name, run) in zip(axes[0], first_seed.items()):
        im = ax.imshow(bits_map(run), aspect="auto", cmap="viridis", vmin=2, vmax=4.5)
        ax.set_title(f"{name}\\n{run['average_bits']:.3f} bits", fontsize=8)
        ax.set_xticks(range(len(PROJECTIONS)), [p[:-5] for p in PROJECTIONS], rotation=90, fontsize=7)
        ax.set_ylabel("block")
    fig.colorbar(im, ax=axes[0].tolist(), label="bits per weight")
    plt.show()"""),
    ("md", """Fitness over generations: the parent's KL divergence on each generation's last-stage
windows. The first configurations drew fresh windows every generation (the paper's
selection), hence the noise; the `warm` ones score on fixed windows, where the parent's
fitness never rises, and start from the best of random and heuristic assignments."""),
    ("code", """if runs:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, run in runs.items():
        history = run["search"]["history"]
        ax.plot([h["generation"] for h in history], [h["fitness"] for h in history], label=name, lw=1)
    ax.set_xlabel("generation"); ax.set_ylabel("KL to full precision (nats/token)"); ax.set_yscale("log")
    ax.legend(fontsize=7); plt.show()"""),
    ("md", """Held-out perplexity (every 512-token window of the built-in validation split)
against average bits: the searched assignments and the baselines each search reports."""),
    ("code", """if runs:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    seen = set()
    for name, run in runs.items():
        for row in run["perplexity"]["rows"]:
            label = name if row["name"] == "evopress" else row["name"]
            if label in seen and row["name"] != "evopress":
                continue
            seen.add(label)
            marker = {"evopress": "*"}.get(row["name"], "o" if row["name"].startswith("uniform") else "s")
            ax.scatter(row["average_bits"], row["ppl"], marker=marker, s=80 if marker == "*" else 30)
            ax.annotate(label, (row["average_bits"], row["ppl"]), fontsize=6)
    fp = next(iter(runs.values()))["perplexity"]["full_precision"]
    ax.axhline(fp, color="grey", lw=0.8, ls="--"); ax.set_yscale("log")
    ax.set_xlabel("average bits per weight"); ax.set_ylabel("validation perplexity"); plt.show()"""),
]


if __name__ == "__main__":
    write(CELLS, Path(__file__).with_name("04_evopress.ipynb"), id_prefix="evopress")
