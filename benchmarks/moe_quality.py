"""Mixed against uniform recipes at equal bits on a trained small mixture of experts (issue 29).

Follows ``benchmarks/protocols/moe_quality.json``: per seed, the byte-level Mixtral-family
model ``jaxquant.quickstart.MOE`` is trained (once; cached under ``--work``), calibration
windows are drawn, and every recipe of every pair quantizes it block by block from
per-expert statistics. Each finished (seed, recipe) run is kept in ``--work`` as JSON, so
an interrupted run resumes. The summary holds per run the perplexity, bits per weight,
seconds and the calibration tokens each expert saw; per pair the paired differences
(mixed - uniform), their mean and spread, the exact one-sided sign-flip p-values, the
paired t-test's p, and the protocol's decision.

    python benchmarks/moe_quality.py --work /root/jq-moeq          # -> results/moe/quality.json
    python benchmarks/moe_quality.py --work /tmp/q --seeds 1 --fast --out /tmp/q/quality.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from scipy import stats as scipy_stats

sys.path.insert(0, str(Path(__file__).parent))
from generate import RESULTS, machine_info  # noqa: E402  (sibling benchmark scripts)
from paired_seeds import sign_flip_p_value  # noqa: E402
from real_model import _write_json  # noqa: E402

from jaxquant import quickstart as qs  # noqa: E402
from jaxquant.data import ByteTokenizer, builtin_corpus, calibration_windows, split_text  # noqa: E402
from jaxquant.eval import perplexity  # noqa: E402
from jaxquant.models import functional  # noqa: E402
from jaxquant.pipeline import quantize_model  # noqa: E402
from jaxquant.qarray import tree_bits  # noqa: E402
from jaxquant.recipes_named import named_recipe  # noqa: E402

PROTOCOL = Path(__file__).parent / "protocols" / "moe_quality.json"


def recipe_map(spec: dict[str, str]) -> dict[str, Any]:
    """``{pattern: recipe name}`` -> ``{pattern: recipe}``."""
    return {pattern: named_recipe(name) for pattern, name in spec.items()}


def arm_name(spec: dict[str, str]) -> str:
    """A readable name of a recipe map, e.g. ``attn gptq-4-g64 + experts gptq-2-g64``."""
    return " + ".join(f"{pattern.strip('/').replace('/|/', '+')} {name}" for pattern, name in spec.items())


def run_one(model: Any, config: qs.QuickstartConfig, spec: dict[str, str], seed: int, protocol: dict[str, Any],
            train_tokens: np.ndarray, val_tokens: np.ndarray) -> dict[str, Any]:
    """Quantize ``model`` with the recipe map ``spec`` and evaluate it."""
    calib = protocol["calibration"]
    windows = calibration_windows(train_tokens, calib["windows"], calib["seqlen"], seed=seed)
    start = time.perf_counter()
    result = quantize_model(model, windows, recipe_map(spec), key=jax.random.key(seed), progress=False,
                            batch_size=calib["batch"])
    seconds = time.perf_counter() - start
    apply_fn, _ = functional(model)
    expert_tokens = {r["name"]: int(r["calibration_tokens"]) for r in result.layers
                     if "/experts/" in r["name"] and r["name"].endswith("gate_proj/kernel")}
    return {"seed": seed, "recipe": spec, "arm": arm_name(spec),
            "bits_per_weight": tree_bits(result.params)["bits_per_weight"],
            "perplexity": perplexity(apply_fn, result.params, val_tokens, protocol["eval_seqlen"]),
            "seconds": seconds, "expert_calibration_tokens": expert_tokens,
            "model": dataclasses.asdict(config.model)}


def decide(mixed: dict[int, float], uniform: dict[int, float], alpha: float) -> dict[str, Any]:
    """The protocol's decision on the paired differences ``mixed - uniform``."""
    seeds = sorted(set(mixed) & set(uniform))
    diffs = [mixed[s] - uniform[s] for s in seeds]
    out: dict[str, Any] = {"seeds": seeds, "diffs": diffs, "decision": "undecided"}
    if len(diffs) < 2:
        out["why"] = "fewer than two paired seeds"
        return out
    out.update(mean_diff=statistics.fmean(diffs), sd_diff=statistics.stdev(diffs),
               mixed_lower_on=sum(d < 0 for d in diffs),
               p_mixed_better=sign_flip_p_value([-d for d in diffs]), p_uniform_better=sign_flip_p_value(diffs))
    t_test = scipy_stats.ttest_rel(list(mixed[s] for s in seeds), list(uniform[s] for s in seeds))
    out["paired_t_p_two_sided"] = float(t_test.pvalue) if np.isfinite(t_test.pvalue) else None
    if out["mean_diff"] < 0 and out["p_mixed_better"] < alpha:
        out["decision"] = "mixed better"
    elif out["mean_diff"] > 0 and out["p_uniform_better"] < alpha:
        out["decision"] = "uniform better"
    return out


