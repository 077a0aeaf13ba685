"""Time AQLM's Adam steps: native gather/scatter kernels against the XLA passes.

One jit-compiled loop of ``--steps`` steps of ``codebooks.loss_and_grads`` per variant
(and the bare ``(Ŵ−W)·XᵀX`` product for scale), on a random ``--shape`` layer with 2x8 g8
codes. The variants are timed interleaved, one loop of each per repeat, after a warm-up,
so the ratio comes from the same run under the same load. Writes milliseconds per step
(median and min over repeats) as JSON.

    python benchmarks/aqlm_adam_step.py --out benchmarks/results/aqlm_adam_step.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.atomic_files import atomic_write_bytes
from jaxquant.methods.aqlm import codebooks as cb
from jaxquant.methods.aqlm import native_grads
from jaxquant.methods.aqlm.quantize import COMPILER_OPTIONS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="512x512", help="DOUTxDIN")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if not native_grads.available():
        raise SystemExit(f"native kernels unavailable: {native_grads.unavailable_reason()}")
    d_out, d_in = (int(v) for v in args.shape.split("x"))
    m, k, ig = 2, 256, 8
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((d_out, 1, d_in)).astype(np.float32))
    x = rng.standard_normal((2 * d_in, d_in)).astype(np.float32)
    h = jnp.asarray(x.T @ x / len(x))
    codes = jnp.asarray(rng.integers(0, k, (d_out, d_in // ig, m)).astype(np.int32))
    params = {"codebooks": jnp.asarray(rng.standard_normal((m, k, 1, ig)).astype(np.float32) * 0.3),
              "scales": jnp.ones((d_out,), jnp.float32)}

    def steps(body):  # noqa: ANN001, ANN202
        return jax.jit(lambda init: jax.lax.fori_loop(0, args.steps, lambda _, c: body(c), init),
                       compiler_options=COMPILER_OPTIONS)

    variants = {
        "native": (steps(lambda q: cb.loss_and_grads(q, codes, w, h, native=True)[1]), params),
        "xla": (steps(lambda q: cb.loss_and_grads(q, codes, w, h, native=False)[1]), params),
        "product_only": (steps(lambda r: r + 1e-9 * jnp.einsum("roi,ij->roj", r, h)), w),
    }
    for fn, init in variants.values():
        jax.block_until_ready(fn(init))  # compile and warm up
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, (fn, init) in variants.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(init))
            times[name].append((time.perf_counter() - start) * 1e3 / args.steps)
    result = {
        "command": "python benchmarks/aqlm_adam_step.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "ms_per_step": {n: {"median": statistics.median(t), "min": min(t)} for n, t in times.items()},
        "xla_over_native_median": statistics.median(times["xla"]) / statistics.median(times["native"]),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "jax": jax.__version__},
        "load_average_end": list(os.getloadavg()),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_bytes(args.out, (json.dumps(result, indent=1) + "\n").encode())
    print(json.dumps(result["ms_per_step"], indent=1), f"xla/native {result['xla_over_native_median']:.2f}")


if __name__ == "__main__":
    main()
