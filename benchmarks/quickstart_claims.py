"""Measure the claims of issues 6 and 7 on the quickstart model; write JSON.

Usage (quiet machine; CPU):
    python benchmarks/quickstart_claims.py [--fast] [--with-1x8g8] [--out benchmarks/results/quickstart_claims.json]

Runs ``jaxquant.quickstart.run_quickstart`` with every row of ``METHODS`` (plus, with
``--with-1x8g8``, AQLM 1x8 g8 -> block fine-tuning -> PV-Tuning, ≈1 bit of codes) in this
process, then checks, at ≈2 bits per weight:

- issue 6: AQLM+FT < AQLM < GPTQ 2-bit < RTN 2-bit, and AQLM ≤ GPTQ 3-bit;
- issue 7: PV < AQLM+FT < AQLM, and PV < STE at the same steps and data;

and records the peak host memory (``ru_maxrss``) and wall time of an AQLM-only run
(``--aqlm-only``: run it as a separate process so the peak is that run's alone).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from jaxquant.atomic_files import atomic_write_bytes
from jaxquant import quickstart as qs


def _claims(rows: dict[str, dict]) -> dict[str, dict]:
    ppl = {k: r["perplexity"] for k, r in rows.items()}

    def check(name: str, chain: list[str], ops: list[str]) -> tuple[str, dict]:
        if not all(c in ppl for c in chain):
            return name, {"holds": None, "missing": [c for c in chain if c not in ppl]}
        ok = all((ppl[a] < ppl[b]) if op == "<" else (ppl[a] <= ppl[b]) for a, b, op in zip(chain, chain[1:], ops))
        return name, {"holds": ok, "perplexities": {c: ppl[c] for c in chain},
                      "bits": {c: rows[c]["bits_per_weight"] for c in chain}}

    return dict([
        check("AQLM+FT < AQLM < GPTQ 2-bit < RTN 2-bit",
              ["AQLM+FT 1x8 g4", "AQLM 1x8 g4", "GPTQ 2-bit", "RTN 2-bit"], ["<", "<", "<"]),
        check("AQLM-blk < AQLM (one-shot)", ["AQLM-blk 1x8 g4", "AQLM 1x8 g4"], ["<"]),
        check("AQLM 2-bit <= GPTQ 3-bit", ["AQLM 1x8 g4", "GPTQ 3-bit"], ["<="]),
        check("PV < AQLM+FT < AQLM", ["PV 1x8 g4", "AQLM+FT 1x8 g4", "AQLM 1x8 g4"], ["<", "<"]),
        check("PV < STE (same steps, data)", ["PV 1x8 g4", "STE 1x8 g4"], ["<"]),
    ])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--fast", action="store_true")
    p.add_argument("--aqlm-only", action="store_true", help="only the AQLM 1x8 g4 one-shot and block rows")
    p.add_argument("--with-1x8g8", action="store_true", help="add AQLM 1x8 g8 (+FT, +PV) rows")
    p.add_argument("--labels", default=None, help="comma-separated METHODS labels to run (default: all)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    methods = qs.METHODS
    if args.aqlm_only:
        methods = tuple(m for m in qs.METHODS if m.label in ("AQLM 1x8 g4", "AQLM-blk 1x8 g4", "AQLM+FT 1x8 g4"))
    if args.labels:
        wanted = args.labels.split(",")
        methods = tuple(m for m in qs.METHODS if m.label in wanted)
    if args.with_1x8g8:
        methods += (qs.Method("AQLM 1x8 g8", qs._aqlm(1, 8, 8)),
                    qs.Method("AQLM+FT 1x8 g8", qs._aqlm(1, 8, 8), "blocks+ft"),
                    qs.Method("PV 1x8 g8", qs._aqlm(1, 8, 8), "pv"))
    name = "quickstart_aqlm_only" if args.aqlm_only else "quickstart_tuning" if args.labels else "quickstart_claims"
    out = args.out or f"benchmarks/results/{name}{'_fast' if args.fast else ''}.json"
    t0 = time.perf_counter()
    res = qs.run_quickstart(fast=args.fast, out_dir=os.path.join("/tmp", name), methods=methods, progress=False)
    res["wall_seconds"] = round(time.perf_counter() - t0, 2)
    res["claims"] = _claims({r["method"]: r for r in res["rows"]})
    res["command"] = "python benchmarks/quickstart_claims.py " + " ".join(
        a for a, on in (("--fast", args.fast), ("--aqlm-only", args.aqlm_only), ("--with-1x8g8", args.with_1x8g8)) if on) + (f" --labels '{args.labels}'" if args.labels else "")
    atomic_write_bytes(out, json.dumps(res, indent=2).encode("utf-8"))
    for k, v in res["claims"].items():
        print(f"{'HOLDS' if v['holds'] else 'FAILS' if v['holds'] is False else 'n/a  '}  {k}")
    print(f"peak RSS {res['peak_rss_mb']} MB, wall {res['wall_seconds']} s; wrote {out}")


if __name__ == "__main__":
    main()
