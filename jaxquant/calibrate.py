"""Streaming ``XᵀX`` calibration statistics for every selected linear layer of a model.

``calibrate`` runs a model over an iterable of batches and accumulates, for the input
``x`` of each selected linear layer, ``Σ x xᵀ`` and the number of tokens. Activations
are never kept: one jit-compiled step maps ``(params, batch)`` to the statistics of
that batch, and the running sums are added on device.

How inputs are captured. Inside the traced step every selected kernel leaf of the
traced ``params`` is a distinct tracer object, so ``id(leaf) -> path`` identifies a
layer by the weight it is called with. Three sources report ``(x, kernel)`` while the
step is traced (and only then: capture costs nothing in the compiled program):

* ``jaxquant.ops.matmul`` (our own models), through ``record_matmul_inputs``;
* Linen ``nn.Dense``/``nn.DenseGeneral``, through ``flax.linen.intercept_methods``;
* NNX ``nnx.Linear``/``nnx.LinearGeneral``, through a class-level patch of
  ``__call__`` that is installed for the duration of the trace only.

A layer whose call is captured by a module hook does not count again if its
implementation calls ``ops.matmul`` with the same kernel. Layers called inside a
nested transformation (``jax.lax.scan``, ``jax.checkpoint``, ``vmap``) see a different
tracer for their kernel and are not captured; ``calibrate`` then names them.

Data parallelism. The batch is sharded on its leading axis over a 1-D mesh of the
devices, parameters are replicated, and the step's outputs are replicated: XLA inserts
the all-reduce that sums the per-device partial ``XᵀX``.
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxquant.ops import current_token_mask, record_matmul_inputs
from jaxquant.select import Selector, as_predicate, flatten_with_paths
from jaxquant.stats import LayerStats

__all__ = ["calibrate"]

_LINEN_TYPES = (nn.Dense, nn.DenseGeneral)
_NNX_TYPES = (nnx.Linear, nnx.LinearGeneral)
# The NNX patch is process-global: serialise traces that install it.
_PATCH_LOCK = threading.RLock()


def _flatten_inputs(x: jax.Array, axes: Sequence[int]) -> jax.Array:
    """``[..., contracted axes in kernel order]`` -> ``[tokens, d_in]``."""
    axes = [a % x.ndim for a in axes]
    rest = [a for a in range(x.ndim) if a not in axes]
    d_in = math.prod(x.shape[a] for a in axes)
    return jnp.transpose(x, rest + axes).reshape(-1, d_in)


def _as_axes(axis: int | Sequence[int]) -> tuple[int, ...]:
    return (axis,) if isinstance(axis, int) else tuple(axis)


class _Collector:
    """Trace-time accumulator: maps kernel tracers to paths and sums their inputs' XᵀX."""

    def __init__(self, kernels: dict[str, Any], dtype: Any) -> None:
        self.kernels = kernels
        self.by_id = {id(leaf): path for path, leaf in kernels.items()}
        self.dtype = dtype
        self.xtx: dict[str, jax.Array] = {}
        self.count: dict[str, int | jax.Array] = {}
        self._active: list[int] = []
        # (kernel, input) pairs already counted, with the inputs kept alive so their ids
        # stay unique during the trace: a layer whose hook and inner ops.matmul both fire
        # on the same input counts once, whichever fires first.
        self._seen: dict[tuple[int, int], Any] = {}

    def lookup(self, kernel: Any) -> str | None:
        return self.by_id.get(id(kernel))

    def add(self, path: str, x: jax.Array, axes: Sequence[int] = (-1,), mask: jax.Array | None = None) -> None:
        kernel = self.kernels[path]
        key = (id(kernel), id(x))
        if key in self._seen:
            return
        self._seen[key] = x
        x2d = _flatten_inputs(x, axes)
        # A kernel is (*contracted, *features): d_in is the product of some leading dims.
        d_ins = {math.prod(kernel.shape[:k]) for k in range(1, max(kernel.ndim, 2))}
        if x2d.shape[1] not in d_ins:
            raise ValueError(
                f"calibrate: input of {path} has {x2d.shape[1]} features, which does not "
                f"match its kernel of shape {tuple(kernel.shape)}"
            )
        xa = x2d.astype(self.dtype)
        count: int | jax.Array = x2d.shape[0]
        if mask is not None:  # only the rows marked by ops.token_mask (an expert's tokens) count
            rows = jnp.reshape(mask, (-1,))
            xa = xa * rows[:, None].astype(self.dtype)
            count = jnp.sum(rows, dtype=jnp.int32)
        # HIGHEST: on GPU/TPU the default precision would round inputs to bf16/tf32.
        xtx = lax.dot_general(xa, xa, (((0,), (0,)), ((), ())), precision=lax.Precision.HIGHEST)
        self.xtx[path] = xtx if path not in self.xtx else self.xtx[path] + xtx
        self.count[path] = self.count.get(path, 0) + count

    @contextlib.contextmanager
    def layer(self, kernel: Any) -> Iterator[None]:
        """Mark a layer call as captured, so ``ops.matmul`` inside it is not counted twice."""
        self._active.append(id(kernel))
        try:
            yield
        finally:
            self._active.pop()

    def on_matmul(self, x: jax.Array, w: Any) -> None:
        path = self.lookup(w)
        if path is not None and id(w) not in self._active:
            self.add(path, x, mask=current_token_mask())

    def linen_interceptor(self, next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, _LINEN_TYPES):
            return next_fun(*args, **kwargs)
        try:
            kernel = module.variables["params"]["kernel"]
        except (KeyError, TypeError, AttributeError):  # unbound or still initialising
            return next_fun(*args, **kwargs)
        path = self.lookup(kernel)
        if path is None:
            return next_fun(*args, **kwargs)
        x = args[0] if args else kwargs["inputs"]
        general = isinstance(module, nn.DenseGeneral)
        if general and _as_axes(module.batch_dims):
            raise ValueError(f"calibrate: DenseGeneral with batch_dims is not supported at {path}")
        return self.observe(path, kernel, x, _as_axes(module.axis) if general else (-1,),
                            lambda: next_fun(*args, **kwargs))

    def observe(self, path: str, kernel: Any, x: jax.Array, axes: tuple[int, ...], call: Callable[[], Any]) -> Any:
        """Record the inputs ``x`` of the layer at ``path``, then run it (``call``)."""
        self.add(path, x, axes)
        with self.layer(kernel):
            return call()

    def nnx_call(self, original: Callable) -> Callable:
        collector = self

        def __call__(module: Any, inputs: jax.Array, *args: Any, **kwargs: Any) -> Any:
            kernel = module.kernel.get_value() if module.kernel is not None else None
            path = collector.lookup(kernel)
            if path is None:
                return original(module, inputs, *args, **kwargs)
            general = isinstance(module, nnx.LinearGeneral)
            if general and module.batch_axis:
                raise ValueError(f"calibrate: LinearGeneral with batch_axis is not supported at {path}")
            return collector.observe(path, kernel, inputs, _as_axes(module.axis) if general else (-1,),
                                     lambda: original(module, inputs, *args, **kwargs))

        return __call__


