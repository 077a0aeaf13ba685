"""Quantize one layer and report error, bits, time and memory as JSON.

A contract other checks rely on::

    python benchmarks/quantize_layer.py --problem FILE.npz|synthetic --method {rtn,gptq,aqlm,spqr,vptq}
        [--bits B] [--group-size G] [--num-codebooks M] [--codebook-bits K] [--beam-size S]
        [--out-group-size O] [--grad-dtype D] [--stat-bits B2] [--stat-group G2]
        [--outlier-threshold T] [--vector-size V] [--residual-bits R] [--outlier-fraction F]
        [--seed N] [--shape DOUTxDIN --tokens T] --out RESULT.json

``FILE.npz`` holds ``W`` float32 ``(out, in)`` and ``X`` float32 ``(tokens, in)``;
``synthetic`` is the shared problem of DESIGN.md; ``--shape``/``--tokens`` build a
random problem of that size instead (for timing). The method runs twice in the same
process: ``seconds`` is the first run (compilation included), ``seconds_warm`` the
second (new key). ``rel_output_error`` is ``||(W−Ŵ)Xᵀ||²_F / ||WXᵀ||²_F`` in float64
for the first run. ``XᵀX`` (normalised by the token count) is computed once, before
either run, and timed separately as ``seconds_xtx``. For AQLM, ``implementation`` records
the beam search that ran (native C++ or XLA; ``JAXQUANT_NO_FFI=1`` forces XLA) and the
resolved ``grad_dtype``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxquant as jq
from jaxquant.atomic_files import atomic_write_bytes
from jaxquant.problems import load_problem, make_random_problem, relative_output_error

sys.path.insert(0, str(Path(__file__).parent))
from decode import versions  # noqa: E402  (one definition of the recorded package versions)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--problem", default="synthetic", help="FILE.npz or 'synthetic'")
    p.add_argument("--method", required=True, choices=("rtn", "gptq", "aqlm", "spqr", "vptq", "kashin", "pvq"))
    p.add_argument("--bits", type=int, default=None, help="RTN/GPTQ/SpQR bits per code")
    p.add_argument("--group-size", type=int, default=None, help="input group size (0: one group per row for RTN/GPTQ)")
    p.add_argument("--symmetric", action="store_true", help="RTN/GPTQ symmetric grid")
    p.add_argument("--clip-search", action="store_true", help="RTN/GPTQ clipping-ratio search")
    p.add_argument("--no-act-order", action="store_true", help="GPTQ/SpQR/VPTQ in natural column order")
    p.add_argument("--damp", type=float, default=None, help="GPTQ/SpQR/VPTQ relative damping")
    p.add_argument("--block-size", type=int, default=None, help="GPTQ/SpQR/VPTQ lazy-batch block size")
    p.add_argument("--stat-bits", type=int, default=None, help="SpQR bits per quantized scale and zero point")
    p.add_argument("--stat-group", type=int, default=None, help="SpQR rows per second-level grid")
    p.add_argument("--outlier-threshold", type=float, default=None, help="SpQR relative outlier threshold")
    p.add_argument("--vector-size", type=int, default=None, help="VPTQ output rows per vector")
    p.add_argument("--residual-bits", type=int, default=None, help="VPTQ residual codebook bits (0: none)")
    p.add_argument("--outlier-fraction", type=float, default=None, help="VPTQ columns with their own codebook")
    p.add_argument("--kmeans-iters", type=int, default=None, help="AQLM/VPTQ Lloyd iterations")
    p.add_argument("--num-codebooks", type=int, default=None)
    p.add_argument("--codebook-bits", type=int, default=None, help="AQLM/VPTQ bits per code")
    p.add_argument("--beam-size", type=int, default=None)
    p.add_argument("--out-group-size", type=int, default=None)
    p.add_argument("--max-rounds", type=int, default=None, help="AQLM round limit (large layers)")
    p.add_argument("--grad-dtype", default=None, choices=("auto", "float32", "bfloat16"),
                   help="AQLM codebook-gradient product dtype (JAXQUANT_NO_FFI=1 forces the XLA beam search)")
    p.add_argument("--u-bits", type=int, default=None, help="Kashin bits per code of the first factor")
    p.add_argument("--v-bits", type=int, default=None, help="Kashin bits per code of the second factor")
    p.add_argument("--transform", default=None, choices=("hadamard", "dct", "orthogonal"), help="Kashin's Q")
    p.add_argument("--pulses", type=int, default=None, help="PVQ pulses per group (the pyramid's L1 radius)")
    p.add_argument("--amplitude-bits", type=int, default=None, help="PVQ bits per group amplitude")
    p.add_argument("--rotate", nargs="?", const="hadamard", default=None,
                   choices=("none", "hadamard", "dct", "orthogonal"),
                   help="quantize in a randomly rotated basis (bare --rotate: hadamard; PVQ rotates unless 'none')")
    p.add_argument("--no-warm", action="store_true", help="skip the second (warm) run; seconds_warm is then null")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", default=None, help="DOUTxDIN: a random problem of this size")
    p.add_argument("--tokens", type=int, default=None, help="calibration tokens of the random problem")
    p.add_argument("--out", required=True, help="RESULT.json")
    args = p.parse_args(argv)
    if (args.shape is None) != (args.tokens is None):
        p.error("--shape and --tokens go together")
    return args


def build_recipe(args: argparse.Namespace) -> Any:
    """The recipe the command line describes (unset options keep the recipe defaults)."""
    fields: dict[str, Any] = {"method": args.method}

    def put(name: str, value: Any) -> None:
        if value is not None:
            fields[name] = value

    if args.method in ("rtn", "gptq"):
        put("bits", args.bits)
        if args.group_size is not None:
            fields["group_size"] = None if args.group_size == 0 else args.group_size
        fields["symmetric"] = args.symmetric
        fields["clip_search"] = args.clip_search
        if args.method == "gptq":
            fields["act_order"] = not args.no_act_order
            put("damp", args.damp)
            put("block_size", args.block_size)
    elif args.method == "spqr":
        for name in ("bits", "group_size", "stat_bits", "stat_group", "outlier_threshold", "damp", "block_size"):
            put(name, getattr(args, name))
        fields["act_order"] = not args.no_act_order
    elif args.method == "vptq":
        for name in ("vector_size", "codebook_bits", "residual_bits", "outlier_fraction", "kmeans_iters", "damp",
                     "block_size"):
            put(name, getattr(args, name))
        fields["act_order"] = not args.no_act_order
    elif args.method == "pvq":
        for name in ("group_size", "pulses", "amplitude_bits", "damp", "block_size", "kmeans_iters"):
            put(name, getattr(args, name))
        fields["act_order"] = not args.no_act_order
    elif args.method == "kashin":
        for name in ("u_bits", "v_bits", "transform", "kmeans_iters"):
            put(name, getattr(args, name))
    else:
        put("kmeans_iters", args.kmeans_iters)
        put("group_size", args.group_size)
        put("num_codebooks", args.num_codebooks)
        put("codebook_bits", args.codebook_bits)
        put("beam_size", args.beam_size)
        put("out_group_size", args.out_group_size)
        put("max_rounds", args.max_rounds)
        put("grad_dtype", args.grad_dtype)
    put("rotate", args.rotate)
    return jq.recipe_from_dict(fields)


def _problem(args: argparse.Namespace) -> tuple[str, np.ndarray, np.ndarray]:
    if args.shape is not None:
        try:
            d_out, d_in = (int(s) for s in args.shape.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shape={args.shape!r} must look like 4096x4096") from None
        w, x = make_random_problem(d_out, d_in, args.tokens, seed=args.seed)
        return f"random {d_out}x{d_in}, {args.tokens} tokens", w, x
    w, x = load_problem(args.problem)
    return str(args.problem), w, x


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
    }


def _peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def _timed_run(w: jax.Array, xtx: jax.Array, recipe: Any, key: jax.Array) -> tuple[Any, float]:
    start = time.perf_counter()
    q = jq.quantize_weight(w, xtx, recipe, key, layout="out_in", path="problem/W")
    jax.block_until_ready(jax.tree.leaves(q))
    return q, time.perf_counter() - start


def _write_json(path: str, data: dict[str, Any]) -> None:
    """Write atomically: a temporary file in the target folder, then rename."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse_args(argv)
    recipe = build_recipe(args)
    name, w_np, x_np = _problem(args)

    w = jnp.asarray(w_np)
    start = time.perf_counter()
    x = jnp.asarray(x_np)
    xtx = jax.jit(lambda x: (x.T @ x) / jnp.float32(x.shape[0]))(x)
    xtx = jax.block_until_ready(xtx)
    seconds_xtx = time.perf_counter() - start
    del x

    q, seconds = _timed_run(w, xtx, recipe, jax.random.key(args.seed))
    w_hat = np.asarray(q.decode_out_in(jnp.float32))
    err = relative_output_error(w_np, w_hat, x_np)
    weight_err = float(np.sum((w_hat - w_np) ** 2) / np.sum(np.asarray(w_np, np.float64) ** 2))
    err2 = seconds_warm = None
    if not args.no_warm:
        q2, seconds_warm = _timed_run(w, xtx, recipe, jax.random.key(args.seed + 1))
        err2 = relative_output_error(w_np, np.asarray(q2.decode_out_in(jnp.float32)), x_np)
        del q2
    rss = _peak_rss_mb()
    implementation = None
    if args.method == "aqlm":
        from jaxquant.methods.aqlm import native_grads, native_kernels
        from jaxquant.methods.aqlm.grad_dtype import bf16_product_speedup, resolve_grad_dtype

        implementation = {
            "beam_search": "native" if native_kernels.available() else "xla",
            "adam_gather_scatter": "native" if native_grads.available() else "xla",
            "bf16_product_speedup": bf16_product_speedup(),
            "grad_dtype": resolve_grad_dtype(recipe.grad_dtype, jax.devices()),
        }
    result = {
        "method": args.method,
        "config": jq.recipe_to_dict(recipe),
        "problem": {"name": name, "d_out": int(w_np.shape[0]), "d_in": int(w_np.shape[1]), "tokens": int(x_np.shape[0])},
        "scheme": q.scheme,
        "implementation": implementation,
        "bits_per_weight": float(q.bits_per_weight),
        "rel_output_error": float(err),
        "rel_weight_error": weight_err,
        "rel_output_error_warm": None if err2 is None else float(err2),
        "seconds": seconds,
        "seconds_warm": seconds_warm,
        "seconds_compile_estimate": None if seconds_warm is None else max(seconds - seconds_warm, 0.0),
        "seconds_xtx": seconds_xtx,
        "peak_rss_mb": rss,
        "seed": args.seed,
        "versions": versions(("jaxlib", "jaxquant")),
        "machine": _machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/quantize_layer.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    _write_json(args.out, result)
    header = f"{'method':<6} {'scheme':<16} {'problem':<34} {'bits/w':>7} {'rel_err':>9} {'s':>8} {'s_warm':>8} {'rss_MB':>8}"
    row = (
        f"{args.method:<6} {q.scheme:<16} {name[:34]:<34} {q.bits_per_weight:>7.3f} {err:>9.5f} "
        f"{seconds:>8.2f} {'-' if seconds_warm is None else f'{seconds_warm:.2f}':>8} {rss:>8.0f}"
    )
    print(header)
    print(row)
    return result


if __name__ == "__main__":
    main()
