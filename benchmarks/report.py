"""Render the result JSON files under ``benchmarks/results/`` as Markdown tables.

The README's tables are pasted from this script's output, so every figure there can be
traced to a JSON file written by a benchmark run (which records the command, machine,
versions and load).

    python benchmarks/report.py [--results benchmarks/results]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from typing import Any


def _load(pattern: str) -> list[dict[str, Any]]:
    out = []
    for path in sorted(glob.glob(pattern)):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        data["_file"] = os.path.basename(path)
        out.append(data)
    return out


def _describe_config(cfg: dict[str, Any]) -> str:
    method = cfg.get("method")
    if method == "aqlm":
        return f"{cfg['num_codebooks']}x{cfg['codebook_bits']} g{cfg['group_size']} beam {cfg['beam_size']}"
    extras = []
    if method == "gptq" and not cfg.get("act_order", True):
        extras.append("no act-order")
    if cfg.get("clip_search"):
        extras.append("clip search")
    if cfg.get("symmetric"):
        extras.append("sym")
    group = cfg.get("group_size") or "row"
    return f"{cfg['bits']}-bit g{group}" + (f" ({', '.join(extras)})" if extras else "")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def layer_table(results_dir: str) -> str:
    rows = [
        "| file | method | config | problem | bits/weight | rel. output error | cold s | warm s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in _load(os.path.join(results_dir, "layer_*.json")):
        prob = r.get("problem", {})
        dims = f"{prob.get('d_out', '?')}x{prob.get('d_in', '?')}"
        name = str(prob.get("name", "?"))
        shape = name if dims in name else f"{name} {dims}"
        rows.append(
            f"| {r['_file']} | {r['method']} | {_describe_config(r['config'])} (seed {r.get('seed', 0)}) | {shape} "
            f"| {r['bits_per_weight']:.3f} | {r['rel_output_error']:.4f} | {r['seconds']:.2f} "
            f"| {_seconds(r['seconds_warm'])} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(rows)


def decode_table(results_dir: str) -> str:
    out = []
    for r in _load(os.path.join(results_dir, "decode_*.json")):
        out.append(f"`{r['_file']}` — `{r.get('command', '')}`; load average at end {r.get('loadavg_at_end')}")
        out.append("")
        out.append("| shape | batch | config | auto impl | best ms | dense f32 ms | dense bf16 ms | aqlm ms | × dense f32 | × aqlm |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for row in r["rows"]:
            aqlm = row.get("aqlm_numba")
            vs_aqlm = row.get("speedup_vs_aqlm")
            out.append(
                f"| {row['shape']} | {row['batch']} | {row['config']} | {row['auto_impl']} | {row['best_impl_ms']:.2f} "
                f"| {row['dense_f32_best']:.2f} | {row['dense_bf16_best']:.2f} | {'' if aqlm is None else f'{aqlm:.2f}'} "
                f"| {row['speedup_vs_dense_f32']:.2f} | {'' if vs_aqlm is None else f'{vs_aqlm:.2f}'} |"
            )
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    print("### Layer quantization\n")
    print(layer_table(args.results))
    print("\n### Decode (x @ W)\n")
    print(decode_table(args.results))


if __name__ == "__main__":
    main()
