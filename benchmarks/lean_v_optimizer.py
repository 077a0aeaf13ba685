"""Runs and decides ``benchmarks/protocols/lean_v_optimizer.md``.

Usage:
    python benchmarks/lean_v_optimizer.py --start ~/jq-real-model/aqlm-2x8-g8/seed0/model \
        --work ~/jq-lean-v --out benchmarks/results/real_model/lean_v_optimizer_protocol.json

For each data seed, the default and the lean setting run side by side (two processes);
a run whose ``finetune.json`` exists is not run again, so an interrupted call resumes.
The summary holds each run's final validation perplexity and peak memory, the paired
relative differences, and the protocol's decision.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess

from paired_seeds import sign_flip_p_value

from jaxquant.atomic_files import atomic_write_bytes

SEEDS = (301, 302, 303)
SETTINGS = {"default": [], "lean": ["--v-beta1", "0", "--mu-dtype", "bfloat16"]}
MEAN_MARGIN, SEED_MARGIN = 0.005, 0.015


def command(start: str, out: str, seed: int, setting: str) -> list[str]:
    """The protocol's ``jaxquant finetune`` command for one run."""
    return ["/usr/bin/time", "-v", "jaxquant", "finetune", start, "--teacher", "smollm2-135m", "--out", out,
            "--steps", "40", "--batch-size", "4", "--seqlen", "256", "--beam-size", "4", "--eval-every", "0",
            "--eval-windows", "16", "--save-every", "1000", "--seed", str(seed), "--no-progress",
            *SETTINGS[setting]]


def run_seed(start: str, work: str, seed: int) -> None:
    """Both settings of one seed, side by side, unless already done."""
    procs = []
    for setting in SETTINGS:
        out = os.path.join(work, f"{setting}-{seed}")
        if os.path.exists(os.path.join(out, "finetune.json")):
            continue
        os.makedirs(work, exist_ok=True)
        with open(f"{out}.log", "w") as log:
            procs.append(subprocess.Popen(command(start, out, seed, setting), stdout=log, stderr=subprocess.STDOUT))
    for proc in procs:
        if proc.wait() != 0:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")


def result(work: str, seed: int, setting: str) -> dict:
    """Final validation perplexity and peak memory of one finished run."""
    out = os.path.join(work, f"{setting}-{seed}")
    with open(os.path.join(out, "finetune.json")) as f:
        report = json.load(f)
    with open(f"{out}.log") as f:
        peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", f.read())
    return {"val_ppl": report["history"][-1]["val_ppl"], "peak_rss_kb": int(peak.group(1)) if peak else None}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--start", required=True, help="the quantized model every run starts from")
    p.add_argument("--work", required=True, help="directory of the runs")
    p.add_argument("--out", required=True, help="summary JSON")
    args = p.parse_args(argv)
    for seed in SEEDS:
        run_seed(args.start, args.work, seed)
    runs = {s: {setting: result(args.work, s, setting) for setting in SETTINGS} for s in SEEDS}
    rel = [(runs[s]["lean"]["val_ppl"] - runs[s]["default"]["val_ppl"]) / runs[s]["default"]["val_ppl"]
           for s in SEEDS]
    lean_becomes_default = statistics.fmean(rel) <= MEAN_MARGIN and max(rel) <= SEED_MARGIN
    summary = {
        "protocol": "benchmarks/protocols/lean_v_optimizer.md",
        "command": " ".join(command(args.start, "OUT", 0, "lean")[2:]).replace("--seed 0", "--seed SEED"),
        "runs": {str(s): runs[s] for s in SEEDS},
        "relative_diff_lean_minus_default": rel,
        "mean_relative_diff": statistics.fmean(rel),
        "sd_relative_diff": statistics.stdev(rel),
        "sign_flip_p_lean_worse": sign_flip_p_value(rel),
        "rule": f"lean becomes the default if mean <= {MEAN_MARGIN:+.1%} and every seed <= {SEED_MARGIN:+.1%}",
        "lean_becomes_default": lean_becomes_default,
    }
    atomic_write_bytes(args.out, (json.dumps(summary, indent=1) + "\n").encode())
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
