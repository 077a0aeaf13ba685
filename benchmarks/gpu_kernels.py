"""GPU decode kernels on a CUDA device: numerics, block-shape sweep, device-time ratios.

Run on a machine with an NVIDIA GPU (the lent H100/H200); it writes one JSON after each
stage, so a run cut short still leaves what it measured:

    PYTHONPATH=. python benchmarks/gpu_kernels.py --out benchmarks/results/gpu_kernels_h200.json

Stages, in order of what matters most if time runs out:
1. ceilings: device-to-device copy bandwidth (bytes read + written over device time);
2. numerics: every GPU path (the CUDA kernel, both Pallas kernels, the XLA paths)
   against a float64 NumPy reference on fresh random inputs, Llama-2-7B shapes and an
   odd small one, 1 and 3 rows;
3. sweep: block shapes and warps of both Pallas kernels, and table size and rows per
   block of the CUDA kernel (``jaxquant.ops.cuda_ffi``), at batch 1, 4096×4096;
4. table: for the 7B shapes at batch 1, 4, 16: dense float32/bfloat16 (both contraction
   forms) against every quantized path, device time per call (``device_timer``), the
   bandwidth each reaches over the fewest bytes it must read, and ratios from one run.

Weights rotate among enough distinct copies per candidate that the set is at least
``--rotate-bytes`` (default 4× a 60 MB L2), so no timing reads a weight from cache.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, str(Path(__file__).parent))
from decode import CONFIGS, SHAPES, versions  # noqa: E402  (the shared grid of shapes and configs)
from device_timer import time_candidates  # noqa: E402

from jaxquant.atomic_files import atomic_write_bytes  # noqa: E402
from jaxquant.ops import cuda_ffi, dispatch  # noqa: E402
from jaxquant.qarray import AdditiveQuantized, code_dtype  # noqa: E402
from pallas_kernels import aqlm_matmul_gpu, aqlm_matmul_gpu_lut, gpu_eligible, lut_eligible  # noqa: E402

# Pallas kernels: (block_out, block_groups, num_warps); the first is each kernel's default.
GATHER_VARIANTS = [(16, 64, 2), (16, 32, 4), (32, 64, 4), (16, 128, 2), (8, 64, 2), (16, 64, 1), (64, 32, 4)]
LUT_VARIANTS = [(16, 128, 4), (16, 256, 4), (32, 128, 4), (16, 128, 2), (8, 256, 2)]
# CUDA kernel: (lut_floats, out_per_block) for the sweep; CUDA_DEFAULT lets the library
# pick lut_floats by row count.
CUDA_VARIANTS = [(16384, 512), (8192, 256), (8192, 512), (16384, 256),
                 (16384, 1024), (16384, 2048), (32768, 512), (32768, 1024), (4096, 256)]
CUDA_DEFAULT = (None, cuda_ffi.OUT_PER_BLOCK)
# The CUDA table kernel with its loads issued first: (lut_floats, threads, rows_per_thread).
PREFETCH_VARIANTS = [(8192, 256, 2), (8192, 512, 1), (8192, 256, 1), (8192, 128, 4), (8192, 512, 2), (4096, 256, 2),
                     (4096, 256, 1), (4096, 128, 2), (16384, 256, 2), (16384, 512, 1), (16384, 256, 4),
                     (16384, 128, 4)]
# The CUDA warp-per-row decode kernel: (warps_per_block, unroll).
DECODE_VARIANTS = [(8, 4), (8, 8), (4, 4), (4, 8), (2, 8)]
FAMILIES = ("gather", "lut", "cuda", "cudapf", "cudadw")


def random_quantized(key: jax.Array, d_out: int, d_in: int, cfg: str) -> AdditiveQuantized:
    """A random ``out_in`` AQLM weight drawn on the device, with a different scale per row.

    Not ``jaxquant.models.random_quantized.random_additive``: its scales are one constant,
    so the numerics stage would not catch a kernel that applies the wrong row's scale.
    Not ``decode._random_aq`` either: that one draws with NumPy on the host, and the
    timing stages draw up to 64 rotating copies of each weight.
    """
    m, bits, ig = CONFIGS[cfg]
    kc, kb, ks = jax.random.split(key, 3)
    codes = jax.random.randint(kc, (d_out, d_in // ig, m), 0, 2**bits, dtype=jnp.int32).astype(code_dtype(bits))
    codebooks = 0.02 * jax.random.normal(kb, (m, 2**bits, 1, ig), jnp.float32)
    scales = jax.random.uniform(ks, (d_out, 1, 1, 1), jnp.float32, 0.5, 1.5)
    return AdditiveQuantized(codes, codebooks, scales, bits, (d_out, d_in))


def reference_f64(x: np.ndarray, w: AdditiveQuantized) -> np.ndarray:
    """``x @ W.T`` in float64 from the codes, on the host."""
    codes = np.asarray(w.codes).astype(np.int64)
    cb = np.asarray(w.codebooks, np.float64)[:, :, 0, :]
    d_out, n_groups, m = codes.shape
    dense = sum(cb[j][codes[:, :, j]] for j in range(m)).reshape(d_out, -1)
    dense *= np.asarray(w.scales, np.float64).reshape(d_out, 1)
    return x.astype(np.float64) @ dense.T


def quantized_paths(w: AdditiveQuantized, variants: dict[str, tuple]) -> dict[str, Any]:
    """Name -> ``f(x, w)`` for every GPU path that accepts ``w``.

    ``variants``: label -> ``(block_out, block_groups, num_warps)`` for labels starting
    ``gather``/``lut`` (the Pallas kernels), ``(lut_floats, out_per_block)`` for ``cuda``,
    ``(lut_floats, threads, rows_per_thread)`` for ``cudapf`` (the table kernel with its
    loads first), ``(warps_per_block, unroll)`` for ``cudadw`` (the warp-per-row decode).
    """
    paths: dict[str, Any] = {}
    cs, cbs = w.codes.shape, w.codebooks.shape
    for label, params in variants.items():
        if label.startswith("cudapf"):
            if cuda_ffi.prefetch_eligible(w, 1):
                paths[label] = lambda x, w, p=params: cuda_ffi.lut_prefetch_matmul_cuda(
                    x, w, lut_floats=p[0], threads=p[1], rows_per_thread=p[2])
            continue
        if label.startswith("cudadw"):
            if cuda_ffi.decode_eligible(w, 1):
                paths[label] = lambda x, w, p=params: cuda_ffi.decode_warp_matmul_cuda(
                    x, w, warps_per_block=p[0], unroll=p[1])
            continue
        if label.startswith("cuda"):
            if cuda_ffi.cuda_eligible(w, 1):
                paths[label] = lambda x, w, lf=params[0], ob=params[1]: cuda_ffi.lut_matmul_cuda(
                    x, w, lut_floats=lf, out_per_block=ob)
            continue
        bo, bg, nw = params
        kernel, elig = (aqlm_matmul_gpu_lut, lut_eligible) if label.startswith("lut") else (aqlm_matmul_gpu, gpu_eligible)
        if elig(cs, cbs):
            paths[label] = lambda x, w, k=kernel, bo=bo, bg=bg, nw=nw: k(
                x, w.codes, w.codebooks, w.scales, block_out=bo, block_groups=bg, num_warps=nw)
    xla_impls = ("xla_lut", "xla_decode") if cbs[1] <= 256 else ("xla_decode",)  # xla_lut: 2^8 codewords at most
    for impl in xla_impls:
        paths[impl] = lambda x, w, impl=impl: dispatch.matmul(x, w, impl=impl)
    return paths


def _fastest(timings: dict[str, dict[str, Any]], metric: str, tag: str = "") -> tuple[str, float] | None:
    """The entry with the smallest ``metric`` among names containing ``tag``, if any was timed."""
    timed = {k: v[metric] for k, v in timings.items() if tag in k and v.get(metric)}
    return min(timed.items(), key=lambda kv: kv[1]) if timed else None


def min_bytes_quantized(w: AdditiveQuantized, rows: int) -> int:
    # Codes and scales once, x in, y out; the codebooks (<= 2 MiB) are shared by all
    # layers of a model and stay in cache.
    return int(w.codes.nbytes + w.scales.nbytes + rows * 4 * (w.shape[0] + w.shape[1]))


def n_copies(nbytes: int, rotate_bytes: int, cap: int = 64) -> int:
    return max(1, min(cap, math.ceil(rotate_bytes / max(nbytes, 1))))


class Report:
    """The JSON result, rewritten atomically after every stage."""

    def __init__(self, path: Path, command: str):
        self.path = path
        self.data: dict[str, Any] = {"benchmark": "gpu_kernels", "command": command, "stages": {}}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, json.dumps(self.data, indent=1).encode("utf-8"))


def environment() -> dict[str, Any]:
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        smi = f"unavailable: {e}"
    try:
        nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[-1]
    except (OSError, subprocess.SubprocessError, IndexError) as e:
        nvcc = f"unavailable: {e}"
    cuda_ok = cuda_ffi.available()
    return {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "nvidia_smi": smi, "nvcc": nvcc,
            "cuda_ffi_available": cuda_ok, "cuda_ffi_unavailable_reason": cuda_ffi.unavailable_reason(),
            "machine": platform.platform(),
            "versions": versions(("jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "triton"))}


def stage_ceilings(calls: int) -> dict[str, Any]:
    n = 1 << 28  # 1 GiB of float32
    a = jax.random.normal(jax.random.key(1), (n,), jnp.float32)
    double = jax.jit(lambda v: v * 2.0)
    t = time_candidates({"copy": (double, [(a,)])}, calls)["copy"]
    bw = 2 * 4 * n / (t["device_us"] * 1e-6) if t["device_us"] else None
    return {"copy_bytes": 2 * 4 * n, "copy": t, "copy_bandwidth_GBps": bw / 1e9 if bw else None}


def stage_numerics(seed: int) -> list[dict[str, Any]]:
    variants = {"gather": GATHER_VARIANTS[0], "lut": LUT_VARIANTS[0], "gather_b16": (16, 16, 4), "lut_b16": (16, 16, 4),
                "cuda": CUDA_DEFAULT, "cuda_small_chunks": (512, 64),  # 512 floats: chunks of 1-2 groups
                "cudapf": (None, None, 2), "cudapf_r4": (8192, 128, 4), "cudapf_small_chunks": (512, 64, 1),
                "cudapf_64codes": (16384, 256, 2), "cudadw": DECODE_VARIANTS[0], "cudadw_u8": (3, 8)}
    shapes_rows = [(SHAPES["11008x4096"], 1), (SHAPES["11008x4096"], 3), (SHAPES["4096x11008"], 1), ((48, 96), 3)]
    cases = [(d_out, d_in, cfg, rows) for (d_out, d_in), rows in shapes_rows for cfg in CONFIGS]
    out = []
    for i, (d_out, d_in, cfg, rows) in enumerate(cases):
        key = jax.random.key(seed + i)  # fresh inputs for every case
        w = random_quantized(key, d_out, d_in, cfg)
        x = np.random.default_rng(seed + i).standard_normal((rows, d_in)).astype(np.float32)
        ref = reference_f64(x, w)
        for name, f in quantized_paths(w, variants).items():
            try:
                got = np.asarray(jax.jit(f)(jnp.asarray(x), w), np.float64)
                rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
                out.append({"shape": [d_out, d_in], "config": cfg, "rows": rows, "path": name, "rel_err": rel,
                            "all_finite": bool(np.isfinite(got).all()), "ok": bool(rel < 1e-5 and np.isfinite(got).all())})
            except Exception as e:  # noqa: BLE001 - record the failure and go on to the next path
                out.append({"shape": [d_out, d_in], "config": cfg, "rows": rows, "path": name, "ok": False,
                            "error": f"{type(e).__name__}: {e}"[:2000]})
                print(traceback.format_exc()[-3000:], flush=True)
    return out


def stage_sweep(rotate_bytes: int, calls: int, families: tuple[str, ...] = FAMILIES) -> dict[str, Any]:
    d_out, d_in = SHAPES["4096x4096"]
    result = {}
    for cfg in CONFIGS:
        probe = random_quantized(jax.random.key(0), d_out, d_in, cfg)
        weights = [random_quantized(jax.random.key(100 + i), d_out, d_in, cfg)
                   for i in range(n_copies(probe.codes.nbytes, rotate_bytes))]
        x = jnp.asarray(np.random.default_rng(0).standard_normal((1, d_in)).astype(np.float32))
        variants = {f"gather_{bo}_{bg}_{nw}": (bo, bg, nw) for bo, bg, nw in GATHER_VARIANTS}
        variants |= {f"lut_{bo}_{bg}_{nw}": (bo, bg, nw) for bo, bg, nw in LUT_VARIANTS}
        variants |= {f"cuda_{lf}_{ob}": (lf, ob) for lf, ob in CUDA_VARIANTS}
        variants |= {f"cudapf_{lf}_{t}_{r}": (lf, t, r) for lf, t, r in PREFETCH_VARIANTS}
        variants |= {f"cudadw_{wp}_{u}": (wp, u) for wp, u in DECODE_VARIANTS}
        variants = {k: v for k, v in variants.items() if k.split("_")[0] in families}
        paths = {k: v for k, v in quantized_paths(probe, variants).items() if k not in ("xla_lut", "xla_decode")}
        cands = {name: (jax.jit(f), [(x, w) for w in weights]) for name, f in paths.items()}
        try:
            result[cfg] = time_candidates(cands, calls)
        except Exception as e:  # noqa: BLE001
            result[cfg] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            print(traceback.format_exc()[-3000:], flush=True)
            continue
        line = " ".join(f"{k}={v['device_us']:.1f}" for k, v in result[cfg].items() if v.get("device_us"))
        print(f"sweep {cfg}: {line}", flush=True)
    return result


def best_variants(sweep: dict[str, Any]) -> dict[str, dict[str, tuple[int, int, int]]]:
    """Per config, the fastest gather and lookup-table variant of the sweep (device time)."""
    best: dict[str, dict[str, tuple[int, int, int]]] = {}
    for cfg, timings in sweep.items():
        best[cfg] = {}
        for family in FAMILIES:
            fastest = _fastest(timings, "device_us", family + "_") if "error" not in timings else None
            if fastest:
                best[cfg][f"{family}_best"] = tuple(int(p) for p in fastest[0].split("_")[1:])
    return best


def dense_candidates(d_out: int, d_in: int, batch: int, rotate_bytes: int) -> dict[str, Any]:
    cands = {}
    x32 = jax.random.normal(jax.random.key(7), (batch, d_in), jnp.float32)
    for dtype, tag in ((jnp.float32, "f32"), (jnp.bfloat16, "bf16")):
        nbytes = d_out * d_in * jnp.dtype(dtype).itemsize
        copies = n_copies(nbytes, rotate_bytes)
        x = x32.astype(dtype)
        w_oi = [jax.random.normal(jax.random.key(200 + i), (d_out, d_in), dtype) for i in range(copies)]
        f_oi = jax.jit(lambda x, w: lax.dot_general(x, w, (((1,), (1,)), ((), ()))))
        cands[f"dense_{tag}_out_in"] = (f_oi, [(x, w) for w in w_oi])
        w_io = [jnp.asarray(w.T) for w in w_oi]  # materialised transposes, not views
        f_io = jax.jit(lambda x, w: lax.dot_general(x, w, (((1,), (0,)), ((), ()))))
        cands[f"dense_{tag}_in_out"] = (f_io, [(x, w) for w in w_io])
    return cands


def stage_table(best: dict[str, Any], rotate_bytes: int, calls: int, copy_gbps: float | None,
                batches: list[int]) -> list[dict[str, Any]]:
    rows = []
    for shape_name, (d_out, d_in) in SHAPES.items():
        for batch in batches:
            dense = dense_candidates(d_out, d_in, batch, rotate_bytes)
            dense_t = time_candidates(dense, calls)
            x = jnp.asarray(np.random.default_rng(batch).standard_normal((batch, d_in)).astype(np.float32))
            for cfg in CONFIGS:
                probe = random_quantized(jax.random.key(0), d_out, d_in, cfg)
                weights = [random_quantized(jax.random.key(300 + i), d_out, d_in, cfg)
                           for i in range(n_copies(probe.codes.nbytes, rotate_bytes))]
                variants = {"gather_default": GATHER_VARIANTS[0], "lut_default": LUT_VARIANTS[0],
                            "cuda_default": CUDA_DEFAULT, "cudapf_default": (None, None, 2),
                            "cudadw_default": DECODE_VARIANTS[0], **best.get(cfg, {})}
                paths = quantized_paths(probe, variants)
                if batch > dispatch.DECODE_BATCH_ROWS:
                    paths.pop("xla_lut", None)  # the dispatcher sends these batches to the decode path
                cands = {name: (jax.jit(f), [(x, w) for w in weights]) for name, f in paths.items()}
                row: dict[str, Any] = {"shape": shape_name, "d_out": d_out, "d_in": d_in, "batch": batch,
                                       "config": cfg, "copies": len(weights), "variants": variants}
                try:
                    q = time_candidates(cands, calls)
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {e}"[:2000]
                    print(traceback.format_exc()[-3000:], flush=True)
                    rows.append(row)
                    continue
                row["dense"] = dense_t
                row["quantized"] = q
                nbytes = min_bytes_quantized(probe, batch)
                row["min_bytes"] = nbytes
                for metric in ("device_us", "wall_us"):
                    fastest, bf16, f32 = _fastest(q, metric), _fastest(dense_t, metric, "bf16"), _fastest(dense_t, metric, "f32")
                    if fastest and bf16 and f32:
                        row[f"{metric}_fastest_quantized"] = fastest[0]
                        row[f"{metric}_speedup_vs_dense_bf16"] = bf16[1] / fastest[1]
                        row[f"{metric}_speedup_vs_dense_f32"] = f32[1] / fastest[1]
                if row.get("device_us_fastest_quantized"):
                    t = q[row["device_us_fastest_quantized"]]["device_us"]
                    row["achieved_GBps"] = nbytes / (t * 1e-6) / 1e9
                    if copy_gbps:
                        row["fraction_of_copy_bandwidth"] = row["achieved_GBps"] / copy_gbps
                rows.append(row)
                dq = " ".join(f"{k}={v['device_us']:.1f}" for k, v in q.items() if v.get("device_us"))
                bf = (_fastest(dense_t, "device_us", "bf16") or ("", float("nan")))[1]
                print(f"{shape_name} b={batch} {cfg}: dense bf16 {bf:.1f} us | {dq} | x bf16 "
                      f"{row.get('device_us_speedup_vs_dense_bf16', float('nan')):.2f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--calls", type=int, default=200, help="calls per candidate per timed pass")
    p.add_argument("--rotate-bytes", type=int, default=240 * 2**20)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--stages", nargs="+", default=["ceilings", "numerics", "sweep", "table"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep-families", nargs="+", default=list(FAMILIES), choices=FAMILIES,
                   help="kernel families the sweep times (the table times each family's default and best)")
    args = p.parse_args(argv)
    if jax.default_backend() != "gpu":
        raise SystemExit(f"gpu_kernels.py needs a GPU backend; jax.default_backend() is {jax.default_backend()!r}")
    report = Report(Path(args.out), " ".join(["gpu_kernels.py", *(argv if argv is not None else sys.argv[1:])]))
    report.data["environment"] = environment()
    report.data["timing"] = ("device time per call from the profiler trace (median kernel durations x launches "
                             "per call); wall_us: host clock over the same asynchronous loop; weights rotate "
                             f"over >= {args.rotate_bytes} bytes of distinct copies")
    report.save()
    print(json.dumps(report.data["environment"]), flush=True)
    stages = report.data["stages"]
    t0 = time.time()
    copy_gbps = None
    if "ceilings" in args.stages:
        stages["ceilings"] = stage_ceilings(max(args.calls // 4, 2))
        copy_gbps = stages["ceilings"]["copy_bandwidth_GBps"]
        print(f"copy bandwidth {copy_gbps} GB/s ({time.time() - t0:.0f} s)", flush=True)
        report.save()
    if "numerics" in args.stages:
        stages["numerics"] = stage_numerics(args.seed)
        bad = [r for r in stages["numerics"] if not r["ok"]]
        worst = max((r.get("rel_err", 0.0) for r in stages["numerics"]), default=None)
        print(f"numerics: {len(stages['numerics']) - len(bad)} ok, {len(bad)} failed, worst rel err {worst} "
              f"({time.time() - t0:.0f} s)", flush=True)
        report.save()
    best: dict[str, Any] = {}
    if "sweep" in args.stages:
        stages["sweep"] = stage_sweep(args.rotate_bytes, args.calls, tuple(args.sweep_families))
        best = best_variants(stages["sweep"])
        stages["best_variants"] = best
        print(f"best variants {best} ({time.time() - t0:.0f} s)", flush=True)
        report.save()
    if "table" in args.stages:
        stages["table"] = []
        for batch in args.batches:  # saved per batch so a cut-short run keeps the earlier ones
            stages["table"] += stage_table(best, args.rotate_bytes, args.calls, copy_gbps, [batch])
            report.save()
        print(f"table done ({time.time() - t0:.0f} s)", flush=True)
    report.data["seconds"] = time.time() - t0
    report.save()


if __name__ == "__main__":
    main()
