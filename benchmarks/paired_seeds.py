"""Paired comparison over data-order seeds of runs written by quickstart_tuning_sweep.py.

Usage:
    python benchmarks/paired_seeds.py --arm "PV=pv_runs.json:pv" --arm "STE=ste_runs.json:ste" \
        [--arm "P only=p_runs.json:pv"] --out benchmarks/results/SUMMARY.json

Each ``--arm NAME=FILE[,FILE...]:MODE`` takes the runs of one mode from one or more sweep
files; they must share every setting (one v_lr) and hold each seed once. The first arm
is compared with every other arm, seed by seed: the mean of ``other - first`` in
perplexity, its paired standard deviation, the paired t statistic, how many seeds the
first arm is lower on, and the exact one-sided sign-flip (permutation) p-value of "the
first arm is lower", which assumes nothing about the shape of the noise.

``--at-step K`` compares the perplexities recorded after step ``K`` of longer runs (the
sweep's ``--eval-at K``) instead of the final ones.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import math
import statistics

from jaxquant.atomic_files import atomic_write_bytes


def _perplexity(run: dict, at_step: int | None, spec: str) -> float:
    """The run's perplexity after ``at_step`` steps (its final one when None or its length)."""
    if at_step is None or at_step == run.get("steps"):
        return float(run["perplexity"])
    at = run.get("perplexity_at", {})
    if str(at_step) not in at:
        raise ValueError(f"--arm {spec!r}: seed {run.get('seed')} has no perplexity after step {at_step} "
                         f"(recorded: {sorted(at, key=int)} and the final step {run.get('steps')})")
    return float(at[str(at_step)])


def load_arm(spec: str, at_step: int | None = None) -> tuple[str, dict[int, float], dict]:
    """``"NAME=FILE[,FILE...]:MODE"`` -> ``(name, {seed: perplexity}, settings)``, the
    perplexities after ``at_step`` steps (None: the final ones)."""
    name, _, rest = spec.partition("=")
    paths, _, mode = rest.rpartition(":")
    if not name or not paths or not mode:
        raise ValueError(f"--arm {spec!r} must look like NAME=FILE[,FILE...]:MODE")
    runs, commands = [], []
    for path in paths.split(","):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        found = [r for r in data["runs"] if r.get("mode") == mode]
        if not found:
            raise ValueError(f"--arm {spec!r}: no runs of mode {mode!r} in {path}")
        runs += found
        commands.append(data.get("command"))
    keys = ("v_lr", "p_lr", "steps", "update_fraction", "trust_ratio", "buffer_decay", "metric", "force_update",
            "v_b1", "v_b2", "every", "selection")
    # Files written before the sweep recorded a setting, and runs at its default (the sweep
    # records the buffers' Adam moments, force_update, every and selection only when changed).
    defaults = {"metric": "euclidean", "force_update": False, "v_b1": 0.9, "v_b2": 0.999, "every": 1,
                "selection": "distance"}
    for r in runs:
        for key, value in defaults.items():
            r.setdefault(key, value)
    for key in keys:
        values = {r.get(key) for r in runs}
        if len(values) != 1:
            raise ValueError(f"--arm {spec!r}: the runs differ in {key}: {sorted(values, key=str)}")
    seeds = [int(r["seed"]) for r in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--arm {spec!r}: a seed appears twice: {sorted(seeds)}")
    by_seed = {int(r["seed"]): _perplexity(r, at_step, spec) for r in runs}
    settings = {"mode": mode, "files": paths.split(","), "commands": commands, **{k: runs[0].get(k) for k in keys}}
    settings["codes_changed_mean"] = statistics.fmean(r["codes_changed"] for r in runs)
    settings["seconds_median"] = statistics.median(r["seconds"] for r in runs)
    return name, by_seed, settings


def _signed_sums(values: list[float]) -> list[float]:
    """``Σ ±v`` for every one of the ``2^len(values)`` sign patterns."""
    return [sum(s * v for s, v in zip(signs, values, strict=True))
            for signs in itertools.product((1, -1), repeat=len(values))]


def sign_flip_p_value(diffs: list[float]) -> float:
    """One-sided exact p-value of ``mean(diffs) > 0`` under random sign flips.

    Counts the ``2^n`` flipped sums that reach the observed one by meeting in the middle
    (each half's ``2^(n/2)`` sums, one half sorted), so 20 seeds take milliseconds.
    """
    observed = sum(diffs)
    # Sums of the same terms in another order differ by rounding: count near-ties as reached.
    tol = 1e-12 * max(1.0, sum(abs(d) for d in diffs))
    left = _signed_sums(diffs[: len(diffs) // 2])
    right = sorted(_signed_sums(diffs[len(diffs) // 2:]))
    reached = sum(len(right) - bisect.bisect_left(right, observed - tol - x) for x in left)
    return reached / (len(left) * len(right))


def compare(first: dict[int, float], other: dict[int, float]) -> dict:
    """Paired statistics of ``other - first`` over the seeds both arms ran."""
    seeds = sorted(set(first) & set(other))
    if len(seeds) < 2:
        raise ValueError(f"need at least 2 common seeds, got {seeds}")
    diffs = [other[s] - first[s] for s in seeds]
    mean = statistics.fmean(diffs)
    sd = statistics.stdev(diffs)
    return {
        "seeds": seeds,
        "diffs": diffs,
        "mean_diff": mean,
        "paired_sd": sd,
        "t": mean / (sd / math.sqrt(len(diffs))) if sd > 0 else math.inf,
        "first_lower_on": sum(d > 0 for d in diffs),
        "sign_flip_p_one_sided": sign_flip_p_value(diffs),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arm", action="append", required=True,
                   help="NAME=FILE[,FILE...]:MODE (repeat; the first is the reference)")
    p.add_argument("--at-step", type=int, default=None,
                   help="compare the perplexities after this many steps (recorded by the sweep's --eval-at)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if len(args.arm) < 2:
        p.error("give at least two --arm")
    arms = [load_arm(spec, args.at_step) for spec in args.arm]
    first_name, first, _ = arms[0]
    summary = {
        "at_step": args.at_step,
        "arms": {name: {"settings": settings, "perplexity_by_seed": runs, "mean": statistics.fmean(runs.values()),
                        "worst": max(runs.values()), "range": max(runs.values()) - min(runs.values())}
                 for name, runs, settings in arms},
        "comparisons": {f"{name} - {first_name}": compare(first, runs) for name, runs, _ in arms[1:]},
        "command": "python benchmarks/paired_seeds.py " + " ".join(f"--arm '{a}'" for a in args.arm)
        + (f" --at-step {args.at_step}" if args.at_step is not None else "") + f" --out {args.out}",
    }
    print(json.dumps(summary["comparisons"], indent=1))
    atomic_write_bytes(args.out, json.dumps(summary, indent=2).encode("utf-8"))


if __name__ == "__main__":
    main()
