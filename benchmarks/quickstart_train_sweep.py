"""Short training experiments for the quickstart model: validation perplexity per setting.

Usage: python benchmarks/quickstart_train_sweep.py --steps 150 --set peak_lr=3e-3 --set peak_lr=1e-2
Each ``--set k=v[,k=v]`` is one run of ``jaxquant.train.train`` with the DEFAULT model and
``TrainConfig`` fields overridden (e.g. ``peak_lr``, ``init_std``, ``final_lr_ratio``); writes benchmarks/results/quickstart_train_sweep.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time

import jax
import numpy as np

from jaxquant.atomic_files import atomic_write_bytes
from jaxquant.data import ByteTokenizer, builtin_corpus, split_text
from jaxquant.eval import perplexity
from jaxquant.models.llama import functional
from jaxquant.quickstart import DEFAULT
from jaxquant.train import train


def _parse(s: str) -> dict:
    out = {}
    for kv in filter(None, s.split(",")):
        k, v = kv.split("=")
        out[k] = type(getattr(DEFAULT.train, k))(float(v)) if k != "init_std" else float(v)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--set", action="append", default=None)
    p.add_argument("--out", default="benchmarks/results/quickstart_train_sweep.json")
    args = p.parse_args()
    tok = ByteTokenizer()
    parts = split_text(builtin_corpus())
    train_ids = np.asarray(tok.encode(parts["train"]), np.int32)
    val_ids = np.asarray(tok.encode(parts["validation"]), np.int32)
    runs = []
    for s in args.set or [""]:
        over = _parse(s)
        cfg = dataclasses.replace(DEFAULT.train, steps=args.steps, **over)
        t0 = time.perf_counter()
        model, losses = train(DEFAULT.model, train_ids, cfg, progress=False)
        secs = time.perf_counter() - t0
        apply_fn, params = functional(model)
        ppl = perplexity(apply_fn, params, val_ids, DEFAULT.eval_seqlen)
        run = {"set": s, "train": dataclasses.asdict(cfg), "seconds": round(secs, 1), "val_ppl": round(ppl, 4),
               "final_loss": round(float(np.mean(losses[-10:])), 4), "loss_every_50": [round(x, 3) for x in losses[::50]]}
        print(json.dumps(run), flush=True)
        runs.append(run)
    res = {"steps": args.steps, "model": dataclasses.asdict(DEFAULT.model), "runs": runs,
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__}}
    atomic_write_bytes(args.out, json.dumps(res, indent=2).encode("utf-8"))


if __name__ == "__main__":
    main()
