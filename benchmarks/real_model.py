"""Quality of every method on SmolLM2-135M, by a protocol fixed in advance (issue 24).

Usage:
    python benchmarks/real_model.py --work ~/jq-real-model \
        [--protocol benchmarks/protocols/real_model.json] [--only NAME,...] [--seeds 0,1] \
        [--summary-only] [--out benchmarks/results/real_model/summary.json]

Every configuration of the protocol runs as the ``jaxquant`` command a user would type
(``quantize``, then ``finetune`` for tuned rows), under ``/usr/bin/time -v``, so its time
and peak memory are the whole command's. Each finished run leaves ``WORK/NAME/seedS/``
(the model directory and ``result.json``); a rerun skips finished runs, so the benchmark
resumes after an interruption and grows seed by seed. Runs go seed-major: every
configuration's first seed before any second seed.

Each run is scored here, on its decoded weights, with the float model's forward: token
perplexity on every window of the built-in validation split and on the first windows of
the second corpus (never used for calibration). The summary holds one row per
configuration (mean and spread over its finished seeds) and the protocol's orderings,
decided by its rule. An ordering may name a row of another protocol's summary, listed
under the protocol's ``external_rows`` (``{"name": ..., "from": "benchmarks/results/..."}``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from jaxquant.atomic_files import atomic_write_bytes

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PROTOCOL = os.path.join(HERE, "protocols", "real_model.json")
DEFAULT_OUT = os.path.join(HERE, "results", "real_model", "summary.json")


def _write_json(path: str, data: Any) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode("utf-8"))


def _timed(cmd: list[str], log_path: str) -> dict[str, float]:
    """Run ``cmd`` under ``/usr/bin/time -v``; its output goes to ``log_path``.

    Returns:
        ``{"seconds", "peak_rss_mb"}`` as ``time`` measured them.

    Raises:
        RuntimeError: the command failed (the log's tail is in the message).
    """
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=log, stderr=subprocess.STDOUT, check=False)
    with open(log_path, encoding="utf-8") as f:
        text = f.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited with {proc.returncode}:\n{text[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text).group(1)
    seconds = sum(float(p) * 60**i for i, p in enumerate(reversed(wall.split(":"))))
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(peak_kb / 1024, 1)}


class Scorer:
    """Perplexities of decoded weights with the float model's compiled forward."""

    def __init__(self, protocol: dict[str, Any]) -> None:
        from jaxquant.data import eval_windows, load_tokenizer, read_text  # noqa: PLC0415
        from jaxquant.known_models import resolve_model  # noqa: PLC0415
        from jaxquant.models import from_pretrained, functional  # noqa: PLC0415

        ev = protocol["evaluation"]
        self.seqlen = ev["seqlen"]
        path = resolve_model(protocol["model"])
        self.apply_fn, self.float_params = functional(from_pretrained(path))
        tokenizer = load_tokenizer(path)
        val = eval_windows(tokenizer.encode(read_text("builtin", split="validation")), self.seqlen)
        second = eval_windows(tokenizer.encode(read_text(ev["second_corpus"])), self.seqlen)
        if ev["validation_windows"] != "all":
            val = val[: ev["validation_windows"]]
        self.texts = {"ppl": val.reshape(-1), "ppl_second": second[: ev["second_windows"]].reshape(-1)}

    def score(self, params: Any) -> dict[str, float]:
        from jaxquant.eval import perplexity  # noqa: PLC0415
        from jaxquant.qarray import dequantize  # noqa: PLC0415

        dense = dequantize(params)
        return {k: perplexity(self.apply_fn, dense, ids, self.seqlen, batch_size=4) for k, ids in self.texts.items()}

    def eval_info(self) -> dict[str, int]:
        return {"seqlen": self.seqlen, **{f"{k}_tokens": int(v.size) for k, v in self.texts.items()}}


def _dir_mb(path: str) -> float:
    total = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)
    return round(total / 1e6, 2)


