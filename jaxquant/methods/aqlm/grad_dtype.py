"""The operand dtype of the Adam steps' ``(Ŵ−W)·XᵀX`` product: float32 or bfloat16.

``recipe.grad_dtype="auto"`` takes bfloat16 operands (float32 accumulation) only where
that product is clearly faster than in float32. CPU flags do not say so: a 512³ product
took 0.52 ms against 2.15 ms on a Xeon with AMX, 0.97 ms against about 2 ms on an AMD
EPYC with AVX512-BF16, but 2.07 ms against 1.41 ms (slower) on a Xeon whose AVX512-BF16
was exposed without AMX. So on CPUs with a bfloat16 feature the two products are timed
once per machine (about 0.2 s) and the speedup is kept in the user cache directory,
keyed by CPU and jaxlib version: later runs, and the results they produce, do not depend
on a fresh, noisy measurement.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.atomic_files import atomic_write_bytes
from jaxquant.native_build import cache_dir, cpu_flags, cpu_id

# Flags under which a bfloat16 product may be faster (it is timed to decide).
BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
# bfloat16 is chosen when the float32 product takes at least this many times as long.
MIN_SPEEDUP = 1.25
_SIZE = 512
_REPEATS = 7


def _cache_file() -> Path:
    import jaxlib

    key = hashlib.sha256("\0".join([cpu_id(), jaxlib.__version__, str(_SIZE)]).encode()).hexdigest()[:16]
    return cache_dir().parent / "probes" / f"bf16_product_{key}.json"


def _time_products() -> float:
    """float32 time / bfloat16 time of a ``_SIZE``³ product (best of ``_REPEATS`` each, interleaved)."""
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.standard_normal((_SIZE, _SIZE)), jnp.float32) for _ in range(2))

    def product(dtype: Any) -> Any:
        return jax.jit(lambda x, y: jnp.dot(x.astype(dtype), y.astype(dtype), preferred_element_type=jnp.float32))

    fns = {dtype: product(dtype) for dtype in (jnp.float32, jnp.bfloat16)}
    best = {dtype: np.inf for dtype in fns}
    for fn in fns.values():
        fn(a, b).block_until_ready()  # compile and warm up
    for _ in range(_REPEATS):
        for dtype, fn in fns.items():
            start = time.perf_counter()
            fn(a, b).block_until_ready()
            best[dtype] = min(best[dtype], time.perf_counter() - start)
    return float(best[jnp.float32] / best[jnp.bfloat16])


@functools.cache
def bf16_product_speedup() -> float:
    """How many times faster the bfloat16 product is on this CPU (measured once, cached).

    Returns 1.0 without measuring on CPUs with none of ``BF16_FLAGS``.
    """
    if not BF16_FLAGS & cpu_flags():
        return 1.0
    path = _cache_file()
    try:
        return float(json.loads(path.read_text())["speedup"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not measured yet (or an unreadable file): measure
    speedup = _time_products()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps({"speedup": speedup, "size": _SIZE}).encode())
    except OSError:
        pass  # a read-only cache costs a measurement per process, nothing else
    return speedup


def resolve_grad_dtype(grad_dtype: str, devices: list[Any]) -> str:
    """``recipe.grad_dtype`` with ``"auto"`` resolved for these devices (float32 off CPU)."""
    if grad_dtype != "auto":
        return grad_dtype
    on_cpu = all(d.platform == "cpu" for d in devices)
    return "bfloat16" if on_cpu and bf16_product_speedup() >= MIN_SPEEDUP else "float32"


__all__ = ["BF16_FLAGS", "MIN_SPEEDUP", "bf16_product_speedup", "resolve_grad_dtype"]
