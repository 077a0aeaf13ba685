"""A small next-token trainer for Llama-family models (used to build the quickstart model).

Pure and functional: the model is split into a graph and a parameter state, one jit'd
step maps ``(params, opt_state, batch) -> (params, opt_state, loss)``, and the optimizer
is an optax chain (global-norm clipping, AdamW with warm-up + cosine decay, weight decay
on matrices only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from jaxquant.data import random_batches
from jaxquant.models.config import ModelConfig
from jaxquant.models.llama import LlamaForCausalLM
from jaxquant.models.routing import load_balancing_loss, record_router_logits
from jaxquant.validate import require_positive_ints


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. A fixed step count (not a time budget) fixes the model.

    Attributes:
        steps: optimizer steps.
        batch_size: sequences per step.
        seqlen: tokens per sequence (inputs; targets are shifted by one).
        peak_lr: learning rate after warm-up.
        warmup_steps: linear warm-up steps, then cosine decay to ``final_lr_ratio * peak_lr``.
        final_lr_ratio: end of the cosine schedule relative to the peak.
        b1: Adam first-moment decay.
        b2: Adam second-moment decay.
        weight_decay: decoupled weight decay on 2-D parameters.
        clip_norm: global gradient-norm clip.
        seed: initialisation and data-order seed.
        init_std: standard deviation of the initial weight matrices (embedding, linear
            kernels, head), redrawn from ``seed``; ``None`` keeps the model's own
            initialisation (0.02, as in Hugging Face Llama).
        router_aux_loss_coef: weight of the router load-balancing loss, averaged over the
            mixture-of-experts layers (``jaxquant.models.routing.load_balancing_loss``;
            Mixtral-8x7B was trained at 0.02); no effect on a dense model.
    """

    steps: int = 400
    batch_size: int = 16
    seqlen: int = 256
    peak_lr: float = 3e-3
    warmup_steps: int = 25
    final_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    seed: int = 0
    init_std: float | None = None
    router_aux_loss_coef: float = 0.02

    def __post_init__(self) -> None:
        require_positive_ints(self, "steps", "batch_size", "seqlen")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be in [0, steps={self.steps})")
        if self.init_std is not None and not self.init_std > 0:
            raise ValueError(f"init_std={self.init_std!r} must be positive or None")
        if not self.router_aux_loss_coef >= 0:
            raise ValueError(f"router_aux_loss_coef={self.router_aux_loss_coef!r} must be >= 0")


def reinit_matrices(params: Any, std: float, seed: int) -> Any:
    """``params`` with every 2-D leaf redrawn from ``N(0, std²)`` (its dtype kept), others unchanged.

    Each matrix gets its own key (the seed folded with its position in the tree), so the
    result depends only on ``seed`` and the tree's structure.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    key = jax.random.key(seed)
    out = [
        (jnp.float32(std) * jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)).astype(x.dtype)
        if x.ndim == 2 else x
        for i, x in enumerate(leaves)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Clip, then AdamW on a warm-up + cosine schedule; decay only matrices (not norms/biases)."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.peak_lr,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.steps,
        end_value=cfg.peak_lr * cfg.final_lr_ratio,
    )
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                    mask=lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)),
    )


def next_token_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean cross-entropy (nats) of ``logits [B, T, V]`` against ``targets [B, T]``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()


def make_train_step(graphdef: Any, optimizer: optax.GradientTransformation, router_aux_loss_coef: float = 0.0) -> Callable:
    """The jit'd step ``(params, opt_state, batch [B, T+1]) -> (params, opt_state, loss)``.

    ``loss`` is the next-token loss; the gradient is that of the next-token loss plus
    ``router_aux_loss_coef`` times the mean load-balancing loss of the model's routings.
    """

    def loss_fn(params: Any, batch: jax.Array) -> tuple[jax.Array, jax.Array]:
        with record_router_logits() as routings:
            logits = nnx.merge(graphdef, params)(batch[:, :-1])
        loss = next_token_loss(logits, batch[:, 1:])
        if not routings or router_aux_loss_coef == 0:
            return loss, loss
        balance = sum(load_balancing_loss(r, k) for r, k in routings) / len(routings)
        return loss + router_aux_loss_coef * balance, loss

    def step(params: Any, opt_state: Any, batch: jax.Array) -> tuple[Any, Any, jax.Array]:
        (_, loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        # optax's Adam bias correction raises a Python float to an int32 step count, which
        # strict dtype promotion (used in our tests) rejects; allow it for the update only.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def train(
    model_config: ModelConfig,
    tokens: Any,
    cfg: TrainConfig,
    *,
    dtype: Any = jnp.float32,
    progress: bool = True,
) -> tuple[LlamaForCausalLM, list[float]]:
    """Train a fresh model from scratch on ``tokens``.

    Args:
        model_config: architecture of the model to train.
        tokens: 1-D training token ids.
        cfg: optimisation settings.
        dtype: parameter dtype.
        progress: show a tqdm progress bar with the running loss.

    Returns:
        ``(trained model, per-step losses)``.

    Raises:
        ValueError: the tokens exceed the vocabulary or the loss becomes non-finite.
    """
    arr = np.asarray(tokens)
    if arr.size and int(arr.max()) >= model_config.vocab_size:
        raise ValueError(f"token id {int(arr.max())} >= vocab_size={model_config.vocab_size}")
    model = LlamaForCausalLM(model_config, dtype=dtype, rngs=nnx.Rngs(cfg.seed))
    graphdef, params = nnx.split(model)
    if cfg.init_std is not None:
        params = reinit_matrices(params, cfg.init_std, cfg.seed)
    optimizer = make_optimizer(cfg)
    opt_state = optimizer.init(params)
    step = make_train_step(graphdef, optimizer, cfg.router_aux_loss_coef)
    batches = random_batches(arr, cfg.batch_size, cfg.seqlen, seed=cfg.seed)
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="training", disable=not progress, unit="step")
    for i in bar:
        params, opt_state, loss = step(params, opt_state, jnp.asarray(next(batches)))
        if i % 10 == 0 or i == cfg.steps - 1:
            # Reading the loss synchronises; doing it every 10 steps keeps dispatch ahead.
            value = float(loss)
            if not np.isfinite(value):
                raise ValueError(f"training diverged: loss {value} at step {i}")
            bar.set_postfix(loss=f"{value:.3f}")
        losses.append(loss)
    losses = [float(x) for x in losses]
    nnx.update(model, params)
    return model, losses