def _recipe_arg(cfg: dict[str, Any], run_dir: str) -> str:
    """The ``--recipe`` of a configuration: its name, or with ``recipe_fields`` a recipe file
    in the run directory holding the named recipe with those fields set."""
    if not cfg.get("recipe_fields"):
        return cfg["recipe"]
    from jaxquant.recipes_named import named_recipe, recipe_to_dict  # noqa: PLC0415

    path = os.path.join(run_dir, "recipe.json")
    _write_json(path, {"recipe": {**recipe_to_dict(named_recipe(cfg["recipe"])), **cfg["recipe_fields"]}})
    return path


def _command(cfg: dict[str, Any], protocol: dict[str, Any], seed: int, run_dir: str, work: str) -> list[str]:
    """The ``jaxquant`` command line of one run."""
    model = protocol["model"]
    if cfg["kind"] == "quantize":
        cal = protocol["calibration"]
        return ["jaxquant", "quantize", model, "--recipe", _recipe_arg(cfg, run_dir), "--calib", cal["text"],
                "--nsamples", str(cal["windows"]), "--seqlen", str(cal["seqlen"]), "--seed", str(seed),
                "--out", os.path.join(run_dir, "model"), "--eval", "none", "--no-progress", *cfg.get("args", [])]
    if cfg["kind"] == "finetune":
        base = os.path.join(work, cfg["base"], f"seed{seed}", "model")
        return ["jaxquant", "finetune", base, "--teacher", model, "--out", os.path.join(run_dir, "model"),
                "--seed", str(seed), "--eval-every", "0", "--eval-windows", "4", "--no-progress",
                *cfg.get("args", [])]
    raise ValueError(f"config {cfg['name']!r}: unknown kind {cfg['kind']!r}")


def run_one(cfg: dict[str, Any], protocol: dict[str, Any], seed: int, work: str, scorer: Scorer) -> dict[str, Any]:
    """Run (or reuse) one configuration at one seed; returns its ``result.json``."""
    from jaxquant.models.quantized_dirs import load_quantized_dir  # noqa: PLC0415
    from jaxquant.qarray import tree_bits  # noqa: PLC0415

    run_dir = os.path.join(work, cfg["name"], f"seed{seed}")
    result_path = os.path.join(run_dir, "result.json")
    if os.path.exists(result_path):
        with open(result_path, encoding="utf-8") as f:
            return json.load(f)
    os.makedirs(run_dir, exist_ok=True)
    if cfg["kind"] == "float":
        result = {"bits_per_weight": 32.0, "seconds": 0.0, "peak_rss_mb": None, "command": None,
                  **scorer.score(scorer.float_params)}
    else:
        start = 0.0
        if cfg["kind"] == "finetune":  # a tuned model's cost includes the model it starts from
            base_cfg = next(c for c in protocol["configs"] if c["name"] == cfg["base"])
            start = run_one(base_cfg, protocol, seed, work, scorer)["seconds_with_start"]
        cmd = _command(cfg, protocol, seed, run_dir, work)
        print(f"[{time.strftime('%H:%M:%S')}] {cfg['name']} seed {seed}: {shlex.join(cmd)}", flush=True)
        timing = _timed(cmd, os.path.join(run_dir, "log.txt"))
        timing["seconds_with_start"] = round(timing["seconds"] + start, 2)
        model_dir = os.path.join(run_dir, "model")
        _, params = load_quantized_dir(model_dir)
        result = {"bits_per_weight": float(tree_bits(params)["bits_per_weight"]), **timing,
                  "params_mb": _dir_mb(os.path.join(model_dir, "params")), "command": shlex.join(cmd),
                  **scorer.score(params)}
    result.setdefault("seconds_with_start", result["seconds"])
    result["seed"] = seed
    _write_json(result_path, result)
    print(f"[{time.strftime('%H:%M:%S')}] {cfg['name']} seed {seed}: {result['bits_per_weight']:.3f} bits, "
          f"ppl {result['ppl']:.3f} / {result['ppl_second']:.3f}, {result['seconds']:.0f} s, "
          f"peak {result['peak_rss_mb']} MB", flush=True)
    return result


def _seeds_of(cfg: dict[str, Any], seeds: list[int]) -> list[int]:
    random = cfg["kind"] != "float" and cfg.get("random", True)
    return seeds if random else seeds[:1]


