"""Fitness of a candidate model: its KL divergence to the full-precision model on
calibration windows, with one compiled forward pass whatever the candidate is."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.finetune.losses import kl_divergence

ApplyFn = Callable[[Any, jax.Array], jax.Array]


class KLFitness:
    """``fitness(params, window_ids)``: mean over tokens of ``KL(teacher ‖ candidate)``.

    The teacher's log-probabilities are computed once per window, on first use, and kept.
    The candidate's forward and the divergence run in one jit-compiled function over a
    fixed batch of windows; candidates that differ only in their arrays' values (e.g.
    ``DecodedOptions.tree`` of different assignments) reuse its compilation
    (``traces`` counts compilations, for tests).

    Args:
        apply_fn: ``apply_fn(params, tokens[B, T]) -> logits[B, T, V]``.
        teacher_params: the full-precision parameters.
        windows: ``[N, T]`` integer calibration windows.
        batch_size: windows per forward pass; a call's windows are padded to a multiple
            of it by repeating its first window with zero weight.
    """

    def __init__(self, apply_fn: ApplyFn, teacher_params: Any, windows: Any, batch_size: int = 1) -> None:
        windows = np.asarray(windows)
        if windows.ndim != 2 or not np.issubdtype(windows.dtype, np.integer) or windows.size == 0:
            raise ValueError(f"windows must be a non-empty [N, T] integer array, got shape {windows.shape} "
                             f"dtype {windows.dtype}")
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.windows = windows.astype(np.int32)
        self.batch_size = batch_size
        self.teacher_params = teacher_params
        self.traces = 0
        self._teacher: dict[int, jax.Array] = {}
        self._teacher_fn = jax.jit(lambda p, t: jax.nn.log_softmax(apply_fn(p, t).astype(jnp.float32), axis=-1))

        def kl(params: Any, tokens: jax.Array, teacher_logp: jax.Array, mask: jax.Array) -> jax.Array:
            self.traces += 1  # runs at trace time only
            return kl_divergence(apply_fn(params, tokens).astype(jnp.float32), teacher_logp, mask)

        self._kl = jax.jit(kl)

    @property
    def num_windows(self) -> int:
        return int(self.windows.shape[0])

    def teacher_logp(self, window_ids: Sequence[int]) -> jax.Array:
        """``[len(window_ids), T, V]`` teacher log-probabilities (cached per window)."""
        todo = [int(i) for i in window_ids if int(i) not in self._teacher]
        for start in range(0, len(todo), self.batch_size):
            ids = todo[start:start + self.batch_size]
            logp = self._teacher_fn(self.teacher_params, jnp.asarray(self.windows[ids]))
            for j, i in enumerate(ids):
                self._teacher[i] = logp[j]
        return jnp.stack([self._teacher[int(i)] for i in window_ids])

    def __call__(self, params: Any, window_ids: Sequence[int]) -> float:
        """Mean per-token KL divergence of ``params``'s predictions from the teacher's
        (``inf`` when it is not finite).

        Raises:
            ValueError: no window ids, or ids out of range.
        """
        ids = [int(i) for i in window_ids]
        if not ids or min(ids) < 0 or max(ids) >= self.num_windows:
            raise ValueError(f"window_ids must be non-empty and within 0..{self.num_windows - 1}, got {ids}")
        total = 0.0
        for start in range(0, len(ids), self.batch_size):
            batch = ids[start:start + self.batch_size]
            pad = self.batch_size - len(batch)
            mask = jnp.asarray(np.repeat([[True]] * len(batch) + [[False]] * pad, self.windows.shape[1], axis=1))
            padded = batch + [batch[0]] * pad
            mean = self._kl(params, jnp.asarray(self.windows[padded]), self.teacher_logp(padded), mask)
            total += float(mean) * len(batch)
        value = total / len(ids)
        # A candidate whose logits overflow is the worst possible, not an error.
        return value if np.isfinite(value) else float("inf")


__all__ = ["KLFitness"]
