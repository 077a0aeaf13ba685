"""An experiment on the V step: keep a step's code changes only if they lower the step's loss.

Usage:
    python benchmarks/pv_descent_check.py SWEEP_ARGS...

Runs ``quickstart_tuning_sweep.py`` with SWEEP_ARGS, its tuning step replaced by one that
evaluates the distillation loss on the step's own batch twice after ``tuner.update``: with
the new codes, and with the step's P update but the old codes. When the new codes raise
that loss, the whole step's code changes (every layer) are dropped; the P update
and the tuner state are kept either way. The check costs two forward passes per step.

This is a measurement of how the V step acts, not a library feature: on the quickstart
model (AQLM 1x4 g2) it rejected almost every V step and ended at the P-only perplexity
(``benchmarks/results/pv_vs_straight_through.md``), so a single step's code changes
almost always raise the loss they were derived from.
"""

from __future__ import annotations

import runpy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxquant import quickstart as qs
from jaxquant.qarray import dequantize, merge, split


def make_checked_tune_step(apply_fn: Callable[[Any, jax.Array], jax.Array], tuner: Any) -> Callable:
    """``quickstart.make_tune_step`` with the descent check on the codes (module docstring)."""
    from jaxquant.finetune import losses, pv  # noqa: PLC0415

    def step(qparams: Any, state: Any, teacher_params: Any, tokens: jax.Array) -> tuple[Any, Any, jax.Array]:
        loss_fn = losses.distillation_loss(apply_fn, apply_fn, teacher_params)
        loss, grads = pv.decoded_value_and_grad(loss_fn)(qparams, tokens)
        new_q, new_state = tuner.update(grads, state, qparams)
        continuous, _ = split(new_q)
        _, old_codes = split(qparams)
        p_only = merge(continuous, old_codes)
        accept = loss_fn(dequantize(new_q), tokens) <= loss_fn(dequantize(p_only), tokens)
        out = jax.tree.map(lambda new, old: jnp.where(accept, new, old), new_q, p_only)
        return out, new_state, loss

    return jax.jit(step)


if __name__ == "__main__":
    qs.make_tune_step = make_checked_tune_step  # global_finetune looks it up at call time
    sweep = Path(__file__).with_name("quickstart_tuning_sweep.py")
    sys.argv = [str(sweep), *sys.argv[1:]]
    runpy.run_path(str(sweep), run_name="__main__")
