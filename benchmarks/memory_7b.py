"""A Llama-2-7B-shaped model that does not fit in memory in float32, generating from 2×8 AQLM.

Llama-2-7B shapes (32 layers, hidden 4096, 32 heads, d_ff 11008, vocabulary 32000):
6.74 G parameters, 27 GB in float32 — more than this machine's memory. The model is
never built densely: ``abstract_model`` gives its graph and parameter shapes, and
``random_quantized_state`` puts random 2×8 g8 AQLM arrays (codes, codebooks, scales)
where every linear kernel is. Embeddings and the head stay dense in ``--dense-dtype``
(bfloat16 by default, as AQLM checkpoints keep them in 16 bits; ``--quantize-head``
quantizes the head too); norm scales stay float32. Then ``jaxquant.models.generate``
runs greedy generation through the dispatcher (or ``--impl``).

Reported: resident parameter bytes against dense float32 (the issue asks ≤ 1/12), peak
RSS of the process, time to first token (``generate(prompt, 1)``: prefill plus one
sampled token, cold with compilation and warm), and decode tokens/s from
``generate(prompt, N)`` minus ``generate(prompt, 1)`` at equal buffer length.

    python benchmarks/memory_7b.py                  # -> results/memory_7b.json
    python benchmarks/memory_7b.py --new-tokens 8 --dense-dtype float32 --quantize-head
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
from generate import RESULTS, machine_info, write_json  # noqa: E402  (sibling benchmark script)

from jaxquant.models import ModelConfig, abstract_model, generate  # noqa: E402
from jaxquant.models.random_quantized import random_quantized_state, resident_bytes, use_matmul_impl  # noqa: E402
from jaxquant.qarray import is_quantized, tree_bits  # noqa: E402
from jaxquant.select import linear_kernels  # noqa: E402

LLAMA2_7B = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                        num_kv_heads=32, head_dim=128, max_position_embeddings=4096, rms_norm_eps=1e-5)


def _meminfo_bytes(field: str) -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--dense-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--quantize-head", action="store_true", help="quantize lm_head to 2x8 as well")
    parser.add_argument("--impl", default=None, help="force an ops.matmul implementation (default: dispatcher)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "memory_7b.json")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error(f"--new-tokens={args.new_tokens} must be >= 2")
    cfg = LLAMA2_7B
    dense_dtype = jnp.dtype(args.dense_dtype)

    def where(path: str, leaf: Any) -> bool:
        return linear_kernels(path, leaf) or (args.quantize_head and path == "lm_head/kernel")

    # Graph and shapes only: nothing of the 27 GB dense model is allocated.
    graphdef, abstract = nnx.split(abstract_model(cfg))
    dense_f32_bytes = 4 * cfg.num_params()
    assert resident_bytes(abstract) == dense_f32_bytes
    planned = resident_bytes(random_quantized_state(abstract, 0, where=where, dense_dtype=dense_dtype, abstract=True))
    mem_total, mem_avail = _meminfo_bytes("MemTotal"), _meminfo_bytes("MemAvailable")
    print(f"Llama-2-7B shapes: {cfg.num_params() / 1e9:.2f} G parameters = {_gib(dense_f32_bytes)} in float32; "
          f"machine memory {_gib(mem_total)} ({_gib(mem_avail)} available); planned quantized {_gib(planned)}")
    # The largest transient: the dense head converted to float32 inside the step.
    need = planned + (0 if args.quantize_head else 4 * cfg.hidden_size * cfg.vocab_size) + 2**30
    if need > mem_avail:
        raise SystemExit(f"needs about {_gib(need)} but only {_gib(mem_avail)} is available")

    rss0 = _rss_bytes()
    t0 = time.perf_counter()
    params = random_quantized_state(abstract, 0, where=where, dense_dtype=dense_dtype)
    jax.block_until_ready(params)
    build_s = time.perf_counter() - t0
    rss_params = _rss_bytes()
    bits = tree_bits(params)
    held = resident_bytes(params)
    dense_kernels = [(p, leaf.shape) for p, leaf in _paths(params) if not is_quantized(leaf) and len(leaf.shape) == 2]
    print(f"built quantized parameters in {build_s:.1f} s: {_gib(held)} resident "
          f"(1/{dense_f32_bytes / held:.2f} of float32), {bits['bits_per_weight']:.3f} bits/weight on the "
          f"quantized kernels; dense matrices left: {dense_kernels}; RSS {_gib(rss_params)}", flush=True)

    model = abstract_model
    if args.impl is not None:
        use_matmul_impl(model, args.impl, fallback=True)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, args.prompt_len).astype(np.int32)
    bucket = args.prompt_len + args.new_tokens  # same buffer for 1 and N new tokens

    def run(n: int) -> tuple[float, np.ndarray]:
        t = time.perf_counter()
        out = generate(model, prompt, n, params=params, bucket=bucket)  # NumPy result: finished
        return time.perf_counter() - t, out

    load_before = os.getloadavg()
    ttft_cold, first = run(1)
    print(f"time to first token, cold (compile + prefill + sample): {ttft_cold:.1f} s", flush=True)
    gen_cold, tokens = run(args.new_tokens)
    print(f"generate({args.new_tokens}) cold: {gen_cold:.1f} s; tokens {tokens.tolist()}", flush=True)
    t1, tn = [], []
    for _ in range(args.repeats):  # interleaved: both see the same load drift
        t1.append(run(1)[0])
        tn.append(run(args.new_tokens)[0])
    load_after = os.getloadavg()
    ttft = statistics.median(t1)
    gen = statistics.median(tn)
    decode_s = (gen - ttft) / (args.new_tokens - 1)
    peak = _peak_rss_bytes()
    report = {
        "benchmark": "memory_7b", **machine_info(), "command": " ".join(["memory_7b.py", *sys.argv[1:]]),
        "config": dataclasses.asdict(cfg), "num_params": cfg.num_params(),
        "quantization": "random AQLM 2x8 g8 (codes uint8, codebooks and scales float32) on every linear kernel"
                        + (" including lm_head" if args.quantize_head else " but lm_head"),
        "dense_dtype_embeddings_head": str(dense_dtype) if not args.quantize_head else f"{dense_dtype} (embeddings)",
        "norm_dtype": "float32",
        "impl": args.impl or "dispatcher default",
        "machine_mem_total_bytes": mem_total, "machine_mem_available_bytes_at_start": mem_avail,
        "dense_f32_param_bytes": dense_f32_bytes,
        "dense_f32_fits_in_memory": dense_f32_bytes < mem_total,
        "resident_param_bytes": held, "planned_param_bytes": planned,
        "fraction_of_dense_f32": held / dense_f32_bytes, "dense_over_quantized": dense_f32_bytes / held,
        "meets_one_twelfth": held * 12 <= dense_f32_bytes,
        "bits_per_weight_quantized_kernels": bits["bits_per_weight"],
        "dense_matrices_left": [[p, list(s)] for p, s in dense_kernels],
        "build_params_s": build_s,
        "rss_bytes_before_params": rss0, "rss_bytes_after_params": rss_params, "peak_rss_bytes": peak,
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "ttft_cold_s": ttft_cold, "generate_N_cold_s": gen_cold,
        "ttft_s": ttft, "generate_N_s": gen, "all_ttft_s": t1, "all_generate_N_s": tn,
        "decode_s_per_token": decode_s, "decode_tokens_per_s": 1.0 / decode_s if decode_s > 0 else float("nan"),
        "end_to_end_tokens_per_s": args.new_tokens / gen,
        "tokens": tokens.tolist(), "first_token_matches": int(first[0]) == int(tokens[0]),
        "loadavg_before": load_before, "loadavg_after": load_after,
    }
    print(f"resident params {_gib(held)} = 1/{dense_f32_bytes / held:.2f} of float32 ({_gib(dense_f32_bytes)}); "
          f"peak RSS {_gib(peak)}; TTFT {ttft:.2f} s warm / {ttft_cold:.1f} s cold; decode "
          f"{1e3 * decode_s:.0f} ms/token = {report['decode_tokens_per_s']:.2f} tokens/s; "
          f"load {load_before[0]:.2f} -> {load_after[0]:.2f}")
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return report


def _paths(tree: Any) -> list[tuple[str, Any]]:
    from jaxquant.select import path_to_str  # noqa: PLC0415

    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)
    return [(path_to_str(p), leaf) for p, leaf in flat]


if __name__ == "__main__":
    main()
