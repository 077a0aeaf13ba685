"""``jaxquant search MODEL --budget BITS --levels NAME,... --out DIR [--resume]``: EvoPress.

1. The level database (``jaxquant.pipeline.levels``): the model quantized once per level
   in ``--database`` (default ``OUT/database``), reused by later searches.
2. The (1+λ) search (``jaxquant.search.evolve``) for the assignment of lowest KL
   divergence to the float model on calibration windows, at ``--budget`` average bits
   per weight; its state is saved every generation (``--resume`` continues it).
3. The outputs in ``--out``:

   - ``recipe.json``: one ``[pattern, recipe]`` pair per layer, for
     ``jaxquant quantize MODEL --recipe OUT/recipe.json``;
   - ``model/``: the assembled quantized model (the database's layers as chosen; loads
     like any ``jaxquant quantize`` output);
   - ``search.json``: the assignment, its bits, the fitness per generation, the
     database's size and build time, the search time, and held-out perplexities of the
     result and of the baselines at the same budget (uniform levels that fit it, or
     exceed it by at most ``--tolerance``; the error-sum heuristic).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from typing import Any

from jaxquant.cli.checks import require, require_positive, with_flags

SEARCH_FILE = "search.json"
STATE_FILE = "search_state.json"
RECIPE_FILE = "recipe.json"
MODEL_DIR = "model"


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``jaxquant search``."""
    p.add_argument("model_dir", help="Hugging Face model directory, .gguf file, or known model name (smollm2-135m)")
    p.add_argument("--budget", type=float, required=True, help="average bits per weight of the quantized layers")
    p.add_argument("--levels", required=True,
                   help="comma-separated recipe names or .json/.toml recipe files, e.g. gptq-2,gptq-3,gptq-4,aqlm-2x8")
    p.add_argument("--out", required=True, help="output directory (new, or this search's for --resume)")
    p.add_argument("--database", default=None, help="level database directory, shared between searches "
                                                    "(default: OUT/database)")
    p.add_argument("--resume", action="store_true", help="continue the search in --out")
    p.add_argument("--calib", default="builtin", help="calibration text file, or 'builtin' (train split)")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows of the database's runs")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration and evaluation window")
    p.add_argument("--seed", type=int, default=0, help="seed of the database's runs (calibration windows, keys)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration samples per forward pass")
    p.add_argument("--search-seed", type=int, default=0, help="seed of the search and of its fitness windows")
    p.add_argument("--fitness-windows", type=int, default=32, help="calibration windows the fitness draws from")
    p.add_argument("--fitness-seqlen", type=int, default=128, help="tokens per fitness window")
    p.add_argument("--generations", type=int, default=100)
    p.add_argument("--offspring", type=int, default=16, help="offspring per generation (lambda)")
    p.add_argument("--survivors", type=_ints, default=(4, 1), help="survivors after each selection stage, e.g. 4,1")
    p.add_argument("--stage-windows", type=_ints, default=(1, 4), help="fitness windows of each stage, e.g. 1,4")
    p.add_argument("--initial-candidates", type=int, default=8, help="random starting points")
    p.add_argument("--start", choices=("random", "heuristics"), default="random",
                   help="random: the first parent is the best random starting point (EvoPress); heuristics: the "
                        "best uniform level within the budget and the error-sum heuristic's assignment compete too")
    p.add_argument("--fixed-windows", action="store_true",
                   help="score every generation on the same windows (nested per stage) instead of fresh ones: "
                        "a hill climb on one sample, far less noisy when the stages see few tokens")
    p.add_argument("--holdout-windows", type=int, default=0,
                   help="fitness windows no selection stage scores; at the end the climb's checkpoints are scored "
                        "on them and the best there is the result (0: the last parent)")
    p.add_argument("--holdout-checkpoints", type=int, default=8,
                   help="the most checkpoints (evenly spaced parents of the climb) scored on the held-out windows")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="how far under --budget an assignment may fall (bits per weight)")
    p.add_argument("--eval", default="builtin",
                   help="text file or 'builtin' (validation split) for held-out perplexity; 'none' skips it")
    p.add_argument("--eval-windows", type=int, default=0, help="evaluation windows of --seqlen tokens (0: all)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _levels(spec: str, d_ins: tuple[int, ...]) -> dict[str, Any]:
    """``{level name: recipe}`` from ``--levels``; a file's level is named by its stem."""
    from jaxquant.recipes_named import resolve_recipe_arg  # noqa: PLC0415

    out: dict[str, Any] = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            raise ValueError(f"--levels {spec!r} has an empty entry")
        name = os.path.splitext(os.path.basename(item))[0] if os.path.isfile(item) else item.lower()
        if name in out:
            raise ValueError(f"--levels names {name!r} twice")
        out[name] = resolve_recipe_arg(item, d_ins=d_ins)
    if len(out) < 2:
        raise ValueError(f"--levels {spec!r} must name at least two levels to choose between")
    return out


def _recipe_pairs(database: Any, choice: Any, recipes: dict[str, Any]) -> list[list[Any]]:
    """One ``[pattern, recipe data]`` pair per layer (a list recipe contributes its own match)."""
    from jaxquant.recipes_named import recipe_to_dict  # noqa: PLC0415

    pairs = []
    for path, k in zip(database.layer_paths, choice):
        recipe = recipes[database.level_names[int(k)]]
        if isinstance(recipe, list):
            recipe = next(r for pattern, r in recipe if re.search(pattern, path))
        pairs.append([f"^{re.escape(path)}$", recipe_to_dict(recipe)])
    return pairs


def run(args: argparse.Namespace) -> int:
    """Run ``jaxquant search``; returns the exit status."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from jaxquant.atomic_files import atomic_write_json, commit_dir, staging_dir  # noqa: PLC0415
    from jaxquant.data import calibration_windows, eval_windows, load_tokenizer, read_text  # noqa: PLC0415
    from jaxquant.eval import perplexity  # noqa: PLC0415
    from jaxquant.io import save  # noqa: PLC0415
    from jaxquant.models import from_pretrained, functional  # noqa: PLC0415
    from jaxquant.models.files import write_model_files  # noqa: PLC0415
    from jaxquant.pipeline.levels import build_level_database  # noqa: PLC0415
    from jaxquant.search import (BitsBudget, DecodedOptions, EvolutionConfig, KLFitness,  # noqa: PLC0415
                                 error_sum_greedy, evolve, fit_to_budget, uniform_within)

    require_positive(args, "budget", "nsamples", "seqlen", "batch_size", "fitness_windows", "fitness_seqlen",
                     "generations", "offspring", "initial_candidates")
    require(args, "tolerance", args.tolerance >= 0, "must be >= 0")
    require(args, "eval_windows", args.eval_windows >= 0, "must be >= 0 (0: every window)")
    config = with_flags(args, lambda: EvolutionConfig(
        generations=args.generations, offspring=args.offspring, survivors=args.survivors,
        windows=args.stage_windows, initial_candidates=args.initial_candidates,
        initial_windows=max(args.stage_windows), fresh_windows=not args.fixed_windows,
        holdout_windows=args.holdout_windows, holdout_checkpoints=args.holdout_checkpoints, seed=args.search_seed))
    require(args, "holdout_windows", config.most_windows + args.holdout_windows <= args.fitness_windows,
            f"plus the {config.most_windows} windows a selection stage draws must not exceed --fitness-windows "
            f"{args.fitness_windows}")
    out = os.path.abspath(args.out)
    held = set(os.listdir(out)) if os.path.isdir(out) else set()
    if STATE_FILE in held and not args.resume:
        raise ValueError(f"--out {args.out} holds a search; pass --resume to continue or extend it, or choose "
                         "another --out")
    if held and STATE_FILE not in held and held != {"database"}:
        raise ValueError(f"--out {args.out} is not empty and holds no search; choose a new or empty directory")
    database_dir = args.database or os.path.join(out, "database")
    os.makedirs(out, exist_ok=True)

    model = from_pretrained(args.model_dir)
    cfg = model.config
    recipes = _levels(args.levels, (cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.intermediate_size))
    context = cfg.max_position_embeddings
    for name in ("seqlen", "fitness_seqlen"):
        require(args, name, getattr(args, name) <= context, f"exceeds the model's context of {context} tokens")
    tokenizer = load_tokenizer(args.model_dir)
    ids = tokenizer.encode(read_text(args.calib, split="train"))
    for n, length, what in ((args.nsamples, args.seqlen, "--nsamples x --seqlen"),
                            (args.fitness_windows, args.fitness_seqlen, "--fitness-windows x --fitness-seqlen")):
        if len(ids) < n * length:
            raise ValueError(f"calibration text {args.calib!r} has {len(ids)} tokens, fewer than {what} = {n * length}")
    progress = not args.no_progress

    database, levels_report = build_level_database(
        model, calibration_windows(ids, args.nsamples, args.seqlen, seed=args.seed), recipes, database_dir,
        key=jax.random.key(args.seed), batch_size=args.batch_size, progress=progress, log=True)
    budget = with_flags(args, lambda: BitsBudget(database.bits, database.sizes, args.budget, args.tolerance))
    database_record = {"dir": os.path.abspath(database_dir),
                       "megabytes": round(sum(r["megabytes"] for r in levels_report), 2),
                       "build_seconds": round(sum(r["quantize_seconds"] for r in levels_report), 1)}
    print(f"database: {database.num_layers} layers x {database.num_levels} levels in {database_dir} "
          f"({database_record['megabytes']:.1f} MB, built in {database_record['build_seconds']:.0f} s)")

    greedy = error_sum_greedy(database.errors, budget)
    uniform_levels = uniform_within(budget, slack=args.tolerance)
    starts = []
    if args.start == "heuristics":
        # A generator of its own, so that the random starts do not depend on --start.
        rng = np.random.default_rng([args.search_seed, 2])
        starts = [fit_to_budget(a, budget, rng) for a in (greedy, *map(database.uniform, uniform_levels[:1]))]

    apply_fn, float_params = functional(model)
    options = DecodedOptions(database)
    fitness = KLFitness(apply_fn, float_params,
                        calibration_windows(ids, args.fitness_windows, args.fitness_seqlen, seed=args.search_seed))
    result = evolve(budget, lambda choice, window_ids: fitness(options.tree(float_params, choice), window_ids),
                    fitness.num_windows, config, starts=starts, state_path=os.path.join(out, STATE_FILE),
                    progress=progress)
    choice = result.choice

    atomic_write_json(os.path.join(out, RECIPE_FILE), {"recipe": _recipe_pairs(database, choice, recipes)})
    model_dir = os.path.join(out, MODEL_DIR)
    staging = staging_dir(model_dir)
    save(os.path.join(staging, "params"), database.assemble(float_params, choice), overwrite=True)
    write_model_files(args.model_dir, staging)
    commit_dir(staging, model_dir, overwrite=True)  # a resumed search rewrites it

    summary: dict[str, Any] = {
        # JSON writes tuples as lists.
        "arguments": {k: v for k, v in vars(args).items() if not callable(v)},
        "budget": args.budget, "tolerance": args.tolerance,
        "levels": levels_report,
        "database": database_record,
        "search": {"seconds": round(result.seconds, 1), "generations": len(result.history),
                   "first_parent": result.first_parent,
                   "config": dataclasses.asdict(config),
                   "fitness_windows": args.fitness_windows, "fitness_seqlen": args.fitness_seqlen,
                   "history": result.history, "holdout": result.holdout},
        "assignment": {p: database.level_names[int(k)] for p, k in zip(database.layer_paths, choice)},
        "average_bits": database.average_bits(choice),
        "level_counts": database.level_counts(choice),
    }
    if args.eval != "none":
        windows = eval_windows(tokenizer.encode(read_text(args.eval, split="validation")), args.seqlen)
        if args.eval_windows:
            windows = windows[: args.eval_windows]
        tokens = windows.reshape(-1)

        def ppl(assignment: Any) -> float:
            return perplexity(apply_fn, options.tree(float_params, assignment), tokens, args.seqlen, batch_size=4)

        rows = [{"name": "evopress", "average_bits": database.average_bits(choice), "ppl": ppl(choice)}]
        for k in uniform_levels:
            rows.append({"name": f"uniform {database.level_names[k]}",
                         "average_bits": database.average_bits(database.uniform(k)), "ppl": ppl(database.uniform(k))})
        rows.append({"name": "error-sum greedy", "average_bits": database.average_bits(greedy), "ppl": ppl(greedy),
                     "assignment": {p: database.level_names[int(k)] for p, k in zip(database.layer_paths, greedy)}})
        summary["perplexity"] = {"text": args.eval, "windows": int(len(windows)), "seqlen": args.seqlen,
                                 "full_precision": perplexity(apply_fn, float_params, tokens, args.seqlen, batch_size=4),
                                 "rows": rows}
    atomic_write_json(os.path.join(out, SEARCH_FILE), summary)
    _print_summary(summary, out)
    return 0


def _print_summary(s: dict[str, Any], out: str) -> None:
    counts = ", ".join(f"{name} {n}" for name, n in s["level_counts"].items() if n)
    lines = [f"searched {s['search']['generations']} generations in {s['search']['seconds']:.0f} s: "
             f"{s['average_bits']:.3f} bits per weight ({counts})"]
    holdout = s["search"]["holdout"]
    if holdout:
        scores = ", ".join(f"{c['generation']}: {c['holdout_fitness']:.4g}" for c in holdout["checkpoints"])
        lines.append(f"checkpoints on {len(holdout['window_ids'])} held-out windows (generation: fitness): {scores}; "
                     f"chose generation {holdout['chosen_generation']}")
    ppl = s.get("perplexity")
    if ppl:
        lines.append(f"perplexity on {ppl['windows']} windows of {ppl['seqlen']} tokens of {ppl['text']}: "
                     f"{ppl['full_precision']:.3f} full precision")
        lines += [f"  {r['name']:<28} {r['average_bits']:.3f} bits  {r['ppl']:.3f}" for r in ppl["rows"]]
    lines.append(f"output: {out} ({RECIPE_FILE}, {MODEL_DIR}/, {SEARCH_FILE})")
    print("\n".join(lines))


__all__ = ["configure", "run"]