@contextlib.contextmanager
def _capture(collector: _Collector) -> Iterator[None]:
    """Install all three capture hooks for the duration of a trace."""
    with _PATCH_LOCK:
        originals = {cls: cls.__dict__["__call__"] for cls in _NNX_TYPES}
        try:
            for cls, original in originals.items():
                cls.__call__ = collector.nnx_call(original)
            with record_matmul_inputs(collector.on_matmul), nn.intercept_methods(
                collector.linen_interceptor
            ):
                yield
        finally:
            for cls, original in originals.items():
                cls.__call__ = original


def _check_dtype(dtype: Any) -> Any:
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        raise ValueError(f"dtype={dtype.name} must be float32 or float64")
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError("dtype=float64 needs jax.config.update('jax_enable_x64', True)")
    return dtype


def _normalise_call(fn: Any, params: Any, batches: Any) -> tuple[Callable, Any, Any]:
    """Return ``(call(params, batch), params pytree, batches)`` for NNX and Linen inputs."""
    if isinstance(fn, nnx.Module):
        # calibrate(model, batches) or calibrate(model, None, batches)
        if batches is None:
            params, batches = None, params
        graphdef, state = nnx.split(fn)
        if params is not None:
            state = params
        return (lambda s, b: nnx.merge(graphdef, s)(b)), state, batches
    if not callable(fn):
        raise TypeError(f"fn must be callable or an nnx.Module, got {type(fn).__name__}")
    if isinstance(params, nnx.Module):
        # calibrate(lambda model, batch: ..., model, batches)
        graphdef, state = nnx.split(params)
        return (lambda s, b: fn(nnx.merge(graphdef, s), b)), state, batches
    return fn, params, batches


def _make_step(call: Callable, where: Selector | None, dtype: Any) -> Callable:
    predicate = as_predicate(where)

    def step(params: Any, batch: Any) -> dict[str, LayerStats]:
        kernels = {p: leaf for p, leaf in flatten_with_paths(params) if predicate(p, leaf)}
        if not kernels:
            raise ValueError(
                "calibrate: the selector matched no leaf of params; leaves are: "
                + ", ".join(p for p, _ in flatten_with_paths(params)[:20])
            )
        collector = _Collector(kernels, dtype)
        with _capture(collector):
            call(params, batch)
        missing = [p for p in kernels if p not in collector.xtx]
        if missing:
            raise ValueError(
                f"calibrate: selected layers {missing} received no input. Only nn.Dense, "
                "nn.DenseGeneral, nnx.Linear, nnx.LinearGeneral and jaxquant.ops.matmul called "
                "with the parameter itself (not inside scan/remat/vmap, not a cast copy) are "
                "seen; restrict `where` or route the product through jaxquant.ops.matmul"
            )
        return {
            p: LayerStats(collector.xtx[p], jnp.asarray(collector.count[p], jnp.int32))
            for p in kernels
        }

    return step


