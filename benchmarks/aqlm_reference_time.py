"""AQLM on a few SmolLM2 layers: jaxquant beside the reference implementation, same data, same run.

Usage (CPU; the reference needs torch, from the ``interop`` extra):
    git --git-dir /work/.mirror/Vahe1994+AQLM/repo archive HEAD | tar -x -C /tmp/aqlm_ref
    python benchmarks/aqlm_reference_time.py --reference-repo /tmp/aqlm_ref \
        [--layers 0/attn/q_proj,0/attn/k_proj,0/mlp/gate_proj,0/mlp/down_proj] [--beam-size 8] \
        [--max-rounds 20] [--tolerance 0.01] --out benchmarks/results/real_model/aqlm_reference_time.json

Both quantize the same weights against the same ``XᵀX`` (SmolLM2's float layer inputs on
``--nsamples`` x ``--seqlen`` calibration tokens) with the same configuration: 2 codebooks
of 256 codewords over groups of 8 input columns, ``--beam-size``, up to
``--max-rounds`` rounds of (Adam steps on codebooks and scales, code search) stopped
by the relative tolerance, 100 Adam steps per round at 1e-4, 100 k-means iterations.
The reference runs as its ``AQEngine.quantize`` (Vahe1994/AQLM's ``aq_engine.py``) on
the CPU with all cores; jaxquant as ``jaxquant.quantize_weight``, timed cold (compilation
included, as a user's first layer) and warm (the next call, new key). Each side reports
the relative output error ``tr(ΔW XᵀX ΔWᵀ) / tr(W XᵀX Wᵀ)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from argparse import Namespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxquant as jq
from jaxquant.atomic_files import atomic_write_bytes
from jaxquant.calibrate import calibrate
from jaxquant.data import calibration_windows, load_tokenizer, read_text
from jaxquant.known_models import resolve_model
from jaxquant.models import from_pretrained, functional
from jaxquant.quickstart import machine_record
from jaxquant.select import flatten_with_paths
from jaxquant.stats import as_xtx


def rel_error(w: np.ndarray, w_hat: np.ndarray, xtx: np.ndarray) -> float:
    """``tr(ΔW XᵀX ΔWᵀ) / tr(W XᵀX Wᵀ)`` in float64, ``W`` as ``(d_out, d_in)``."""
    d = (w_hat - w).astype(np.float64)
    w = w.astype(np.float64)
    return float(np.einsum("oi,ij,oj->", d, xtx, d) / np.einsum("oi,ij,oj->", w, xtx, w))


def run_reference(w: np.ndarray, xtx: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    """Quantize ``w`` ``(d_out, d_in)`` with the reference's ``AQEngine``."""
    import torch  # noqa: PLC0415

    sys.path.insert(0, args.reference_repo)
    from aq_engine import AQEngine  # noqa: PLC0415

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    layer.weight.data = torch.from_numpy(np.ascontiguousarray(w, np.float32))
    engine = AQEngine(layer)
    engine.XTX = torch.from_numpy(np.asarray(xtx, np.float64))
    settings = Namespace(
        devices=[torch.device("cpu")], out_group_size=1, in_group_size=8, num_codebooks=2, nbits_per_codebook=8,
        codebook_value_nbits=16, codebook_value_num_groups=1, scale_nbits=0, init_max_iter=100,
        init_max_points_per_centroid=None, lr=1e-4, beam_size=args.beam_size, max_epochs=args.max_rounds,
        relative_mse_tolerance=args.tolerance, steps_per_epoch=100, print_frequency=10**9)
    start = time.perf_counter()
    qw = engine.quantize(args=settings, verbose=False)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        w_hat = qw().float().numpy()
    return {"seconds": round(seconds, 2), "rel_error": rel_error(w, w_hat, xtx), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def run_ours(w: np.ndarray, xtx: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    """Quantize ``w`` with ``jaxquant.quantize_weight``: cold, then warm with a new key."""
    recipe = jq.AQLM(num_codebooks=2, codebook_bits=8, group_size=8, beam_size=args.beam_size,
                     max_rounds=args.max_rounds, tolerance=args.tolerance, adam_steps=100, lr=1e-4,
                     kmeans_iters=100)
    out: dict[str, Any] = {"recipe": dataclasses.asdict(recipe)}
    for label, seed in (("seconds_cold", 0), ("seconds_warm", 1)):
        start = time.perf_counter()
        q = jq.quantize_weight(jnp.asarray(w), jnp.asarray(xtx, jnp.float32), recipe, jax.random.key(seed))
        jax.block_until_ready(q)
        out[label] = round(time.perf_counter() - start, 2)
        if seed == 0:
            out["rel_error"] = rel_error(w, np.asarray(q.decode(jnp.float32)), xtx)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference-repo", required=True, help="a checkout of Vahe1994/AQLM")
    p.add_argument("--layers", default="0/attn/q_proj,0/attn/k_proj,0/mlp/gate_proj,0/mlp/down_proj")
    p.add_argument("--beam-size", type=int, default=8)
    p.add_argument("--max-rounds", type=int, default=20)
    p.add_argument("--tolerance", type=float, default=0.01)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    path = resolve_model("smollm2-135m")
    model = from_pretrained(path)
    apply_fn, params = functional(model)
    ids = np.asarray(load_tokenizer(path).encode(read_text("builtin", split="train")), np.int32)
    calib = calibration_windows(ids, args.nsamples, args.seqlen, seed=0)
    stats = calibrate(apply_fn, params, [jnp.asarray(calib[i:i + 8]) for i in range(0, len(calib), 8)])
    rows = []
    leaves = dict(flatten_with_paths(params))
    for name in args.layers.split(","):
        key = f"layers/{name}/kernel"
        w = np.asarray(leaves[key], np.float32).T  # Flax (d_in, d_out) -> (d_out, d_in)
        xtx = np.asarray(as_xtx(stats[key]), np.float64)
        ours = run_ours(w, xtx, args)
        ref = run_reference(w, xtx, args)
        rows.append({"layer": key, "shape": list(w.shape), "jaxquant": ours, "reference": ref,
                     "reference_over_jaxquant_cold": round(ref["seconds"] / ours["seconds_cold"], 2),
                     "reference_over_jaxquant_warm": round(ref["seconds"] / ours["seconds_warm"], 2)})
        print(f"{key} {w.shape}: jaxquant {ours['seconds_cold']} s cold / {ours['seconds_warm']} s warm, "
              f"error {ours['rel_error']:.5f}; reference {ref['seconds']} s, error {ref['rel_error']:.5f}",
              flush=True)
        result = {"command": " ".join(["python", "benchmarks/aqlm_reference_time.py", *(argv or sys.argv[1:])]),
                  "calibration": {"windows": args.nsamples, "seqlen": args.seqlen},
                  "settings": {"beam_size": args.beam_size, "max_rounds": args.max_rounds,
                               "tolerance": args.tolerance},
                  "rows": rows, "machine": machine_record()}
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)  # written after every layer
        atomic_write_bytes(args.out, (json.dumps(result, indent=1) + "\n").encode("utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
