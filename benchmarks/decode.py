"""Decode-kernel benchmark: quantized ``x @ W`` against the best dense product.

For Llama-2-7B layer shapes and AQLM (and SpQR, VPTQ) configs, times dense float32/bfloat16 (both
contraction forms; the best is the baseline), every jaxquant implementation the
dispatcher can run on this backend, and, when the ``aqlm`` package is installed, its
CPU kernel (numba, 2 threads). All candidates of one row are timed interleaved (one call
of each per round), medians after warm-up, so ratios come from the same run under the
same load; the 1-minute load average is recorded per row. Random codes and codebooks (speed does not depend on their values).

    python benchmarks/decode.py                      # full grid -> results/decode_<backend>.json
    python benchmarks/decode.py --batches 1 --configs 2x8 --repeats 30
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant.atomic_files import atomic_write_bytes
from jaxquant.methods.spqr import SpQRQuantized
from jaxquant.methods.vptq import VPTQQuantized
from jaxquant.ops import dispatch
from jaxquant.qarray import AdditiveQuantized, code_dtype

SHAPES = {"4096x4096": (4096, 4096), "11008x4096": (11008, 4096), "4096x11008": (4096, 11008)}  # (d_out, d_in)
CONFIGS = {"2x8": (2, 8, 8), "1x8": (1, 8, 8), "1x16": (1, 16, 8)}  # (M, B, in_group)
# SpQR: (bits, group, statistics group, fraction of outliers); 0.2% outliers is what the
# default recipe keeps on the synthetic layer.
SPQR_CONFIGS = {"spqr3": (3, 64, 64, 0.002)}
# VPTQ: (rows per vector, codebook bits, residual codebook bits).
VPTQ_CONFIGS = {"vptq4x8": (4, 8, 0), "vptq8x8r8": (8, 8, 8)}


def _interleaved_ms(fns: dict, repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median ms of each callable, timed in alternation (A, B, C, A, B, C, ...).

    On a shared machine the load drifts; alternating puts every candidate under the same
    drift, so the ratios within one call are meaningful even when absolute times are not.
    """
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def _random_aq(rng, d_out, d_in, m, bits, ig) -> AdditiveQuantized:
    k = 2**bits
    codes = rng.integers(0, k, (d_out, d_in // ig, m)).astype(code_dtype(bits))
    cb = (rng.standard_normal((m, k, 1, ig)) * 0.02).astype(np.float32)
    scales = (rng.random((d_out, 1, 1, 1)) + 0.5).astype(np.float32)
    return AdditiveQuantized(jnp.asarray(codes), jnp.asarray(cb), jnp.asarray(scales), bits, (d_out, d_in))


def _random_spqr(rng, d_out, d_in, bits, group, stat_group, outlier_fraction) -> SpQRQuantized:
    groups, stat_rows = d_in // group, d_out // stat_group
    nnz = int(outlier_fraction * d_out * d_in)
    rows = np.sort(rng.integers(0, d_out, nnz))
    stats = np.stack([rng.random((stat_rows, groups)) * 1e-3, rng.random((stat_rows, groups)) * 4], -1)
    return SpQRQuantized(
        codes=jnp.asarray(rng.integers(0, 2**bits, (d_out, d_in)).astype(np.uint8)),
        scale_codes=jnp.asarray(rng.integers(0, 8, (d_out, groups)).astype(np.uint8)),
        zero_codes=jnp.asarray(rng.integers(0, 8, (d_out, groups)).astype(np.uint8)),
        scale_stats=jnp.asarray(stats.astype(np.float16)), zero_stats=jnp.asarray(stats.astype(np.float16)),
        outlier_values=jnp.asarray(rng.standard_normal(nnz).astype(np.float16)),
        outlier_columns=jnp.asarray(rng.integers(0, d_in, nnz).astype(np.uint16)),
        outlier_row_starts=jnp.asarray(np.searchsorted(rows, np.arange(d_out + 1)).astype(np.int32)),
        column_positions=jnp.asarray(rng.permutation(d_in).astype(np.uint16)),
        bits=bits, group_size=group, stat_bits=3, stat_group=stat_group, shape=(d_out, d_in),
    )


def _random_vptq(rng, d_out, d_in, v, bits, residual_bits) -> VPTQQuantized:
    def part(n_bits: int) -> tuple[jax.Array, jax.Array]:
        codes = rng.integers(0, 2**n_bits, (d_out // v, d_in)).astype(code_dtype(n_bits))
        return jnp.asarray(codes), jnp.asarray((rng.standard_normal((2**n_bits, v)) * 0.02).astype(np.float16))

    codes, book = part(bits)
    res_codes, res_book = part(residual_bits) if residual_bits else (None, None)
    return VPTQQuantized(codes=codes, codebook=book, residual_codes=res_codes, residual_codebook=res_book,
                         outlier_codebook=None, outlier_columns=None,
                         column_scales=jnp.asarray((rng.random(d_in) + 0.5).astype(np.float16)),
                         codebook_bits=bits, residual_bits=residual_bits, shape=(d_out, d_in))


def _dense_fns(rng, d_out, d_in, batch) -> dict:
    out = {}
    x32 = jnp.asarray(rng.standard_normal((batch, d_in)).astype(np.float32))
    w_oi = jnp.asarray(rng.standard_normal((d_out, d_in)).astype(np.float32))
    for dtype, tag in ((jnp.float32, "f32"), (jnp.bfloat16, "bf16")):
        x = x32.astype(dtype)
        a = w_oi.astype(dtype)
        b = jnp.asarray(np.ascontiguousarray(np.asarray(w_oi).T)).astype(dtype)
        f_oi = jax.jit(lambda x, w: lax.dot_general(x, w, (((1,), (1,)), ((), ()))))
        f_io = jax.jit(lambda x, w: lax.dot_general(x, w, (((1,), (0,)), ((), ()))))
        out[f"dense_{tag}_out_in"] = lambda f=f_oi, x=x, a=a: f(x, a)
        out[f"dense_{tag}_in_out"] = lambda f=f_io, x=x, b=b: f(x, b)
    return out


def _aqlm_fn(w: AdditiveQuantized, x: np.ndarray):
    try:
        import numba
        import torch
        from aqlm.inference_kernels.numba_kernel import numba_gemm_lut
    except ImportError:
        return None
    if w.codebooks.shape[1] != 256:
        return None  # the aqlm CPU kernel handles 2**8 codebooks only
    torch.set_num_threads(2)
    numba.set_num_threads(2)
    codes = torch.from_numpy(np.array(w.codes).view(np.int8)).permute(1, 0, 2).contiguous()
    cb = torch.from_numpy(np.array(w.codebooks))
    sc = torch.from_numpy(np.array(w.scales))
    xt = torch.from_numpy(x)
    return lambda: numba_gemm_lut(xt, codes, cb, sc, None)


def versions(packages: tuple[str, ...] = ("jaxlib", "flax", "torch", "aqlm", "numba")) -> dict[str, str]:
    """Python, jax and numpy versions, and those of the installed ``packages``."""
    v = {"python": platform.python_version(), "jax": jax.__version__, "numpy": np.__version__}
    from importlib import metadata

    for name in packages:
        try:
            v[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return v


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=[*CONFIGS, *SPQR_CONFIGS, *VPTQ_CONFIGS])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--no-aqlm", action="store_true")
    p.add_argument("--out", default=None, help="JSON path (default results/decode_<backend>.json)")
    args = p.parse_args(argv)

    backend = jax.default_backend()
    rng = np.random.default_rng(0)
    rows = []
    for shape_name in args.shapes:
        d_out, d_in = SHAPES[shape_name]
        for batch in args.batches:
            dense_fns = _dense_fns(rng, d_out, d_in, batch)
            x = rng.standard_normal((batch, d_in)).astype(np.float32)
            for cfg in args.configs:
                if cfg in SPQR_CONFIGS:
                    w = _random_spqr(rng, d_out, d_in, *SPQR_CONFIGS[cfg])
                elif cfg in VPTQ_CONFIGS:
                    w = _random_vptq(rng, d_out, d_in, *VPTQ_CONFIGS[cfg])
                else:
                    w = _random_aq(rng, d_out, d_in, *CONFIGS[cfg])
                xj = jnp.asarray(x)
                auto = dispatch.select_impl(xj, w)
                fns = dict(dense_fns)
                impl_names = []
                for name in dispatch.IMPLEMENTATIONS:
                    if name == "reference":
                        continue
                    f = jax.jit(lambda x, w, name=name: dispatch.matmul(x, w, impl=name))
                    try:
                        jax.block_until_ready(f(xj, w))
                    except NotImplementedError:
                        continue
                    fns[name] = lambda f=f: f(xj, w)
                    impl_names.append(name)
                if not args.no_aqlm and isinstance(w, AdditiveQuantized):
                    fa = _aqlm_fn(w, x)
                    if fa is not None:
                        fns["aqlm_numba"] = fa
                load_before = os.getloadavg()
                ms = _interleaved_ms(fns, args.repeats)
                row = {"shape": shape_name, "d_out": d_out, "d_in": d_in, "batch": batch, "config": cfg,
                       "bits_per_weight": w.bits_per_weight, "auto_impl": auto,
                       "loadavg_1m_before_after": [load_before[0], os.getloadavg()[0]],
                       "impls": {k: ms[k] for k in impl_names}}
                for tag in ("f32", "bf16"):
                    row[f"dense_{tag}_out_in"] = ms[f"dense_{tag}_out_in"]
                    row[f"dense_{tag}_in_out"] = ms[f"dense_{tag}_in_out"]
                    row[f"dense_{tag}_best"] = min(ms[f"dense_{tag}_out_in"], ms[f"dense_{tag}_in_out"])
                if "aqlm_numba" in ms:
                    row["aqlm_numba"] = ms["aqlm_numba"]
                best = min(row["impls"].values())
                row["best_impl_ms"] = best
                row["speedup_vs_dense_f32"] = row["dense_f32_best"] / best
                row["speedup_vs_dense_bf16"] = row["dense_bf16_best"] / best
                if "aqlm_numba" in row:
                    row["speedup_vs_aqlm"] = row["aqlm_numba"] / best
                rows.append(row)
                impls = " ".join(f"{k}={v:.2f}" for k, v in row["impls"].items())
                print(f"{shape_name:>11} b={batch:<3} {cfg:>4} dense f32={row['dense_f32_best']:.2f} "
                      f"bf16={row['dense_bf16_best']:.2f} | {impls} | aqlm={row.get('aqlm_numba', float('nan')):.2f} "
                      f"| x dense f32 {row['speedup_vs_dense_f32']:.2f} x aqlm {row.get('speedup_vs_aqlm', float('nan')):.2f}",
                      flush=True)
    result = {
        "benchmark": "decode",
        "device": jax.devices()[0].device_kind,
        "backend": backend,
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "processor": platform.processor(),
        "versions": versions(),
        "repeats": args.repeats,
        "timing": "candidates interleaved per round (A, B, ..., A, B, ...); medians after 3 warm-up calls",
        "loadavg_at_end": list(os.getloadavg()),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "rows": rows,
    }
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"decode_{backend}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, json.dumps(result, indent=1).encode("utf-8"))  # never a half-written result
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
