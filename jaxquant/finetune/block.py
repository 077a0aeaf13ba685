"""Block fine-tuning: optax on a quantized block's continuous parameters (codes frozen).

After the linear layers of a transformer block are quantized one by one, their errors
interact; AQLM's recipe then tunes every continuous parameter of the block — codebooks,
scales, norms, biases, any layer left dense — so that the quantized block reproduces the
full-precision block's outputs on the same inputs (mean squared error). Codes are
integers and never reach optax: ``jaxquant.split`` separates them and ``merge`` puts
them back.

Stored dtypes are kept: parameters stored in float16/bfloat16 are optimised as float32
master copies, and the forward pass sees them rounded to the stored dtype (the rounding
passes gradients straight through), so the loss measured during training — and the
held-out loss used for early stopping — is the loss of the values actually written back.

One jit-compiled training step serves every batch, epoch and block whose structure is
the same (the block's apply function is a static, hashable argument); batches are
sharded over the given devices on their leading axis, parameters replicated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxquant.qarray import merge, split
from jaxquant.validate import require_positive_ints

ApplyFn = Callable[[Any, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class BlockFinetuneConfig:
    """Settings of block fine-tuning.

    Attributes:
        lr: Adam learning rate.
        b1, b2: Adam moment decay rates.
        batch_size: calibration samples per step.
        max_epochs: upper bound on passes over the training samples.
        holdout: fraction of the samples held out for early stopping (at least one).
        patience: stop after this many epochs without a held-out improvement of at
            least ``tolerance`` (relative).
        tolerance: relative held-out improvement that counts as progress.
    """

    lr: float = 1e-4
    b1: float = 0.9
    b2: float = 0.95
    batch_size: int = 4
    max_epochs: int = 10
    holdout: float = 0.125
    patience: int = 2
    tolerance: float = 1e-3

    def __post_init__(self) -> None:
        require_positive_ints(self, "batch_size", "max_epochs", "patience")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout={self.holdout} must be in (0, 1)")
        if self.tolerance < 0:
            raise ValueError(f"tolerance={self.tolerance} must be >= 0")


@dataclasses.dataclass(frozen=True)
class FinetuneReport:
    """What fine-tuning did.

    Attributes:
        epochs: epochs run.
        steps: optimizer steps taken.
        holdout_before: held-out relative error ``‖Ŷ − Y‖² / ‖Y‖²`` before tuning.
        holdout_after: the same for the parameters returned (the best epoch's).
        best_epoch: epoch whose parameters are returned (0: the untuned ones).
        n_train, n_holdout: samples used for training / early stopping.
    """

    epochs: int
    steps: int
    holdout_before: float
    holdout_after: float
    best_epoch: int
    n_train: int
    n_holdout: int


def _cast(master: Any, dtypes: tuple[str, ...]) -> Any:
    leaves, treedef = jax.tree.flatten(master)
    return jax.tree.unflatten(treedef, [x.astype(d) for x, d in zip(leaves, dtypes, strict=True)])


def _forward(apply_fn: ApplyFn, dtypes: tuple[str, ...], master: Any, discrete: Any, x: jax.Array) -> jax.Array:
    return apply_fn(merge(_cast(master, dtypes), discrete), x).astype(jnp.float32)


def _loss(apply_fn: ApplyFn, dtypes: tuple[str, ...], master: Any, discrete: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    diff = _forward(apply_fn, dtypes, master, discrete, x) - y.astype(jnp.float32)
    return jnp.mean(diff * diff)


@jax.jit(static_argnames=("apply_fn", "dtypes"))
def _train_step(apply_fn, dtypes, lr, b1, b2, master, opt_state, discrete, x, y):  # noqa: ANN001, ANN202
    loss, grads = jax.value_and_grad(lambda m: _loss(apply_fn, dtypes, m, discrete, x, y))(master)
    # optax's bias correction raises a Python float to an int32 count: allowed under
    # standard promotion only, so the optimizer runs under it whatever the caller set.
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = optax.adam(lr, b1=b1, b2=b2).update(grads, opt_state, master)
    return optax.apply_updates(master, updates), opt_state, loss


@jax.jit(static_argnames=("apply_fn", "dtypes"))
def _error_sums(apply_fn, dtypes, master, discrete, x, y):  # noqa: ANN001, ANN202
    y = y.astype(jnp.float32)
    diff = _forward(apply_fn, dtypes, master, discrete, x) - y
    return jnp.sum(diff * diff), jnp.sum(y * y)


class _Placer:
    """Puts batches on the devices: sharded on the leading axis when it divides."""

    def __init__(self, devices: Sequence[jax.Device] | None) -> None:
        devices = list(jax.local_devices() if devices is None else devices)
        mesh = Mesh(np.asarray(devices), ("data",))
        self.n = len(devices)
        self.first = devices[0]
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.sharded = NamedSharding(mesh, PartitionSpec("data"))

    def params(self, tree: Any) -> Any:
        return jax.device_put(tree, self.replicated)

    def batch(self, x: np.ndarray) -> jax.Array:
        if x.shape[0] % self.n == 0:
            return jax.device_put(x, self.sharded)
        # An indivisible batch runs replicated: every device computes it whole.
        return jax.device_put(x, self.replicated)


def _seed(key: jax.Array) -> np.ndarray:
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return np.asarray(data, dtype=np.uint32).ravel()


def relative_error(
    apply_fn: ApplyFn,
    params: Any,
    inputs: np.ndarray,
    targets: np.ndarray,
    *,
    batch_size: int = 8,
    devices: Sequence[jax.Device] | None = None,
) -> float:
    """``‖apply_fn(params, X) − Y‖² / ‖Y‖²`` over all samples, in batches.

    Args:
        apply_fn: hashable ``(params, x [B, T, d]) -> y [B, T, d]``.
        params: the block's parameters (dense or quantized leaves).
        inputs, targets: host arrays ``[N, T, d]``.
        batch_size: samples per forward pass.
        devices: devices to shard batches over (all local devices by default).
    """
    placer = _Placer(devices)
    cont, disc = split(params)
    dtypes = tuple(str(x.dtype) for x in jax.tree.leaves(cont))
    master = placer.params(jax.tree.map(lambda x: x.astype(jnp.float32), cont))
    disc = placer.params(disc)
    return _holdout_error(apply_fn, dtypes, master, disc, inputs, targets, np.arange(len(inputs)), batch_size, placer)


def _holdout_error(apply_fn, dtypes, master, disc, inputs, targets, idx, batch_size, placer) -> float:  # noqa: ANN001
    err = ref = 0.0
    for s in range(0, len(idx), batch_size):
        sel = np.sort(idx[s : s + batch_size])
        e, r = _error_sums(apply_fn, dtypes, master, disc, placer.batch(np.asarray(inputs[sel])),
                           placer.batch(np.asarray(targets[sel])))
        err += float(e)
        ref += float(r)
    return err / max(ref, np.finfo(np.float64).tiny)


def finetune_block(
    apply_fn: ApplyFn,
    params: Any,
    inputs: np.ndarray,
    targets: np.ndarray,
    config: BlockFinetuneConfig = BlockFinetuneConfig(),
    *,
    key: jax.Array,
    devices: Sequence[jax.Device] | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> tuple[Any, FinetuneReport]:
    """Tune a quantized block's continuous parameters to reproduce target outputs.

    Args:
        apply_fn: a hashable pure function ``(block params, x [B, T, d]) -> y [B, T, d]``
            (hashable so the compiled step is shared by every block of one structure).
        params: the block's parameters, quantized arrays included.
        inputs: host array ``[N, T, d]`` of block inputs (may be a memmap).
        targets: host array ``[N, T, d]``: the full-precision block's outputs on ``inputs``.
        config: optimisation settings.
        key: PRNG key deciding the held-out split and the batch order.
        devices: devices to shard batches over (all local devices by default).
        on_epoch: called with ``(epoch, held-out relative error)`` after each epoch.

    Returns:
        ``(params, report)``: parameters of the best epoch on the held-out samples, with
        the structure, codes and dtypes of ``params``.

    Raises:
        ValueError: fewer than two samples, or mismatched input/target shapes.
    """
    inputs_shape, targets_shape = tuple(np.shape(inputs)), tuple(np.shape(targets))
    if inputs_shape[:1] != targets_shape[:1] or len(inputs_shape) < 2:
        raise ValueError(f"inputs {inputs_shape} and targets {targets_shape} must share the leading sample axis")
    n = inputs_shape[0]
    if n < 2:
        raise ValueError(f"block fine-tuning needs at least 2 samples (one held out), got {n}")
    rng = np.random.default_rng(_seed(key))
    perm = rng.permutation(n)
    n_val = min(n - 1, max(1, int(round(config.holdout * n))))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    bs = min(config.batch_size, len(train_idx))

    placer = _Placer(devices)
    cont, disc = split(params)
    dtypes = tuple(str(x.dtype) for x in jax.tree.leaves(cont))
    master = placer.params(jax.tree.map(lambda x: x.astype(jnp.float32), cont))
    disc = placer.params(disc)
    opt_state = optax.adam(config.lr, b1=config.b1, b2=config.b2).init(master)
    # Hyperparameters are traced scalars: a new learning rate reuses the compiled step.
    hp = dict(apply_fn=apply_fn, dtypes=dtypes, lr=jnp.float32(config.lr), b1=jnp.float32(config.b1),
              b2=jnp.float32(config.b2))

    def holdout() -> float:
        return _holdout_error(apply_fn, dtypes, master, disc, inputs, targets, val_idx, bs, placer)

    before = best_loss = holdout()
    best, best_epoch, stale, steps, epoch = master, 0, 0, 0, 0
    for epoch in range(1, config.max_epochs + 1):
        order = rng.permutation(train_idx)
        for s in range(0, len(order) - bs + 1, bs):  # whole batches only: one compiled shape
            sel = np.sort(order[s : s + bs])
            master, opt_state, loss = _train_step(
                master=master, opt_state=opt_state, discrete=disc, x=placer.batch(np.asarray(inputs[sel])),
                y=placer.batch(np.asarray(targets[sel])), **hp)
            steps += 1
        if not np.isfinite(float(loss)):
            raise ValueError(f"block fine-tuning diverged (training loss {float(loss)}); lower lr={config.lr}")
        cur = holdout()
        if on_epoch is not None:
            on_epoch(epoch, cur)
        improved = cur < best_loss * (1.0 - config.tolerance)
        if cur < best_loss:
            best, best_loss, best_epoch = master, cur, epoch
        stale = 0 if improved else stale + 1
        if stale >= config.patience:
            break
    out = merge(_cast(best, dtypes), disc)
    report = FinetuneReport(epochs=epoch, steps=steps, holdout_before=before, holdout_after=best_loss,
                            best_epoch=best_epoch, n_train=len(train_idx), n_holdout=n_val)
    return out, report


__all__ = ["BlockFinetuneConfig", "FinetuneReport", "finetune_block", "relative_error"]