def _leading_dims(batch: Any) -> set[int]:
    return {int(np.shape(x)[0]) if np.ndim(x) else -1 for x in jax.tree.leaves(batch)}


@jax.jit
def _add(a: dict[str, LayerStats], b: dict[str, LayerStats]) -> dict[str, LayerStats]:
    return jax.tree.map(jnp.add, a, b)


def calibrate(
    fn: Any,
    params: Any = None,
    batches: Iterable[Any] | None = None,
    *,
    where: Selector | None = None,
    dtype: Any = jnp.float32,
    progress: bool = False,
    devices: Sequence[jax.Device] | None = None,
) -> dict[str, LayerStats]:
    """Accumulate ``XᵀX`` and token counts for the input of every selected linear layer.

    Works with Flax NNX and Linen::

        stats = calibrate(model, batches)                                # NNX: model(batch)
        stats = calibrate(lambda m, b: m(b, mask), model, batches)       # NNX, custom call
        stats = calibrate(lambda v, b: module.apply(v, b), variables, batches)  # Linen

    Args:
        fn: ``fn(params, batch)`` running the model, or an ``nnx.Module`` called as
            ``model(batch)`` (then ``params`` may be omitted: ``calibrate(model, batches)``,
            or be an ``nnx.State`` to use instead of the module's own).
        params: the parameter pytree handed to ``fn`` (Linen variables, a dict, an
            ``nnx.State``), or an ``nnx.Module`` handed to ``fn`` as is.
        batches: iterable of batches (any pytree whose leaves share a leading batch
            axis); consumed once, never stored.
        where: selector of the kernels to calibrate (default
            ``jaxquant.select.linear_kernels``), applied to the path strings of
            ``params`` (for NNX: of ``nnx.state(model)``).
        dtype: accumulation dtype, float32 or float64 (the latter needs x64 enabled).
        progress: show a progress bar over batches.
        devices: devices to shard batches over; all local devices by default.

    Returns:
        ``{path: LayerStats}`` keyed by the path strings of the kernels within
        ``params``, so it feeds ``jaxquant.quantize(params, stats, recipe)``. With more
        than one device the arrays are replicated over them.

    Raises:
        ValueError: no batches; a selected layer never received input; an input shape
            does not match its kernel; non-finite statistics (naming the path); a bad
            ``dtype``.
    """
    dtype = _check_dtype(dtype)
    call, params, batches = _normalise_call(fn, params, batches)
    if batches is None:
        raise ValueError("calibrate: batches is required")
    devices = list(jax.local_devices() if devices is None else devices)
    if not devices:
        raise ValueError("calibrate: devices is empty")
    mesh = Mesh(np.array(devices), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec("data"))

    step = _make_step(call, where, dtype)
    sharded_step = jax.jit(step, out_shardings=replicated)
    single_step = jax.jit(step)
    params_rep = jax.device_put(params, replicated)
    params_single = None  # made on first use: only batches that do not divide need it

    total: dict[str, LayerStats] | None = None
    n_batches = 0
    iterator: Iterable[Any] = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="calibrate", unit="batch")
    for batch in iterator:
        dims = _leading_dims(batch)
        if len(dims) != 1 or -1 in dims:
            raise ValueError(f"calibrate: batch leaves must share one leading axis, got sizes {sorted(dims)}")
        (size,) = dims
        if size % len(devices) == 0:
            stats = sharded_step(params_rep, jax.device_put(batch, sharded))
        else:
            warnings.warn(
                f"calibrate: a batch of {size} does not divide over {len(devices)} devices; "
                f"running it on one device ({devices[0]})",
                stacklevel=2,
            )
            if params_single is None:
                params_single = jax.device_put(params, devices[0])
            stats = single_step(params_single, jax.device_put(batch, devices[0]))
            stats = jax.device_put(stats, replicated)
        total = stats if total is None else _add(total, stats)
        n_batches += 1
    if total is None:
        raise ValueError("calibrate: batches is empty")

    finite = jax.device_get({p: jnp.isfinite(s.xtx).all() for p, s in total.items()})
    bad = [p for p, ok in finite.items() if not ok]
    if bad:
        raise ValueError(f"calibrate: XᵀX has NaN/Inf (non-finite inputs) at {bad}")
    return total
