"""EvoPress on SmolLM2-135M by a protocol fixed in advance (issue 28).

Usage:
    python benchmarks/evopress.py --work ~/jq-evopress \
        [--protocol benchmarks/protocols/evopress_real_model.json] [--only NAME,...] [--seeds 1,2,3] \
        [--summary-only] [--out benchmarks/results/evopress/summary.json]

Every configuration runs as the ``jaxquant search`` command a user would type, under
``/usr/bin/time -v``, one run per seed in ``WORK/NAME/seedS/`` (``search.json``, the log,
the recipe and the model), all sharing the level database ``WORK/database``. A rerun
skips finished runs. Each finished run's ``search.json`` is copied to ``runs/`` beside the
summary; the summary reads a run from there when its work directory is gone. The summary holds one row per assignment (``name``,
``average_bits``, ``ppl`` with its spread over seeds, and the command that produced
it) and the protocol's claims, decided by its rule.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from real_model import _timed, _write_json, compare, parse_protocol_args  # noqa: E402

DEFAULT_PROTOCOL = os.path.join(HERE, "protocols", "evopress_real_model.json")
DEFAULT_OUT = os.path.join(HERE, "results", "evopress", "summary.json")
REPO = os.path.dirname(HERE)


def _levels_arg(protocol: dict[str, Any], level_set: str, work: str) -> str:
    """``--levels``: names, and recipe files (written into ``work``) for the protocol's ``recipe_files``."""
    items = []
    for name in protocol["level_sets"][level_set]:
        spec = protocol.get("recipe_files", {}).get(name)
        if spec is None:
            items.append(name)
            continue
        path = os.path.join(work, f"{name}.json")
        _write_json(path, {"recipe": spec})
        items.append(path)
    return ",".join(items)


def command(cfg: dict[str, Any], protocol: dict[str, Any], seed: int, work: str) -> list[str]:
    """The ``jaxquant search`` command line of one run."""
    db, s = protocol["database"], {**protocol["search"], **cfg.get("search", {})}
    out = os.path.join(work, cfg["name"], f"seed{seed}", "search")
    return ["jaxquant", "search", protocol["model"], "--budget", str(cfg["budget"]),
            "--levels", _levels_arg(protocol, cfg["levels"], work), "--out", out,
            "--database", os.path.join(work, "database"), "--calib", db["calib"], "--nsamples", str(db["nsamples"]),
            "--seqlen", str(db["seqlen"]), "--seed", str(db["seed"]), "--search-seed", str(seed),
            "--fitness-windows", str(s["fitness_windows"]), "--fitness-seqlen", str(s["fitness_seqlen"]),
            "--generations", str(s["generations"]), "--offspring", str(s["offspring"]),
            "--survivors", ",".join(map(str, s["survivors"])), "--stage-windows", ",".join(map(str, s["stage_windows"])),
            "--initial-candidates", str(s["initial_candidates"]), "--tolerance", str(s["tolerance"]),
            "--eval", protocol["evaluation"]["text"], "--resume", "--no-progress",
            *(["--fixed-windows"] if s.get("fixed_windows") else []), *(["--start", s["start"]] if "start" in s else []),
            *[arg for key in ("holdout_windows", "holdout_checkpoints") if key in s
              for arg in (f"--{key.replace('_', '-')}", str(s[key]))]]


def run_one(cfg: dict[str, Any], protocol: dict[str, Any], seed: int, work: str) -> dict[str, Any]:
    """Run (or reuse) one configuration at one seed; returns its ``search.json`` with timings."""
    run_dir = os.path.join(work, cfg["name"], f"seed{seed}")
    result_path = os.path.join(run_dir, "result.json")
    if os.path.exists(result_path):
        with open(result_path, encoding="utf-8") as f:
            return json.load(f)
    os.makedirs(run_dir, exist_ok=True)
    cmd = command(cfg, protocol, seed, work)
    print(f"[{time.strftime('%H:%M:%S')}] {cfg['name']} seed {seed}: {shlex.join(cmd)}", flush=True)
    timing = _timed(cmd, os.path.join(run_dir, "log.txt"))
    with open(os.path.join(run_dir, "search", "search.json"), encoding="utf-8") as f:
        search = json.load(f)
    result = {**search, "timing": timing, "command": shlex.join(cmd), "seed": seed}
    _write_json(result_path, result)
    rows = {r["name"]: r for r in search["perplexity"]["rows"]}
    print(f"[{time.strftime('%H:%M:%S')}] {cfg['name']} seed {seed}: {search['average_bits']:.3f} bits, ppl "
          f"{rows['evopress']['ppl']:.3f}; search {search['search']['seconds']:.0f} s", flush=True)
    return result


