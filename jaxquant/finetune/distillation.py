"""One resumable distillation loop: PV-Tuning (or straight-through) of a quantized model toward
its full-precision teacher on random training windows.

``distill`` is what ``jaxquant finetune``, the quickstart and the notebooks run. Its settings
are one frozen ``DistillConfig``; the loss (the caller's, e.g. the chunked KL of
``jaxquant.models.distill.lean_distillation``) is differentiated with respect to the decoded
weights and applied by ``pv_tuning``. With ``out_dir`` the run can stop and resume: every
``save_every`` steps ``out_dir/resume/`` holds the parameters, the tuner state and the step
(written atomically by ``jaxquant.io.save``) and ``out_dir/history.json`` the evaluations; a
resumed run replays the data stream to the same position, so it ends where an uninterrupted
run would.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxquant import io
from jaxquant.atomic_files import atomic_write_json
from jaxquant.data import random_batches
from jaxquant.finetune import losses, pv
from jaxquant.host_memory import release_freed_memory
from jaxquant.validate import require_positive_ints

RESUME_DIR = "resume"
HISTORY_FILE = "history.json"


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Every setting of a distillation run, validated on construction.

    The defaults are ``jaxquant finetune``'s: the V step re-encodes 3% of each layer's groups
    per step within a trust ratio of 0.005 at a buffer rate of 1e-3 (PV's setting for runs
    of hundreds of steps on the quickstart model), and the optimizers keep no first moment
    for the buffers and bfloat16 first moments for the P step (the reference's lean V
    optimizer: 0.6 GB less on SmolLM2, ``benchmarks/protocols/lean_v_optimizer.md``).

    Attributes:
        steps: optimizer steps.
        batch_size: training windows per step.
        micro_batches: gradient accumulation steps per batch (divides ``batch_size``).
        seqlen: tokens per window.
        p_lr: Adam learning rate of the P step (continuous parameters).
        v_lr: Adam learning rate of the straight-through buffers.
        v_beta1, v_beta2: the buffers' Adam moment decays (``v_beta1 = 0`` keeps no first moment).
        mu_dtype: storage dtype of the Adam first moments, ``"float32"`` or ``"bfloat16"``.
        v_step: the V step's settings (mode, fraction, trust ratio, beam, ...).
        every: V step every this many steps.
        seed: data-order seed.
        eval_every: evaluate every this many steps (0: at the start and the end only).
        save_every: write the resume checkpoint every this many steps (with ``out_dir``).
    """

    steps: int = 200
    batch_size: int = 8
    micro_batches: int = 1
    seqlen: int = 256
    p_lr: float = 1e-4
    v_lr: float = 1e-3
    v_beta1: float = 0.0
    v_beta2: float = 0.999
    mu_dtype: str = "bfloat16"
    v_step: pv.VStep = pv.VStep(update_fraction=0.03, trust_ratio=0.005)
    every: int = 1
    seed: int = 0
    eval_every: int = 50
    save_every: int = 100

    def __post_init__(self) -> None:
        require_positive_ints(self, "steps", "batch_size", "micro_batches", "every", "save_every")
        if isinstance(self.seqlen, bool) or not isinstance(self.seqlen, int) or self.seqlen < 2:
            raise ValueError(f"seqlen={self.seqlen!r} must be an int >= 2")
        if isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise ValueError(f"eval_every={self.eval_every!r} must be an int >= 0")
        for name in ("p_lr", "v_lr"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0 (0 freezes that step)")
        for name in ("v_beta1", "v_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be in [0, 1)")
        if self.mu_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"mu_dtype={self.mu_dtype!r} must be 'float32' or 'bfloat16'")
        if not isinstance(self.v_step, pv.VStep):
            raise TypeError(f"v_step must be a jaxquant.finetune.pv.VStep, got {type(self.v_step).__name__}")
        if self.batch_size % self.micro_batches:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by micro_batches={self.micro_batches}")

    def tuner(self) -> pv.PVTuning:
        """The ``pv_tuning`` transform these settings describe."""
        mu_dtype = jnp.dtype(self.mu_dtype)
        return pv.pv_tuning(optax.adam(self.p_lr, mu_dtype=mu_dtype),
                            pv.adam(self.v_lr, b1=self.v_beta1, b2=self.v_beta2, mu_dtype=mu_dtype),
                            self.v_step, every=self.every)


