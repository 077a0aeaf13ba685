"""A Mixtral-8x7B-shaped model generating with its 2-bit experts offloaded to disk (issue 29).

Mixtral-8x7B shapes (32 layers, hidden 4096, 8 experts of 14336 per layer, 2 picked per
token, 32 query and 8 key/value heads, vocabulary 32000): 46.7 G parameters, 187 GB in
float32 and about 23 GB at 4 bits per weight, both more than this machine's 24 GB. The
model is never built densely: ``abstract_model`` gives its graph, attention kernels get
random 4-bit AQLM arrays (2×8 g4) and stay resident with the router, norms and the
bfloat16 embedding and head; each expert gets random 2-bit AQLM arrays (2×8 g8) that go
straight into an ``ExpertStore`` on disk, one expert at a time. By default the store drops
its files from the page cache after each write and read (``--page-cache drop``): the 10.5 GiB
of experts would fit in this machine's page cache, which a machine that needs offloading
does not have, so every load reads the disk.

Then ``OffloadedGenerator`` decodes greedily from a random prompt with no cache, with an
LRU cache of 2, 4 and 6 experts per layer, and with LRU plus speculative prefetch.
Reported per setting: decode tokens/s (from the times the tokens arrive, the first token
excluded; the median over ``--repeats`` rounds, the settings interleaved), the cache's hit rate (per layer too), the prefetch's accuracy, bytes moved; and
the process's peak RSS. Every setting must give the same tokens.

    python benchmarks/moe_offload.py --work /root/jq-moe     # -> results/moe/offload_cpu.json
    python benchmarks/moe_offload.py --work /tmp/m --shape tiny --new-tokens 4 --out /tmp/m/r.json
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
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
from memory_7b import _gib, _meminfo_bytes, _peak_rss_bytes  # noqa: E402

from jaxquant.models import ModelConfig, abstract_model  # noqa: E402
from jaxquant.models.offload import ExpertStore, OffloadedGenerator  # noqa: E402
from jaxquant.models.random_quantized import random_quantized_state, resident_bytes  # noqa: E402
from jaxquant.select import path_to_str  # noqa: E402

SHAPES = {
    "mixtral-8x7b": ModelConfig(architecture="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=4096,
                                rope_theta=1e6, num_experts=8, experts_per_token=2),
    "tiny": ModelConfig(architecture="mixtral", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64, num_experts=4,
                        experts_per_token=2),
}


def build(cfg: ModelConfig, directory: str, seed: int = 0, page_cache: bool = False) -> tuple[Any, Any, ExpertStore, float]:
    """The abstract model, its resident parameters and a disk store of its experts."""
    model = abstract_model(cfg)
    _, abstract = nnx.split(model)

    def is_expert(path: str) -> bool:
        return "/experts/" in path

    # Expert leaves become empty placeholders: the generator never reads them from here.
    resident = jax.tree_util.tree_map_with_path(
        lambda p, leaf: np.zeros((0,), np.float32) if is_expert(path_to_str(p)) else leaf, abstract)
    params = random_quantized_state(resident, seed, group_size=4, dense_dtype=jnp.bfloat16,
                                    where=lambda p, leaf: "/attn/" in p and p.endswith("kernel"))
    if os.path.isdir(directory):
        shutil.rmtree(directory)
    store = ExpertStore("disk", directory, page_cache=page_cache)
    t0 = time.perf_counter()
    raw = abstract.raw_mapping
    for i in range(cfg.num_layers):
        for j in range(cfg.num_experts):
            expert = random_quantized_state(raw["layers"][i]["mlp"]["experts"][j], seed * 100_003 + i * 101 + j,
                                            where=lambda p, leaf: p.endswith("kernel"))
            store.put(i, j, expert)
        print(f"experts of layer {i + 1}/{cfg.num_layers} written", flush=True)
    return model, params, store, time.perf_counter() - t0


def decode(model: Any, params: Any, store: ExpertStore, prompt: np.ndarray, new_tokens: int, cache_size: int,
           prefetch: bool) -> dict[str, Any]:
    """One timed generation with a fresh cache (after the compilations a first run made)."""
    gen = OffloadedGenerator(model, store, cache_size=cache_size, prefetch=prefetch, params=params)
    arrivals: list[float] = []
    try:
        t0 = time.perf_counter()
        tokens = gen.generate(prompt, new_tokens, on_token=lambda _: arrivals.append(time.perf_counter()))
    finally:
        gen.close()
    decode_s = (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1)
    return {"cache_size": cache_size, "prefetch": prefetch, "tokens": tokens.tolist(),
            "first_token_s": arrivals[0] - t0, "decode_s_per_token": decode_s, "decode_tokens_per_s": 1.0 / decode_s,
            **gen.cache.stats.summary()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="directory for the expert files (rewritten)")
    parser.add_argument("--shape", default="mixtral-8x7b", choices=sorted(SHAPES))
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--caches", default="2,4,6", help="LRU sizes (experts per layer)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the settings (medians reported)")
    parser.add_argument("--page-cache", choices=("drop", "keep"), default="drop",
                        help="drop: every expert load reads the disk, as where memory cannot hold the experts "
                             "(default); keep: let the page cache hold them")
    parser.add_argument("--out", type=Path, default=RESULTS / "moe" / "offload_cpu.json")
    args = parser.parse_args(argv)
    if args.new_tokens < 3:
        parser.error(f"--new-tokens={args.new_tokens} must be >= 3")
    cfg = SHAPES[args.shape]
    caches = [int(c) for c in args.caches.split(",")]
    per_weight = {"float32": 32, "4 bits": 4}
    sizes = {k: cfg.num_params() * b / 8 for k, b in per_weight.items()}
    mem_total = _meminfo_bytes("MemTotal")
    print(f"{args.shape}: {cfg.num_params() / 1e9:.2f} G parameters; float32 {_gib(sizes['float32'])}, "
          f"4 bits {_gib(sizes['4 bits'])}; machine memory {_gib(mem_total)}", flush=True)

    model, params, store, write_s = build(cfg, os.path.join(args.work, "experts"), page_cache=args.page_cache == "keep")
    expert_bytes = sum(store.nbytes(i, j) for i in range(cfg.num_layers) for j in range(cfg.num_experts))
    print(f"experts on disk: {_gib(expert_bytes)} (written in {write_s:.0f} s); resident {_gib(resident_bytes(params))}",
          flush=True)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, args.prompt_len).astype(np.int32)
    # Compile every piece once (prefill and single-token shapes), outside the timings.
    decode(model, params, store, prompt, 3, 2, True)
    settings = [(0, False)] + [(c, p) for c in caches for p in (False, True)]
    runs: dict[tuple[int, bool], list[dict[str, Any]]] = {s: [] for s in settings}
    for round_ in range(args.repeats):  # interleaved: every setting sees the same drift in load
        for cache_size, prefetch in settings:
            run = decode(model, params, store, prompt, args.new_tokens, cache_size, prefetch)
            runs[(cache_size, prefetch)].append(run)
            print(f"round {round_ + 1}: cache {cache_size} prefetch {prefetch}: {run['decode_tokens_per_s']:.3f} "
                  f"tokens/s, hit rate {run['hit_rate']:.2f}, prefetch accuracy {run['prefetch_accuracy']:.2f}, "
                  f"{_gib(run['bytes_moved'])} moved", flush=True)
    rows = [{**done[-1], "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in done),
             "all_decode_tokens_per_s": [r["decode_tokens_per_s"] for r in done]} for done in runs.values()]
    same = all(r["tokens"] == rows[0]["tokens"] for done in runs.values() for r in done)
    report = {
        "benchmark": "moe_offload", **machine_info(), "command": " ".join(["moe_offload.py", *sys.argv[1:]]),
        "config": dataclasses.asdict(cfg), "num_params": cfg.num_params(),
        "float32_bytes": sizes["float32"], "four_bit_bytes": sizes["4 bits"], "machine_mem_total_bytes": mem_total,
        "quantization": "random AQLM: experts 2x8 g8 (2 bits + codebooks and scales), attention 2x8 g4 (4 bits); "
                        "router, norms float32/bfloat16, embedding and head bfloat16",
        "expert_bytes_on_disk": expert_bytes, "expert_write_s": write_s, "resident_param_bytes": resident_bytes(params),
        "page_cache": args.page_cache, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats, "rows": rows, "same_tokens": same,
        "peak_rss_bytes": _peak_rss_bytes(),
    }
    print(f"peak RSS {_gib(report['peak_rss_bytes'])}; same tokens in every setting: {same}")
    write_json(args.out, report)
    print(f"wrote {args.out}")
    if not same:
        raise SystemExit("the settings gave different tokens")
    return report


if __name__ == "__main__":
    main()