def summarize(protocol: dict[str, Any], runs: list[dict[str, Any]], floats: dict[int, float]) -> dict[str, Any]:
    """Per arm the perplexities by seed with mean and spread; per pair the decision."""
    def by_seed(spec: dict[str, str]) -> dict[int, float]:
        return {r["seed"]: r["perplexity"] for r in runs if r["recipe"] == spec}

    def arm(spec: dict[str, str]) -> dict[str, Any]:
        values = by_seed(spec)
        bits = sorted({round(r["bits_per_weight"], 6) for r in runs if r["recipe"] == spec})
        return {"name": arm_name(spec), "recipe": spec, "bits_per_weight": bits, "perplexity_by_seed": values,
                "mean": statistics.fmean(values.values()) if values else None,
                "sd": statistics.stdev(values.values()) if len(values) > 1 else None}

    pairs = [{"bits": pair["bits"], "mixed": arm(pair["mixed"]), "uniform": arm(pair["uniform"]),
              **decide(by_seed(pair["mixed"]), by_seed(pair["uniform"]), protocol["alpha"])}
             for pair in protocol["pairs"]]
    return {"float_perplexity_by_seed": floats,
            "float_mean": statistics.fmean(floats.values()) if floats else None, "pairs": pairs}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, type=Path, help="trained models and finished runs (resumed)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the protocol's)")
    parser.add_argument("--fast", action="store_true", help="the tiny MOE_FAST model (a check, not the protocol)")
    parser.add_argument("--out", type=Path, default=RESULTS / "moe" / "quality.json")
    args = parser.parse_args(argv)
    protocol = json.loads(PROTOCOL.read_text(encoding="utf-8"))
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else protocol["seeds"]
    base = qs.MOE_FAST if args.fast else qs.MOE
    if args.fast:  # the tiny model's layers are too narrow for the protocol's windows
        protocol = {**protocol, "calibration": {"windows": 16, "seqlen": 128, "batch": 8}, "eval_seqlen": 128}
    tok = ByteTokenizer()
    parts = split_text(builtin_corpus())
    train_tokens = np.asarray(tok.encode(parts["train"]), np.int32)
    val_tokens = np.asarray(tok.encode(parts["validation"]), np.int32)
    runs_dir = args.work / ("runs-fast" if args.fast else "runs")
    runs: list[dict[str, Any]] = []
    floats: dict[int, float] = {}
    for seed in seeds:
        config = dataclasses.replace(base, train=dataclasses.replace(base.train, seed=seed))
        model, model_dir, record = qs.train_or_load(config, cache_dir=str(args.work / "models"), progress=False)
        apply_fn, params = functional(model)
        floats[seed] = perplexity(apply_fn, params, val_tokens, protocol["eval_seqlen"])
        print(f"seed {seed}: model {model_dir} (trained in {record['seconds']:.0f} s), float perplexity "
              f"{floats[seed]:.4f}", flush=True)
        for pair in protocol["pairs"]:
            for side in ("mixed", "uniform"):
                spec = pair[side]
                path = runs_dir / f"seed{seed}-{arm_name(spec).replace(' ', '_').replace('+', 'p')}.json"
                if path.exists():
                    run = json.loads(path.read_text(encoding="utf-8"))
                else:
                    run = {**run_one(model, config, spec, seed, protocol, train_tokens, val_tokens),
                           "training_seconds": record["seconds"]}
                    _write_json(str(path), run)
                runs.append(run)
                print(f"  {pair['bits']} bits, {side}: {run['arm']}: perplexity {run['perplexity']:.4f} at "
                      f"{run['bits_per_weight']:.4f} bits ({run['seconds']:.0f} s)", flush=True)
    out = {"protocol": str(PROTOCOL.relative_to(Path(__file__).parent.parent)), "fast": args.fast,
           "command": "python benchmarks/moe_quality.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
           "machine": machine_info(), **summarize(protocol, runs, floats), "runs": runs}
    for pair in out["pairs"]:
        print(f"{pair['bits']} bits: mixed {pair['mixed']['mean']} vs uniform {pair['uniform']['mean']}: "
              f"{pair['decision']} (p mixed better {pair.get('p_mixed_better')}, p uniform better "
              f"{pair.get('p_uniform_better')})")
    _write_json(str(args.out), out)
    return out


if __name__ == "__main__":
    main()