@dataclasses.dataclass
class DistillResult:
    """What ``distill`` returns.

    Attributes:
        params: the tuned quantized parameters.
        losses: the loss of every step of this call (a resumed run: of the steps it ran).
        history: ``[{"step", "value", "loss"}]``, the evaluations (``eval_fn``'s values).
    """

    params: Any
    losses: list[float]
    history: list[dict[str, float]]


# (params or their packed form, teacher params, tokens [B, T]) -> scalar loss
LossFn = Callable[[Any, Any, jax.Array], jax.Array]


def _step_fn(tuner: pv.PVTuning, loss_fn: LossFn, layout: Any, micro_batches: int) -> Callable:
    def step(qparams: Any, state: Any, teacher_params: Any, tokens: jax.Array) -> tuple[Any, Any, jax.Array]:
        # The teacher is an argument, not a closure: closed-over arrays become HLO constants.
        vg = pv.decoded_value_and_grad(lambda p, t: loss_fn(p, teacher_params, t), layout=layout)
        loss, grads = losses.accumulate_gradients(vg, qparams, tokens, num_micro=micro_batches)
        qparams, state = tuner.update(grads, state, qparams)
        return qparams, state, loss

    # The step donates the parameters and the tuner state: their results take their place.
    return jax.jit(step, donate_argnums=(0, 1))


