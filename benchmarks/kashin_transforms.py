"""How fast Kashin's split converges with each choice of Q, on SmolLM2-135M's weights (issue 27).

Usage:
    python benchmarks/kashin_transforms.py --out benchmarks/results/real_model/kashin_transforms.json \
        [--layers 0/attn/q_proj,0/mlp/down_proj,15/mlp/gate_proj] [--reflections 1,8,64,all]

For each layer and each ``Q`` the split ``w = u + Qᵀ v + residual`` runs with the Kashin
recipe's defaults (20 rounds, truncation 0.3) and the row reports the relative residual
``‖residual‖ / ‖w‖``. The candidates are the rotations of ``jaxquant.rotations``
(Hadamard, DCT, dense Haar-random orthogonal) and products of ``k`` Householder reflections
``I - 2 v vᵀ`` with Gaussian ``v`` from a fixed seed, applied one reflection at a time
(``O(k n)`` per row). All of them follow the same random signs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import rotations
from jaxquant.atomic_files import atomic_write_bytes
from jaxquant.known_models import resolve_model
from jaxquant.methods.kashin.quantize import kashin_split, kashin_split_with
from jaxquant.models import from_pretrained, functional
from jaxquant.quickstart import machine_record
from jaxquant.recipes import Kashin
from jaxquant.select import flatten_with_paths

_REFLECTION_SEED = 7


def householder_vectors(n: int, k: int) -> jax.Array:
    """``k`` unit vectors of length ``n`` from a fixed seed: the reflections of ``Q = H_k ⋯ H_1``."""
    v = np.random.default_rng(_REFLECTION_SEED + n).standard_normal((k, n))
    return jnp.asarray(v / np.linalg.norm(v, axis=1, keepdims=True), jnp.float32)


def reflect(x: jax.Array, vectors: jax.Array, reverse: bool) -> jax.Array:
    """Rows ``r`` of ``x`` mapped to ``H_k ⋯ H_1 r`` (or ``H_1 ⋯ H_k r``, the transpose, with ``reverse``)."""
    def one(y: jax.Array, v: jax.Array) -> tuple[jax.Array, None]:
        return y - 2.0 * (y @ v)[:, None] * v[None, :], None

    return jax.lax.scan(one, x, vectors, reverse=reverse)[0]


def relative_residual(w: jax.Array, split: Any) -> tuple[float, float]:
    """``‖residual‖ / ‖w‖`` of one split, and its warm wall time in seconds."""
    jax.block_until_ready(split(w))  # compile
    start = time.perf_counter()
    _, _, residual = jax.block_until_ready(split(w))
    return float(jnp.linalg.norm(residual) / jnp.linalg.norm(w)), time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", default="0/attn/q_proj,0/mlp/down_proj,15/mlp/gate_proj")
    p.add_argument("--reflections", default="1,8,64,all", help="Householder counts; 'all' is the width")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    recipe = Kashin()
    _, params = functional(from_pretrained(resolve_model("smollm2-135m")))
    rows = []
    leaves = dict(flatten_with_paths(params))
    for name in args.layers.split(","):
        kernel = leaves[f"layers/{name}/kernel"]
        w = jnp.asarray(np.asarray(kernel, np.float32).T)  # Flax (d_in, d_out) -> (d_out, d_in)
        n = w.shape[1]
        signs = rotations.random_signs(jax.random.key(0), n)
        candidates = {kind: jax.jit(lambda x, kind=kind: kashin_split(x, signs, kind, recipe.iterations,
                                                                      recipe.truncation))
                      for kind in ("hadamard", "dct", "orthogonal")}
        for count in args.reflections.split(","):
            vectors = householder_vectors(n, n if count == "all" else int(count))
            candidates[f"householder x{vectors.shape[0]}"] = jax.jit(lambda x, v=vectors: kashin_split_with(
                x, lambda y: reflect(y * signs, v, reverse=False),
                lambda z: reflect(z, v, reverse=True) * signs, recipe.iterations, recipe.truncation))
        for q_name, split in candidates.items():
            residual, seconds = relative_residual(w, split)
            rows.append({"layer": name, "shape": list(w.shape), "q": q_name, "relative_residual": residual,
                         "seconds": round(seconds, 4)})
            print(f"{name} {tuple(w.shape)} {q_name:<18} residual {residual:.3e}  {seconds:.3f} s", flush=True)
    result = {"command": " ".join(["python", "benchmarks/kashin_transforms.py", *(argv or sys.argv[1:])]),
              "settings": {"iterations": recipe.iterations, "truncation": recipe.truncation},
              "rows": rows, "machine": machine_record()}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    atomic_write_bytes(args.out, (json.dumps(result, indent=1) + "\n").encode("utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
