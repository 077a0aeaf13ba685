"""Run the layer benchmark, the decode benchmark, PV-Tuning on a fixed problem and the main job
at two commits, side by side.

Usage::

    python benchmarks/compare_refs.py --before REF --after REF --work DIR \
        [--out benchmarks/results/redesign/reproduction.json] [--stages layer,decode,pv,main_job]

Each commit is checked out as a detached git worktree under ``--work`` and every command
runs with that worktree first on ``PYTHONPATH`` (this environment's packages otherwise),
before and after alternating per command so that machine load falls on both alike. AQLM's
``grad_dtype`` is pinned to ``bfloat16`` in the layer runs (what ``"auto"`` chose on the
machine these figures come from), so a change of default does not show as a change of
result. The report puts each printed figure of the two commits next to each other and says
whether they agree to the digits the README prints.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any

# (name, command after "python"; {out} is the result path); the README's layer rows.
LAYER_RUNS = [
    ("rtn-2-g128", ["benchmarks/quantize_layer.py", "--problem", "synthetic", "--method", "rtn", "--bits", "2",
                    "--group-size", "128", "--no-warm"]),
    ("gptq-2-g128", ["benchmarks/quantize_layer.py", "--problem", "synthetic", "--method", "gptq", "--bits", "2",
                     "--group-size", "128", "--no-warm"]),
    ("gptq-3-g128", ["benchmarks/quantize_layer.py", "--problem", "synthetic", "--method", "gptq", "--bits", "3",
                     "--group-size", "128", "--no-warm"]),
    ("aqlm-2x8-g8-beam1", ["benchmarks/quantize_layer.py", "--method", "aqlm", "--num-codebooks", "2",
                           "--codebook-bits", "8", "--group-size", "8", "--beam-size", "1", "--seed", "0",
                           "--grad-dtype", "bfloat16", "--no-warm"]),
    ("aqlm-2x8-g8-beam8", ["benchmarks/quantize_layer.py", "--method", "aqlm", "--num-codebooks", "2",
                           "--codebook-bits", "8", "--group-size", "8", "--beam-size", "8", "--seed", "0",
                           "--grad-dtype", "bfloat16", "--no-warm"]),
]
DECODE_RUN = ["benchmarks/decode.py", "--shapes", "4096x4096", "11008x4096", "--batches", "1", "--configs", "2x8",
              "--repeats", "30"]
# The jaxquant command through its entry point (jaxquant.cli:main at both commits).
# Run from this checkout's benchmarks/ against each commit's package (it speaks both PV APIs).
PV_RUN = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "pv_fixed_problem.py")]
MAIN_JOB = ["-c", "import sys, jaxquant.cli; sys.exit(jaxquant.cli.main())", "quickstart", "--no-progress"]


def _worktree(ref: str, work: str) -> str:
    path = os.path.join(work, f"tree-{ref.replace('/', '_')}")
    if not os.path.isdir(path):
        subprocess.run(["git", "worktree", "add", "--detach", path, ref], check=True, capture_output=True)
    return path


def _run(tree: str, args: list[str], log: str) -> float:
    env = dict(os.environ, PYTHONPATH=tree)
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.run([sys.executable, *args], cwd=tree, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed in {tree} (exit {proc.returncode}); see {log}")
    return round(time.perf_counter() - start, 1)


def _layer(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    return {"bits_per_weight": d["bits_per_weight"], "rel_output_error": d["rel_output_error"]}


def _decode(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    return {r["shape"]: {"auto_impl": r["auto_impl"], "speedup_vs_dense_f32": r["speedup_vs_dense_f32"],
                         "speedup_vs_aqlm": r.get("speedup_vs_aqlm")} for r in d["rows"]}


def _main_job(out_dir: str) -> dict[str, Any]:
    with open(os.path.join(out_dir, "results.json"), encoding="utf-8") as f:
        d = json.load(f)
    return {row["method"]: {k: row.get(k) for k in ("bits_per_weight", "ppl", "ppl_second", "sample")}
            for row in d["rows"]}


def _same(a: Any, b: Any, digits: int) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return f"{a:.{digits}g}" == f"{b:.{digits}g}"
    return a == b


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True)
    p.add_argument("--after", required=True)
    p.add_argument("--work", required=True, help="directory for the worktrees and the runs' outputs")
    p.add_argument("--out", default="benchmarks/results/redesign/reproduction.json")
    p.add_argument("--stages", default="layer,decode,pv,main_job", help="comma-separated stages to run")
    args = p.parse_args(argv)
    stages = set(args.stages.split(","))
    if not stages <= {"layer", "decode", "pv", "main_job"}:
        raise SystemExit(f"--stages {args.stages}: known stages are layer, decode, pv, main_job")
    os.makedirs(args.work, exist_ok=True)
    refs = {"before": args.before, "after": args.after}
    commits = {k: subprocess.run(["git", "rev-parse", r], check=True, capture_output=True, text=True).stdout.strip()
               for k, r in refs.items()}
    trees = {k: _worktree(commits[k], args.work) for k in refs}
    report: dict[str, Any] = {"commits": commits, "machine": platform.platform(), "cpu_count": os.cpu_count(),
                              "command": "python " + " ".join(["benchmarks/compare_refs.py", *sys.argv[1:]]),
                              "layer": {}, "decode": {}, "main_job": {}, "seconds": {}}
    for name, cmd in LAYER_RUNS if "layer" in stages else []:
        got = {}
        for side in refs:
            out = os.path.join(args.work, f"{side}-layer-{name}.json")
            report["seconds"][f"{side}/layer/{name}"] = _run(trees[side], [*cmd, "--out", out], out + ".log")
            got[side] = _layer(out)
        same = all(_same(got["before"][k], got["after"][k], 4) for k in got["before"])
        report["layer"][name] = {**got, "same_to_4_digits": same}
        print(f"layer {name}: {got['before']['rel_output_error']:.5g} / {got['after']['rel_output_error']:.5g}"
              f" same={same}", flush=True)
    got = {}
    for side in refs if "decode" in stages else []:
        out = os.path.join(args.work, f"{side}-decode.json")
        report["seconds"][f"{side}/decode"] = _run(trees[side], [*DECODE_RUN, "--out", out], out + ".log")
        got[side] = _decode(out)
    report["decode"] = got
    print(f"decode: {json.dumps(got)}", flush=True)
    got = {}
    for side in refs if "pv" in stages else []:
        out = os.path.join(args.work, f"{side}-pv.json")
        report["seconds"][f"{side}/pv"] = _run(trees[side], [*PV_RUN, "--out", out], out + ".log")
        with open(out, encoding="utf-8") as f:
            got[side] = json.load(f)
    if got:
        report["pv_fixed_problem"] = {**got, "identical": got["before"] == got["after"]}
        print(f"PV on fixed problems identical: {got['before'] == got['after']}", flush=True)
    if "main_job" in stages:
        got = {}
        for side in refs:
            out = os.path.join(args.work, f"{side}-main-job")
            report["seconds"][f"{side}/main_job"] = _run(trees[side], [*MAIN_JOB, "--out", out], out + ".log")
            got[side] = _main_job(out)
        same = {label: all(_same(got["before"][label][k], got["after"][label][k], 4)
                           for k in ("bits_per_weight", "ppl", "ppl_second"))
                for label in got["before"]}
        report["main_job"] = {**got, "same_to_4_digits": same}
        print(f"main job same to 4 digits: {same}", flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