def distill(
    qparams: Any,
    teacher_params: Any,
    train_tokens: np.ndarray,
    config: DistillConfig,
    loss_fn: LossFn,
    *,
    layout: Any = None,
    eval_fn: Callable[[Any], float] | None = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    keep_resume: bool = False,
    donate: bool = False,
    on_step: Callable[[int, Any], None] | None = None,
    progress: bool = False,
    desc: str = "distill",
    log: Callable[[str], None] | None = None,
    names: tuple[str, str] = ("loss", "evaluation"),
) -> DistillResult:
    """Tune ``qparams`` toward the teacher for ``config.steps`` steps.

    Args:
        qparams: the quantized parameters to start from.
        teacher_params: the teacher's parameters, passed to ``loss_fn``.
        train_tokens: 1-D training token ids; random windows of ``config.seqlen`` tokens are
            drawn with ``config.seed``.
        config: the settings.
        loss_fn: ``loss_fn(params, teacher_params, tokens) -> scalar``; ``params`` is the
            decoded tree, or its packed form when ``layout`` is given.
        layout: the packed layout ``loss_fn`` takes (``decoded_value_and_grad``'s).
        eval_fn: ``eval_fn(qparams) -> float`` (e.g. a validation perplexity), run at the
            start, every ``config.eval_every`` steps and at the end; ``None``: no evaluation.
        out_dir: where the resume state goes; ``None`` runs without one.
        resume: continue the run in ``out_dir`` (it must hold one).
        keep_resume: keep ``out_dir/resume`` after the last step, to extend the run later;
            by default it is removed.
        donate: the caller gives ``qparams`` up (its buffers are reused); otherwise they
            are copied first.
        on_step: ``on_step(steps_done, qparams)`` after every step, with a copy of them.
        progress: a progress bar.
        desc: the bar's label.
        log: without a bar, receives a line about every tenth of the run (loss, the latest
            evaluation, seconds).
        names: what the loss and the evaluation are called in those lines and the bar.

    Returns:
        A ``DistillResult``.

    Raises:
        ValueError: a non-finite loss (learning rate too high), or a resume state that
            does not fit these settings.
        FileNotFoundError: ``resume`` without a resume state in ``out_dir``.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    tuner = config.tuner()
    mesh = losses.data_mesh()
    n_dev = mesh.shape["data"]
    shard = config.batch_size % n_dev == 0 and n_dev > 1
    step = _step_fn(tuner, loss_fn, layout, config.micro_batches)
    if not donate:  # the step donates its inputs; the caller keeps its arrays
        qparams = jax.tree.map(jnp.copy, qparams)
    if not shard:  # compiled before the tuner state exists, its freed heap given back
        example = jnp.zeros((config.batch_size, config.seqlen), jnp.int32)
        step = step.lower(qparams, jax.eval_shape(tuner.init, qparams), teacher_params, example).compile()
        release_freed_memory()

    state = jax.jit(tuner.init)(qparams)  # one program, not one per op and leaf shape
    start, history = 0, []
    resume_dir = None if out_dir is None else os.path.join(out_dir, RESUME_DIR)
    history_file = None if out_dir is None else os.path.join(out_dir, HISTORY_FILE)
    if resume:
        if resume_dir is None or not io.is_checkpoint(resume_dir):
            raise FileNotFoundError(f"resume: no checkpoint at {resume_dir}")
        qparams, state, start, history = _load_resume(resume_dir, history_file, state)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
    if shard:  # parameters and tuner state replicated, batches split: GSPMD data parallelism
        qparams, state, teacher_params = losses.replicate((qparams, state, teacher_params), mesh)

    def evaluate(done: int, loss: float | None) -> None:
        history.append({"step": done, "value": eval_fn(qparams), **({} if loss is None else {"loss": loss})})

    def save_resume(done: int) -> None:
        atomic_write_json(history_file, history)
        io.save(resume_dir, {"params": qparams, "tuner": list(jax.tree_util.tree_leaves(state)), "step": done},
                overwrite=True, checksum=False)

    if eval_fn is not None and not history:
        evaluate(0, None)
    batches = random_batches(train_tokens, config.batch_size, config.seqlen - 1, seed=config.seed)
    for _ in range(start):  # replay the stream so a resumed run sees the same batches
        next(batches)
    bar = tqdm(range(start, config.steps), desc=desc, disable=not progress, initial=start, total=config.steps,
               leave=False)
    step_losses: list[float] = []
    log_every, t_loop = max(1, (config.steps - start) // 10), time.perf_counter()
    for i in bar:
        tokens = jnp.asarray(next(batches))
        if shard:
            tokens = losses.shard_batch(tokens, mesh)
        qparams, state, loss_arr = step(qparams, state, teacher_params, tokens)
        loss = float(loss_arr)
        if not math.isfinite(loss):
            raise ValueError(f"the loss became {loss} at step {i + 1} (learning rate too high?)")
        step_losses.append(loss)
        done = i + 1
        if on_step is not None:  # a copy: the next step donates qparams' buffers
            on_step(done, jax.tree.map(jnp.copy, qparams))
        if eval_fn is not None and config.eval_every and done % config.eval_every == 0 and done != config.steps:
            evaluate(done, loss)
            bar.set_postfix({names[0]: f"{loss:.4f}", names[1]: f"{history[-1]['value']:.4f}"})
        if log is not None and not progress and (done % log_every == 0 or done == config.steps):
            said = f", {names[1]} {history[-1]['value']:.4f}" if history and history[-1]["step"] == done else ""
            log(f"step {done}/{config.steps}: {names[0]} {loss:.4f}{said}, {time.perf_counter() - t_loop:.0f} s")
        if out_dir is not None and done % config.save_every == 0 and done != config.steps:
            save_resume(done)
    if eval_fn is not None and history[-1]["step"] != config.steps:
        evaluate(config.steps, step_losses[-1] if step_losses else None)
    if out_dir is not None:
        if keep_resume:
            save_resume(config.steps)
        else:  # the optimizer state only serves a longer run
            shutil.rmtree(resume_dir, ignore_errors=True)
            if os.path.exists(history_file):
                os.remove(history_file)
    return DistillResult(params=qparams, losses=step_losses, history=history)


def _load_resume(resume_dir: str, history_file: str, state: Any) -> tuple[Any, Any, int, list[dict[str, float]]]:
    saved = io.load(resume_dir)
    template = jax.tree_util.tree_structure(state)
    leaves = list(saved["tuner"])
    if len(leaves) != template.num_leaves:
        raise ValueError(f"{resume_dir}: tuner state has {len(leaves)} arrays, expected {template.num_leaves} "
                         "(different settings?)")
    state = jax.tree_util.tree_unflatten(template, [jnp.asarray(x) for x in leaves])
    start = int(saved["step"])
    with open(history_file, encoding="utf-8") as f:  # written before the checkpoint: may run ahead of it
        history = [h for h in json.load(f) if h["step"] <= start]
    return saved["params"], state, start, history


__all__ = ["DistillConfig", "DistillResult", "distill"]