def _row(cfg: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    def spread(key: str) -> float | None:
        vals = [r[key] for r in results]
        return statistics.stdev(vals) if len(vals) > 1 else None

    first = results[0]
    return {
        "method": cfg["name"], "bits_per_weight": first["bits_per_weight"],
        "ppl": statistics.fmean(r["ppl"] for r in results),
        "ppl_second": statistics.fmean(r["ppl_second"] for r in results),
        "seeds": [r["seed"] for r in results], "random": cfg["kind"] != "float" and cfg.get("random", True),
        "ppl_std": spread("ppl"), "ppl_second_std": spread("ppl_second"),
        "per_seed": [{k: r[k] for k in ("seed", "ppl", "ppl_second", "seconds", "seconds_with_start", "peak_rss_mb")}
                     for r in results],
        "seconds": statistics.fmean(r["seconds_with_start"] for r in results),
        "peak_rss_mb": max((r["peak_rss_mb"] or 0.0) for r in results) or None,
        "params_mb": first.get("params_mb"), "command": first["command"],
    }


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The protocol's decision of ``a < b`` on validation perplexity."""
    va = [s["ppl"] for s in a["per_seed"]]
    vb = [s["ppl"] for s in b["per_seed"]]
    lower = statistics.fmean(va) < statistics.fmean(vb)
    out: dict[str, Any] = {"a": a["method"], "b": b["method"], "mean_a": statistics.fmean(va),
                           "mean_b": statistics.fmean(vb), "p": None}
    if (a["random"] and len(va) < 2) or (b["random"] and len(vb) < 2):
        out["holds"] = None
        out["why"] = "a randomized row has one finished seed"
    elif not a["random"] and not b["random"]:
        out["holds"] = lower
    else:
        if a["random"] and b["random"]:
            p = scipy_stats.ttest_ind(va, vb, equal_var=False, alternative="less").pvalue
        elif a["random"]:
            p = scipy_stats.ttest_1samp(va, vb[0], alternative="less").pvalue
        else:
            p = scipy_stats.ttest_1samp(vb, va[0], alternative="greater").pvalue
        out["p"] = float(p) if np.isfinite(p) else None
        out["holds"] = bool(lower and out["p"] is not None and out["p"] < 0.05)
    return out


def external_rows(protocol: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The rows of other summaries that the protocol's orderings name, as those summaries hold them."""
    rows = {}
    for ext in protocol.get("external_rows", []):
        with open(os.path.join(os.path.dirname(HERE), ext["from"]), encoding="utf-8") as f:
            source = json.load(f)
        row = next((r for r in source["rows"] if r["method"] == ext["name"]), None)
        if row is None:
            raise ValueError(f"external_rows: {ext['from']} has no row {ext['name']!r}; it has "
                             f"{[r['method'] for r in source['rows']]}")
        rows[ext["name"]] = {**row, "from": ext["from"]}
    return rows


def summarize(protocol: dict[str, Any], rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Orderings and the headline, decided by the protocol's rule on the finished rows (and
    the external rows it names)."""
    rows = {**external_rows(protocol), **rows}
    orderings = []
    for chain in protocol["orderings"]:
        if not all(n in rows for n in chain):
            orderings.append({"chain": chain, "holds": None, "missing": [n for n in chain if n not in rows]})
            continue
        steps = [compare(rows[x], rows[y]) for x, y in zip(chain, chain[1:])]
        decided = [s["holds"] for s in steps]
        holds = None if None in decided and False not in decided else all(d is True for d in decided)
        orderings.append({"chain": chain, "holds": holds, "steps": steps})
    h = protocol["headline"]
    headline: dict[str, Any] = {**h, "holds": None}
    if h["left"] in rows and h["right"] in rows:
        left, right = rows[h["left"]], rows[h["right"]]
        step = compare(left, right)
        headline.update(bits_left=left["bits_per_weight"], bits_right=right["bits_per_weight"],
                        mean_left=step["mean_a"], mean_right=step["mean_b"], p_left_lower=step["p"],
                        holds=bool(left["bits_per_weight"] <= h["max_bits"] and step["mean_a"] <= step["mean_b"]))
    return {"orderings": orderings, "headline": headline}


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The README's table of the summary rows."""
    def fmt(mean: float, std: float | None) -> str:
        return f"{mean:.3f}" + ("" if std is None else f" ± {std:.3f}")

    lines = ["| method | bits/weight | ppl (validation) | ppl (stdlib docs) | seeds | seconds | peak GB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = "—" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb'] / 1024:.2f}"
        lines.append(f"| {r['method']} | {r['bits_per_weight']:.3f} | {fmt(r['ppl'], r['ppl_std'])} | "
                     f"{fmt(r['ppl_second'], r['ppl_second_std'])} | {len(r['seeds'])} | {r['seconds']:.0f} | {peak} |")
    return "\n".join(lines)


def parse_protocol_args(argv: list[str] | None, description: str, default_protocol: str,
                        default_out: str) -> tuple[argparse.Namespace, dict[str, Any], list[str] | None, list[int]]:
    """The command line every protocol runner takes: ``(args, protocol, only, seeds)``.

    ``only`` is ``--only`` as a list (None: every configuration) and ``seeds`` the seeds to
    run; both are checked against the protocol.
    """
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--protocol", default=default_protocol)
    p.add_argument("--work", required=True, help="directory for the runs' models and results (resumable)")
    p.add_argument("--only", default=None, help="comma-separated configuration names to run")
    p.add_argument("--seeds", default=None, help="comma-separated seeds to run (default: the protocol's)")
    p.add_argument("--summary-only", action="store_true", help="summarize finished runs, run nothing")
    p.add_argument("--out", default=default_out)
    args = p.parse_args(argv)
    with open(args.protocol, encoding="utf-8") as f:
        protocol = json.load(f)
    names = {c["name"] for c in protocol["configs"]}
    only = None if args.only is None else args.only.split(",")
    if only is not None and not set(only) <= names:
        raise SystemExit(f"--only: unknown configurations {sorted(set(only) - names)}; known: {sorted(names)}")
    seeds = protocol["seeds"] if args.seeds is None else [int(s) for s in args.seeds.split(",")]
    if not set(seeds) <= set(protocol["seeds"]):
        raise SystemExit(f"--seeds {seeds}: the protocol's seeds are {protocol['seeds']}")
    return args, protocol, only, seeds


def main(argv: list[str] | None = None) -> int:
    args, protocol, only, seeds = parse_protocol_args(argv, __doc__.split("\n\n")[0], DEFAULT_PROTOCOL, DEFAULT_OUT)

    from jaxquant.quickstart import machine_record  # noqa: PLC0415

    configs = protocol["configs"]
    scorer = Scorer(protocol)
    if not args.summary_only:
        for seed in seeds:
            for cfg in configs:
                if (only is None or cfg["name"] in only) and seed in _seeds_of(cfg, seeds):
                    run_one(cfg, protocol, seed, args.work, scorer)

    rows = {}
    for cfg in configs:
        done = [s for s in _seeds_of(cfg, protocol["seeds"])
                if os.path.exists(os.path.join(args.work, cfg["name"], f"seed{s}", "result.json"))]
        if done:
            rows[cfg["name"]] = _row(cfg, [run_one(cfg, protocol, s, args.work, scorer) for s in done])
    summary = {"model": protocol["model"], "protocol": os.path.relpath(args.protocol, os.path.dirname(HERE)),
               "command": shlex.join([os.path.relpath(sys.argv[0], os.path.dirname(HERE)), *sys.argv[1:]]),
               "eval": scorer.eval_info(), "calibration": protocol["calibration"],
               "bits_rule": "bits/weight counts the quantized linear layers (codes, codebooks, scales); the "
                            "embedding (tied with the head) and norms stay float32 and are counted in params_mb, "
                            "the whole stored parameter checkpoint",
               "rows": list(rows.values()), **summarize(protocol, rows), "machine": machine_record()}
    _write_json(args.out, summary)
    print(markdown_table(summary["rows"]))
    for o in summary["orderings"]:
        print(f"{' < '.join(o['chain'])}: {o['holds']}")
    print(f"headline {summary['headline']['left']} <= {summary['headline']['right']}: {summary['headline']['holds']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
