"""Distillation losses for global fine-tuning: KL to a teacher, masked; gradient
accumulation over micro-batches; data-parallel batches over devices.

The student and teacher are ``apply_fn(params, tokens [B, T]) -> logits [B, T, V]``
functions (``jaxquant.models.functional``). Position ``t``'s logits are the model's
next-token distribution after ``tokens[:, :t+1]``; the loss compares the student's and
the teacher's distributions at the same positions, ``KL(teacher ‖ student)``, averaged
over the tokens whose mask is true. All arithmetic is float32 whatever the model dtype.

Data parallelism is GSPMD's: put the batch on a mesh with ``shard_batch`` (its leading
axis split over the ``"data"`` axis, parameters replicated) and call the jit-compiled
step; XLA inserts the all-reduce of the mean loss and of the gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

ApplyFn = Callable[[Any, jax.Array], jax.Array]


def kl_divergence(
    student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Mean over masked positions of ``KL(softmax(teacher) ‖ softmax(student))``.

    Args:
        student_logits: ``[..., V]``.
        teacher_logits: ``[..., V]`` (no gradient flows into it).
        mask: boolean/0-1 ``[...]`` (e.g. ``[B, T]``) selecting the positions that count;
            ``None`` counts every position.

    Returns:
        float32 scalar (0 when the mask selects nothing).

    Raises:
        ValueError: mismatched shapes.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits shape {student_logits.shape} != teacher_logits shape {teacher_logits.shape}"
        )
    if mask is not None and tuple(mask.shape) != tuple(student_logits.shape[:-1]):
        raise ValueError(f"mask shape {tuple(mask.shape)} must be the logits' leading shape {student_logits.shape[:-1]}")
    per_token = _per_token_kl(student_logits, teacher_logits)
    if mask is None:
        return jnp.mean(per_token)
    w = mask.astype(jnp.float32)
    return jnp.sum(per_token * w) / jnp.maximum(jnp.sum(w), jnp.float32(1.0))


def _per_token_kl(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    # KL(softmax(teacher) ‖ softmax(student)) over the last axis, in float32.
    t_logp = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32), axis=-1)
    s_logp = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)


def distillation_loss(
    student_apply: ApplyFn, teacher_apply: ApplyFn | None = None, teacher_params: Any = None
) -> Callable[..., jax.Array]:
    """The KL distillation loss as a function of the student's (dense) parameters.

    Args:
        student_apply: ``apply_fn(params, tokens) -> logits`` of the student.
        teacher_apply: the teacher's apply function; ``None`` if teacher logits are
            always passed in (cached).
        teacher_params: the teacher's parameters (closed over, never differentiated).

    Returns:
        ``loss(params, tokens, mask=None, teacher_logits=None) -> float32 scalar``:
        teacher logits are computed on the fly when ``teacher_logits`` is ``None``.
    """

    def loss(params: Any, tokens: jax.Array, mask: jax.Array | None = None,
             teacher_logits: jax.Array | None = None) -> jax.Array:
        if teacher_logits is None:
            if teacher_apply is None:
                raise ValueError("teacher_logits is None and no teacher_apply was given")
            teacher_logits = teacher_apply(teacher_params, tokens)
        return kl_divergence(student_apply(params, tokens), teacher_logits, mask)

    return loss


def chunked_distillation_loss(
    hidden_fn: Callable[[Any, jax.Array], jax.Array],
    head_fn: Callable[[Any, jax.Array], jax.Array],
    *,
    chunk_tokens: int = 256,
    teacher_hidden_fn: Callable[[Any, jax.Array], jax.Array] | None = None,
) -> Callable[..., jax.Array]:
    """``KL(teacher ‖ student)`` as ``distillation_loss`` computes it, with logits formed a slice at a time.

    A model with a large vocabulary spends most of a distillation step's memory on
    ``[B, T, V]`` logits and their softmaxes, gradients and copies (SmolLM2: 200 MB each
    at 4 x 256 tokens). Here student and teacher run up to their final hidden states;
    then ``chunk_tokens`` positions at a time go through the head and into the KL, under
    ``jax.checkpoint``, so the backward pass recomputes one slice's logits instead of
    keeping all of them. The value equals ``distillation_loss`` up to float summation order.

    Args:
        hidden_fn: ``hidden_fn(params, tokens [B, T]) -> [B, T, d]`` (student and teacher).
        head_fn: ``head_fn(params, x [n, d]) -> logits [n, V]``.
        chunk_tokens: positions per slice.
        teacher_hidden_fn: the teacher's ``hidden_fn``, if not ``hidden_fn``: the teacher
            needs no gradient, so a plain forward that keeps nothing suits it where the
            student's keeps what its backward pass needs (e.g. ``scan_layers``).

    Returns:
        ``loss(params, teacher_params, tokens, mask=None) -> float32 scalar``.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1")

    def loss(params: Any, teacher_params: Any, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        hs = hidden_fn(params, tokens)
        ht = jax.lax.stop_gradient((teacher_hidden_fn or hidden_fn)(teacher_params, tokens))
        n, d = hs.shape[0] * hs.shape[1], hs.shape[-1]
        w = jnp.ones((n,), jnp.float32) if mask is None else mask.reshape(n).astype(jnp.float32)
        pad = -n % chunk_tokens  # padded positions weigh nothing
        hs, ht = (jnp.pad(h.reshape(n, d), ((0, pad), (0, 0))).reshape(-1, chunk_tokens, d) for h in (hs, ht))
        w = jnp.pad(w, (0, pad)).reshape(-1, chunk_tokens)

        @jax.checkpoint
        def chunk_sum(params: Any, h_s: jax.Array, h_t: jax.Array, w_c: jax.Array) -> jax.Array:
            return jnp.sum(_per_token_kl(head_fn(params, h_s), head_fn(teacher_params, h_t)) * w_c)

        def body(total: jax.Array, xs: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, None]:
            return total + chunk_sum(params, *xs), None

        total, _ = jax.lax.scan(body, jnp.float32(0.0), (hs, ht, w))
        return total / jnp.maximum(jnp.sum(w), jnp.float32(1.0))

    return loss


def accumulate_gradients(
    value_and_grad_fn: Callable[..., tuple[jax.Array, Any]], params: Any, *batch: Any, num_micro: int
) -> tuple[jax.Array, Any]:
    """Mean loss and gradient over ``num_micro`` equal micro-batches, by ``lax.scan``.

    Memory is that of one micro-batch; the result equals the full-batch value when the
    loss is a mean over equally weighted examples (for a token-masked loss, micro-batches
    are weighted equally, not by their mask counts).

    Args:
        value_and_grad_fn: ``f(params, *micro_batch) -> (loss, grads)``.
        params: the parameters.
        *batch: arrays (or ``None``) whose leading axis is the batch, divisible by
            ``num_micro``.
        num_micro: number of micro-batches (static).

    Returns:
        ``(mean loss, mean grads)``.
    """
    if num_micro < 1:
        raise ValueError(f"num_micro={num_micro} must be >= 1")
    for i, x in enumerate(batch):
        if x is not None and x.shape[0] % num_micro:
            raise ValueError(f"batch argument {i} has leading size {x.shape[0]}, not divisible by num_micro={num_micro}")
    if num_micro == 1:
        return value_and_grad_fn(params, *batch)
    split = [None if x is None else x.reshape(num_micro, x.shape[0] // num_micro, *x.shape[1:]) for x in batch]
    # Shapes of the accumulators from an abstract evaluation: no extra compile-time pass.
    first = [None if x is None else x[0] for x in split]
    loss_shape, grad_shape = jax.eval_shape(value_and_grad_fn, params, *first)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss_shape, grad_shape))

    def body(acc: Any, micro: list[Any]) -> tuple[Any, None]:
        loss, grads = value_and_grad_fn(params, *micro)
        return jax.tree.map(jnp.add, acc, (loss, grads)), None

    xs = [x for x in split if x is not None]
    positions = [i for i, x in enumerate(split) if x is not None]

    def body_xs(acc: Any, xs_i: list[Any]) -> tuple[Any, None]:
        micro: list[Any] = [None] * len(split)
        for p, x in zip(positions, xs_i, strict=True):
            micro[p] = x
        return body(acc, micro)

    (loss, grads), _ = jax.lax.scan(body_xs, zeros, xs)
    inv = 1.0 / num_micro
    return loss * jnp.asarray(inv, loss.dtype), jax.tree.map(lambda g: g * jnp.asarray(inv, g.dtype), grads)


def data_mesh(devices: Any = None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: every device)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), ("data",))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Place every array of ``batch`` with its leading axis split over ``mesh``'s ``"data"`` axis.

    Raises:
        ValueError: a leading size not divisible by the number of devices on the axis.
    """
    n = mesh.shape["data"]

    def put(x: Any) -> Any:
        if x.shape[0] % n:
            raise ValueError(f"batch leading size {x.shape[0]} is not divisible by {n} data-parallel devices")
        spec = PartitionSpec("data", *([None] * (x.ndim - 1)))
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree.map(put, batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every array of ``tree`` on every device of ``mesh`` (replicated)."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


__all__ = ["accumulate_gradients", "chunked_distillation_loss", "data_mesh", "distillation_loss", "kl_divergence",
           "replicate", "shard_batch"]
