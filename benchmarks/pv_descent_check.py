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

from jaxquant.finetune import distillation as distill_module
from jaxquant.qarray import dequantize, merge, split


def make_checked_step(tuner: Any, loss_fn: Callable[[Any, Any, jax.Array], jax.Array], layout: Any,
                      micro_batches: int) -> Callable:
    """``jaxquant.finetune.distillation``'s step with the descent check on the codes (module docstring)."""
    from jaxquant.finetune import pv  # noqa: PLC0415

    if layout is not None or micro_batches != 1:
        raise ValueError("the descent check runs the plain distillation step only")

    def step(qparams: Any, state: Any, teacher_params: Any, tokens: jax.Array) -> tuple[Any, Any, jax.Array]:
        def loss(p: Any, t: jax.Array) -> jax.Array:
            return loss_fn(p, teacher_params, t)

        value, grads = pv.decoded_value_and_grad(loss)(qparams, tokens)
        new_q, new_state = tuner.update(grads, state, qparams)
        continuous, _ = split(new_q)
        _, old_codes = split(qparams)
        p_only = merge(continuous, old_codes)
        accept = loss(dequantize(new_q), tokens) <= loss(dequantize(p_only), tokens)
        out = jax.tree.map(lambda new, old: jnp.where(accept, new, old), new_q, p_only)
        return out, new_state, value

    return jax.jit(step, donate_argnums=(0, 1))


if __name__ == "__main__":
    distill_module._step_fn = make_checked_step  # distill looks it up at call time
    sweep = Path(__file__).with_name("quickstart_tuning_sweep.py")
    sys.argv = [str(sweep), *sys.argv[1:]]
    runpy.run_path(str(sweep), run_name="__main__")
