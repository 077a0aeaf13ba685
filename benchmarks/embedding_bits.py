"""SmolLM2-135M with its tied embedding stored at 32, 16 and 8 bits (issue 24).

Usage:
    python benchmarks/embedding_bits.py --work ~/jq-real-model [--runs gptq-3-g64,aqlm-2x8-g8,aqlm-2x8-g8+pv] \
        [--out benchmarks/results/real_model/embedding_bits.json]

For the float model and the seed-0 model of each named run of the quality benchmark
(``benchmarks/real_model.py``, whose ``WORK/NAME/seed0/model`` must exist), the embedding
is stored by ``jaxquant.store_embeddings`` at each width and scored on the benchmark's
windows with its scorer (so the float32 rows repeat its summary's figures). Sizes are
``jaxquant.tree_bits``: the linear layers' bits per weight, the embedding's, and the whole
model's bytes with every code at its nominal width.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from real_model import DEFAULT_PROTOCOL, Scorer, _write_json  # noqa: E402

DEFAULT_OUT = os.path.join(HERE, "results", "real_model", "embedding_bits.json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="the quality benchmark's work directory")
    p.add_argument("--runs", default="gptq-3-g64,aqlm-2x8-g8,aqlm-2x8-g8+pv")
    p.add_argument("--bits", default="32,16,8")
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args(argv)

    from jaxquant import store_embeddings, tree_bits  # noqa: PLC0415
    from jaxquant.models.quantized_dirs import load_quantized_dir  # noqa: PLC0415
    from jaxquant.quickstart import machine_record  # noqa: PLC0415

    with open(DEFAULT_PROTOCOL, encoding="utf-8") as f:
        protocol = json.load(f)
    scorer = Scorer(protocol)
    models = {"float": scorer.float_params}
    for name in args.runs.split(","):
        models[name] = load_quantized_dir(os.path.join(args.work, name, "seed0", "model"))[1]
    rows = []
    for name, params in models.items():
        for bits in (int(b) for b in args.bits.split(",")):
            t0 = time.perf_counter()
            stored = store_embeddings(params, bits)
            sizes = tree_bits(stored)
            row = {"model": name, "embed_bits": bits,
                   "bits_per_weight": None if name == "float" else sizes["bits_per_weight"],
                   "embedding_bits_per_weight": sizes["embedding_bits"] / sizes["embedding_params"],
                   "model_mb": sizes["total_bytes"] / 1e6, **scorer.score(stored)}
            rows.append(row)
            print(f"[{time.strftime('%H:%M:%S')}] {name} embedding at {bits} bits: {row['model_mb']:.1f} MB, "
                  f"ppl {row['ppl']:.4f} / {row['ppl_second']:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    _write_json(args.out, {
        "model": protocol["model"], "eval": scorer.eval_info(),
        "command": shlex.join([os.path.relpath(sys.argv[0], os.path.dirname(HERE)), *sys.argv[1:]]),
        "rule": "embed_bits 16 is float16, 8 is round-to-nearest per row with a float16 scale and zero point; "
                "model_mb counts every leaf (codes at their nominal width)",
        "rows": rows, "machine": machine_record(),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
