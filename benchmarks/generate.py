"""Greedy-generation speed, dense float32 against 2×8 g8 AQLM, per CPU implementation.

Two models: (a) the quickstart model (``DEFAULT`` shapes; the trained one when it is in
the cache, random weights otherwise — speed does not depend on the values) and (b) one
randomly initialised Llama-2-7B-shaped decoder block (hidden 4096, 32 heads, d_ff 11008,
a small vocabulary). Quantized kernels are random 2×8 g8 AQLM arrays built directly
(``random_quantized_state``); embeddings, norms and the head stay dense float32, as in
the dense model. Each quantized run forces one ``ops.matmul`` implementation on the
model's linear layers (``use_matmul_impl``); a prefill with more rows than the LUT
kernels take falls back to the dispatcher's choice (recorded in the JSON).

What is timed: ``generate(model, prompt, N)`` and ``generate(model, prompt, 1)`` with the
same buffer length, so their difference is ``N - 1`` decode steps of the jit-compiled
scan loop: decode tokens/s = ``(N - 1) / (t_N - t_1)``; ``t_1`` is the prefill plus one
sampled token (time to first token, compiled). Candidates are timed interleaved (one
call of each per round) and medians taken after a warm-up call, so ratios come from one
run under the same load; the load average is recorded beside every model.

    python benchmarks/generate.py                          # -> results/generate_cpu.json
    python benchmarks/generate.py --models block7b --new-tokens 16 --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.atomic_files import atomic_write_bytes
from jaxquant.models import LlamaForCausalLM, ModelConfig, generate
from jaxquant.models.random_quantized import random_quantized_state, resident_bytes, use_matmul_impl
from jaxquant.ops import cpu_ffi, dispatch
from jaxquant.qarray import is_quantized, tree_bits

sys.path.insert(0, str(Path(__file__).parent))
from decode import versions  # noqa: E402  (one definition of the recorded package versions)

RESULTS = Path(__file__).parent / "results"
CPU_IMPLS = ("cpu_ffi", "xla_lut", "xla_decode")
# One Llama-2-7B decoder block; a small vocabulary keeps the head out of the picture.
BLOCK_7B = ModelConfig(vocab_size=256, hidden_size=4096, intermediate_size=11008, num_layers=1, num_heads=32,
                       num_kv_heads=32, head_dim=128, max_position_embeddings=256)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine_info() -> dict[str, Any]:
    """Machine, backend and library versions for a results file."""
    return {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind), "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(), "machine": platform.platform(), "versions": versions(("jaxlib", "flax"))}


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` under a temporary name, then rename (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode("utf-8"))


def _interleaved_s(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each candidate, alternating candidates within every round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()  # generate returns a NumPy array: the computation has finished
            times[k].append(time.perf_counter() - t0)
    return times


def _quickstart_model() -> tuple[LlamaForCausalLM, str]:
    from jaxquant.data import builtin_corpus  # noqa: PLC0415
    from jaxquant.models import from_pretrained  # noqa: PLC0415
    from jaxquant.quickstart import DEFAULT, cache_root, config_hash  # noqa: PLC0415

    model_dir = os.path.join(cache_root(), f"quickstart-{config_hash(DEFAULT, builtin_corpus())}")
    if os.path.isfile(os.path.join(model_dir, "model.safetensors")):
        return from_pretrained(model_dir), f"trained ({model_dir})"
    return LlamaForCausalLM(DEFAULT.model, rngs=nnx.Rngs(0)), "random init (no trained quickstart model cached)"


def bench_model(
    name: str, model: LlamaForCausalLM, weights: str, *, impls: tuple[str, ...], prompt_len: int,
    new_tokens: int, repeats: int, seed: int = 0,
) -> dict[str, Any]:
    """Time dense and quantized greedy generation of one model; returns a JSON-ready row."""
    cfg = model.config
    graphdef, dense = nnx.split(model)
    quant = random_quantized_state(dense, seed)
    prompt = np.random.default_rng(seed).integers(0, cfg.vocab_size, prompt_len).astype(np.int32)
    bucket = prompt_len + new_tokens  # one buffer length for N and 1 new tokens
    candidates: dict[str, tuple[LlamaForCausalLM, Any]] = {"dense_f32": (model, dense)}
    for impl in impls:
        m = nnx.merge(graphdef, dense)  # a second graph sharing the arrays; its layers get swapped
        use_matmul_impl(m, impl, fallback=True)
        candidates[impl] = (m, quant)

    fns: dict[str, Callable[[], Any]] = {}
    tokens: dict[str, list[int]] = {}
    load_before = os.getloadavg()
    for key, (m, params) in candidates.items():
        t0 = time.perf_counter()
        tokens[key] = generate(m, prompt, new_tokens, params=params, bucket=bucket).tolist()
        first_call_s = time.perf_counter() - t0
        print(f"  {name}/{key}: first call (compile + run) {first_call_s:.1f} s", flush=True)
        fns[f"{key}@N"] = lambda m=m, p=params: generate(m, prompt, new_tokens, params=p, bucket=bucket)
        fns[f"{key}@1"] = lambda m=m, p=params: generate(m, prompt, 1, params=p, bucket=bucket)
    times = _interleaved_s(fns, repeats)
    load_after = os.getloadavg()

    x1 = jax.ShapeDtypeStruct((1, cfg.hidden_size), jnp.float32)
    q_leaf = next(x for x in jax.tree.leaves(quant, is_leaf=is_quantized) if is_quantized(x))
    rows: dict[str, Any] = {}
    for key in candidates:
        t_n, t_1 = statistics.median(times[f"{key}@N"]), statistics.median(times[f"{key}@1"])
        rows[key] = {
            "generate_N_s": t_n, "generate_1_s": t_1,
            "decode_ms_per_token": 1e3 * (t_n - t_1) / (new_tokens - 1),
            "decode_tokens_per_s": (new_tokens - 1) / (t_n - t_1) if t_n > t_1 else float("nan"),
            "end_to_end_tokens_per_s": new_tokens / t_n,
            "all_s": {"N": times[f"{key}@N"], "1": times[f"{key}@1"]},
        }
    base = rows["dense_f32"]["decode_ms_per_token"]
    for key in impls:
        rows[key]["decode_speedup_vs_dense_f32"] = base / rows[key]["decode_ms_per_token"]
    quant_tokens = {tuple(tokens[k]) for k in impls}
    bits = tree_bits(quant)
    return {
        "model": name, "weights": weights, "config": dataclasses.asdict(cfg),
        "quantization": "random AQLM 2x8 g8 on every linear kernel but the head; embeddings, norms, head float32",
        "bits_per_weight_quantized": bits["bits_per_weight"],
        "resident_bytes_dense_f32": resident_bytes(dense), "resident_bytes_quantized": resident_bytes(quant),
        "prompt_len": prompt_len, "new_tokens": new_tokens, "buffer_len": bucket, "repeats": repeats,
        "auto_impl_batch1": dispatch.select_impl(x1, q_leaf),
        "prefill_rows": bucket, "prefill_note": (
            f"prefill has {bucket} rows > DECODE_BATCH_ROWS={dispatch.DECODE_BATCH_ROWS}: cpu_ffi/xla_lut fall back "
            "to the dispatcher's choice (xla_decode) there; decode steps (1 row) use the named implementation"),
        "quantized_impls_same_tokens": len(quant_tokens) == 1,
        "tokens": tokens,
        "loadavg_before": load_before, "loadavg_after": load_after,
        "results": rows,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["quickstart", "block7b"], choices=["quickstart", "block7b"])
    parser.add_argument("--impls", nargs="+", default=None, help=f"default: those available of {CPU_IMPLS}")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error(f"--new-tokens={args.new_tokens} must be >= 2 (decode speed is t_N - t_1)")
    impls = tuple(args.impls or [i for i in CPU_IMPLS if i != "cpu_ffi" or cpu_ffi.available()])
    out = args.out or RESULTS / f"generate_{jax.default_backend()}.json"

    report: dict[str, Any] = {
        "benchmark": "generate", **machine_info(), "command": " ".join(["generate.py", *sys.argv[1:]]),
        "timing": "candidates interleaved per round; medians after one warm-up call; "
                  "decode tokens/s = (N-1)/(t_N - t_1) with equal buffer lengths",
        "cpu_ffi_available": cpu_ffi.available(), "rows": [],
    }
    for name in args.models:
        if name == "quickstart":
            model, weights = _quickstart_model()
        else:
            model, weights = LlamaForCausalLM(BLOCK_7B, rngs=nnx.Rngs(0)), "random init"
        print(f"{name}: {weights}; load average {os.getloadavg()}", flush=True)
        row = bench_model(name, model, weights, impls=impls, prompt_len=args.prompt_len,
                          new_tokens=args.new_tokens, repeats=args.repeats)
        report["rows"].append(row)
        print(f"{'model':<11} {'candidate':<10} {'decode ms/tok':>13} {'tok/s':>8} {'TTFT s':>8} {'x dense':>8}")
        for key, r in row["results"].items():
            print(f"{name:<11} {key:<10} {r['decode_ms_per_token']:13.2f} {r['decode_tokens_per_s']:8.1f} "
                  f"{r['generate_1_s']:8.3f} {r.get('decode_speedup_vs_dense_f32', 1.0):8.2f}")
        print(f"  resident bytes: dense {row['resident_bytes_dense_f32']:,} / quantized "
              f"{row['resident_bytes_quantized']:,}; same tokens across impls: {row['quantized_impls_same_tokens']}; "
              f"load {row['loadavg_before'][0]:.2f} -> {row['loadavg_after'][0]:.2f}", flush=True)
        write_json(out, report)  # after every model, so a long run keeps what it measured
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