def _row(name: str, bits: float, ppls: list[float], seeds: list[int], random: bool, cmd: str,
         extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "method": name, "average_bits": bits, "ppl": statistics.fmean(ppls),
            "ppl_std": statistics.stdev(ppls) if len(ppls) > 1 else None, "seeds": seeds, "random": random,
            "per_seed": [{"seed": s, "ppl": p} for s, p in zip(seeds, ppls)], "command": cmd, **(extra or {})}


def rows_of(cfg: dict[str, Any], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The searched row (over seeds) and the configuration's baselines (seed-independent)."""
    seeds = [r["seed"] for r in results]
    by_name = [{row["name"]: row for row in r["perplexity"]["rows"]} for r in results]
    searched = _row(cfg["name"], statistics.fmean(r["average_bits"] for r in results),
                    [b["evopress"]["ppl"] for b in by_name], seeds, True, results[0]["command"],
                    {"search_seconds": [r["search"]["seconds"] for r in results],
                     "database_build_seconds": results[0]["database"]["build_seconds"],
                     "database_megabytes": results[0]["database"]["megabytes"],
                     "level_counts": [r["level_counts"] for r in results]})
    first = by_name[0]
    cmd = results[0]["command"]
    uniforms = [_row(n, first[n]["average_bits"], [first[n]["ppl"]], seeds[:1], False, cmd)
                for n in first if n.startswith("uniform ")]
    label = f"{cfg['budget']} ({cfg['levels']} levels)"
    greedy = first["error-sum greedy"]
    out = [searched, *uniforms,
           _row(f"error-sum greedy {label}", greedy["average_bits"], [greedy["ppl"]], seeds[:1], False, cmd)]
    if uniforms:
        best = min(uniforms, key=lambda r: r["ppl"])
        out.append({**best, "name": f"best uniform level within {label}", "method": f"best uniform level within "
                    f"{label}", "level": best["name"]})
    return out


def _external_rows(protocol: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for ext in protocol.get("external_rows", []):
        with open(os.path.join(REPO, ext["from"]), encoding="utf-8") as f:
            source = json.load(f)
        row = next(r for r in source["rows"] if r["method"] == ext["method"])
        rows.append(_row(ext["name"], row["bits_per_weight"], [s["ppl"] for s in row["per_seed"]],
                         row["seeds"], row["random"], row["command"], {"from": ext["from"]}))
    return rows


def summarize(protocol: dict[str, Any], rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each claim decided by the protocol's rule on the finished rows (``holds`` None: undecided)."""
    claims = []
    for claim in protocol["claims"]:
        left, right = rows.get(claim["left"]), rows.get(claim["right"])
        if left is None or right is None:
            claims.append({**claim, "holds": None, "why": "a row is missing"})
            continue
        claim_seeds = set(protocol["seeds"])
        left = {**left, "per_seed": [s for s in left["per_seed"] if s["seed"] in claim_seeds or not left["random"]]}
        claims.append({**claim, **compare(left, right)})
    return claims


def main(argv: list[str] | None = None) -> int:
    args, protocol, only, seeds = parse_protocol_args(argv, __doc__.split("\n\n")[0], DEFAULT_PROTOCOL, DEFAULT_OUT)
    work = os.path.abspath(os.path.expanduser(args.work))
    os.makedirs(work, exist_ok=True)
    configs = [c for c in protocol["configs"] if only is None or c["name"] in only]
    if not args.summary_only:
        for seed in seeds:
            for cfg in configs:
                run_one(cfg, protocol, seed, work)
    rows: dict[str, dict[str, Any]] = {r["name"]: r for r in _external_rows(protocol)}
    runs_dir = os.path.join(os.path.dirname(os.path.abspath(args.out)), "runs")
    for cfg in protocol["configs"]:
        finished = []
        for seed in protocol["seeds"]:
            path = os.path.join(work, cfg["name"], f"seed{seed}", "result.json")
            record = os.path.join(runs_dir, f"{cfg['name']}-seed{seed}.json")
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    finished.append(json.load(f))
                # Each run's search (assignment, fitness per generation) for the notebook's plots.
                _write_json(record, finished[-1])
            elif os.path.exists(record):
                # A run whose work directory is gone (another machine) counts by its committed record.
                with open(record, encoding="utf-8") as f:
                    finished.append(json.load(f))
        if finished:
            rows.update({r["name"]: r for r in rows_of(cfg, finished)})
    summary = {"protocol": os.path.relpath(args.protocol, REPO), "command": "python benchmarks/evopress.py "
               + shlex.join(argv if argv is not None else sys.argv[1:]), "rows": list(rows.values()),
               "claims": summarize(protocol, rows)}
    _write_json(args.out, summary)
    for r in rows.values():
        spread = "" if r["ppl_std"] is None else f" ± {r['ppl_std']:.3f}"
        print(f"{r['name']:<48} {r['average_bits']:.3f} bits  ppl {r['ppl']:.3f}{spread} ({len(r['seeds'])} seeds)")
    for c in summary["claims"]:
        print(f"claim {c['left']} < {c['right']}: holds={c['holds']} p={c.get('p')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
