"""PV-Tuning against straight-through on the quickstart model, over V-step learning rates.

Usage:
    python benchmarks/quickstart_tuning_sweep.py --v-lr 1e-3 --v-lr 3e-3 [--tolerance 0.03] [--seed 0 --seed 1]

Trains or loads the DEFAULT quickstart model (``--hidden-size``/``--num-layers``: the same
recipe at another size), quantizes it once with AQLM 1x8 g4 plus
block fine-tuning (the start both modes share), then runs ``global_finetune`` in "pv" and
"ste" mode for every ``--v-lr`` and data-order ``--seed`` (both modes see the same steps
and batches for a seed), and reports validation
perplexity (also after each ``--eval-at`` step of the run) and the fraction of codes each
run changed. Writes
benchmarks/results/quickstart_tuning_sweep.json (``--out`` to change).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.atomic_files import atomic_write, atomic_write_bytes
from jaxquant import quickstart as qs
from jaxquant import recipes, recipes_named
from jaxquant.data import ByteTokenizer, builtin_corpus, split_text
from jaxquant.eval import perplexity
from jaxquant.models import functional
from jaxquant.pipeline import quantize_model
from jaxquant.qarray import is_quantized, tree_bits


def _codes(tree: object) -> np.ndarray:
    leaves = jax.tree.leaves(tree, is_leaf=is_quantized)
    return np.concatenate([np.asarray(x.codes).ravel() for x in leaves if is_quantized(x)])


def _model_config(hidden_size: int, num_layers: int) -> qs.QuickstartConfig:
    """The DEFAULT quickstart setup, or the same recipe at another width or depth."""
    base = qs.DEFAULT
    if (hidden_size, num_layers) == (base.model.hidden_size, base.model.num_layers):
        return base
    if hidden_size % 64:
        raise ValueError(f"--hidden-size {hidden_size} must be a multiple of 64 (heads of 64)")
    heads = hidden_size // 64
    model = dataclasses.replace(base.model, hidden_size=hidden_size, intermediate_size=3 * hidden_size,
                                num_layers=num_layers, num_heads=heads, num_kv_heads=heads)
    # The DEFAULT's init std is 1/sqrt(256); keep it 1/sqrt(d).
    train = dataclasses.replace(base.train, init_std=hidden_size**-0.5)
    return dataclasses.replace(base, model=model, train=train)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--v-lr", type=float, action="append", required=True)
    p.add_argument("--p-lr", type=float, default=qs.TuneConfig.p_lr)
    p.add_argument("--steps", type=int, default=qs.TuneConfig.steps)
    p.add_argument("--update-fraction", type=float, default=qs.TuneConfig.update_fraction)
    p.add_argument("--v-b1", type=float, default=qs.TuneConfig.v_b1, help="Adam b1 of the buffers")
    p.add_argument("--v-b2", type=float, default=qs.TuneConfig.v_b2, help="Adam b2 of the buffers")
    p.add_argument("--trust-ratio", type=float, default=None)
    p.add_argument("--every", type=int, default=qs.TuneConfig.every, help="V step every this many steps")
    p.add_argument("--buffer-decay", type=float, default=0.0)
    p.add_argument("--force-update", action="store_true",
                   help="PV: move every selected group along its buffer (VStep's force_update)")
    p.add_argument("--modes", default="pv,ste", help="comma-separated: pv, ste")
    p.add_argument("--seed", type=int, action="append", default=None,
                   help="data-order seed of the tuning batches (repeat for several; default 0)")
    p.add_argument("--tolerance", type=float, default=recipes.AQLM.tolerance, help="AQLM round stopping rule")
    p.add_argument("--num-codebooks", type=int, default=1)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--codebook-bits", type=int, default=8, help="bits per code (codewords = 2**bits)")
    p.add_argument("--hidden-size", type=int, default=qs.DEFAULT.model.hidden_size,
                   help="width of the quickstart-style model (heads of 64, MLP 3x wider)")
    p.add_argument("--num-layers", type=int, default=qs.DEFAULT.model.num_layers,
                   help="depth of the quickstart-style model")
    p.add_argument("--start-cache", default=None,
                   help="pickle file for the AQLM+FT start: loaded if present, else written (saves its time)")
    p.add_argument("--eval-at", type=int, action="append", default=None,
                   help="also record validation perplexity after this many steps (repeatable)")
    p.add_argument("--out", default="benchmarks/results/quickstart_tuning_sweep.json")
    args = p.parse_args()

    cfg = _model_config(args.hidden_size, args.num_layers)
    model, model_dir, _ = qs.train_or_load(cfg, progress=False)
    tok = ByteTokenizer()
    parts = split_text(builtin_corpus())
    train_ids = np.asarray(tok.encode(parts["train"]), np.int32)
    val_ids = np.asarray(tok.encode(parts["validation"]), np.int32)
    apply_fn, params = functional(model)
    windows = qs.calibration_windows(train_ids, cfg.calib_windows, cfg.calib_seqlen, seed=0)
    recipe = recipes.AQLM(num_codebooks=args.num_codebooks, codebook_bits=args.codebook_bits,
                          group_size=args.group_size, tolerance=args.tolerance)

    def ppl(q: object) -> float:
        return perplexity(apply_fn, q, val_ids, cfg.eval_seqlen, batch_size=8)

    t0 = time.perf_counter()
    if args.start_cache and os.path.exists(args.start_cache):
        with open(args.start_cache, "rb") as f:
            start = pickle.load(f)
    else:
        start = quantize_model(model, windows, recipe, key=jax.random.key(0), finetune=cfg.block_finetune,
                               batch_size=cfg.calib_batch).params
        jax.block_until_ready(start)
        if args.start_cache:
            atomic_write(args.start_cache, lambda f: pickle.dump(start, f))
    start_seconds = time.perf_counter() - t0
    start_codes = _codes(start)
    runs = [{"mode": "teacher (fp32)", "perplexity": ppl(params)},
            {"mode": "start (AQLM+FT)", "perplexity": ppl(start), "seconds": round(start_seconds, 1)}]
    print(json.dumps(runs[0]), flush=True)
    print(json.dumps(runs[-1]), flush=True)
    seeds = args.seed or [0]
    eval_at = sorted(set(args.eval_at or []))
    if args.force_update and "ste" in args.modes.split(","):
        p.error("--force-update is a PV V step: run it with --modes pv")
    if any(not 0 < k < args.steps for k in eval_at):
        p.error(f"--eval-at must lie strictly between 0 and --steps {args.steps}, got {eval_at}")
    default_moments = (qs.TuneConfig.v_b1, qs.TuneConfig.v_b2)
    # Recorded (in runs and the command) only when changed, so older result files stay comparable.
    adam_moments = {} if (args.v_b1, args.v_b2) == default_moments else {"v_b1": args.v_b1, "v_b2": args.v_b2}
    forced = {"force_update": True} if args.force_update else {}
    every = {} if args.every == qs.TuneConfig.every else {"every": args.every}
    for seed, v_lr in ((seed, v_lr) for seed in seeds for v_lr in args.v_lr):
        tune = dataclasses.replace(cfg.tune, v_lr=v_lr, p_lr=args.p_lr, steps=args.steps,
                                   update_fraction=args.update_fraction, trust_ratio=args.trust_ratio,
                                   buffer_decay=args.buffer_decay, seed=seed,
                                   v_b1=args.v_b1, v_b2=args.v_b2, force_update=args.force_update,
                                   every=args.every)
        for mode in args.modes.split(","):
            t0 = time.perf_counter()
            at: dict[str, float] = {}

            def record(k: int, q: object) -> None:
                if k in eval_at:
                    at[str(k)] = ppl(q)

            tuned, kls = qs.global_finetune(apply_fn, params, start, train_ids, tune, mode=mode, on_step=record)
            jax.block_until_ready(tuned)
            runs.append({
                "mode": mode, "seed": seed, "v_lr": v_lr, "p_lr": args.p_lr, "steps": args.steps,
                "update_fraction": args.update_fraction, "trust_ratio": args.trust_ratio,
                # metric: the V step's distance, recorded so that earlier files (which also
                # tried "adam") stay comparable in benchmarks/paired_seeds.py.
                "buffer_decay": args.buffer_decay, "metric": "euclidean",
                **adam_moments, **forced, **every, "perplexity": ppl(tuned),
                **({"perplexity_at": at} if eval_at else {}),
                "codes_changed": float(np.mean(_codes(tuned) != start_codes)),
                "kl_first": kls[0], "kl_last10": float(np.mean(kls[-10:])),
                "seconds": round(time.perf_counter() - t0, 1),
            })
            print(json.dumps(runs[-1]), flush=True)
    res = {
        "command": "python benchmarks/quickstart_tuning_sweep.py " + " ".join(f"--v-lr {v:g}" for v in args.v_lr)
        + f" --p-lr {args.p_lr:g} --steps {args.steps} --update-fraction {args.update_fraction:g}"
        + (f" --trust-ratio {args.trust_ratio:g}" if args.trust_ratio is not None else "")
        + "".join(f" --{k.replace('_', '-')} {v:g}" for k, v in {**adam_moments, **every}.items())
        + f" --buffer-decay {args.buffer_decay:g}" + (" --force-update" if forced else "")
        + f" --modes {args.modes}"
        + f" --tolerance {args.tolerance:g} --num-codebooks {args.num_codebooks} --group-size {args.group_size}"
        + (f" --codebook-bits {args.codebook_bits}" if args.codebook_bits != 8 else "")
        + (f" --hidden-size {args.hidden_size} --num-layers {args.num_layers}"
           if cfg is not qs.DEFAULT else "")
        + "".join(f" --seed {s}" for s in seeds) + "".join(f" --eval-at {k}" for k in eval_at),
        "model_dir": model_dir, "model": dataclasses.asdict(cfg.model), "recipe": recipes_named.recipe_to_dict(recipe),
        "bits_per_weight": tree_bits(start)["bits_per_weight"], "tune": dataclasses.asdict(cfg.tune), "runs": runs,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__},
    }
    atomic_write_bytes(args.out, json.dumps(res, indent=2).encode("utf-8"))


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing anything
    main()
