"""The one-shot transform: quantize the selected weights of a parameter tree.

``quantize(tree, stats, recipe)`` returns a tree of the same structure in which every
selected weight leaf is replaced by a quantized array. This module is the one place
that knows leaf layouts: leaves named ``kernel`` are Flax ``(d_in, d_out)``
(``"in_out"``) and leaves named ``weight`` are PyTorch-style ``(d_out, d_in)``
(``"out_in"``). Weights are transposed to the methods' ``(d_out, d_in)`` storage order
here, and the quantized array records the leaf's layout so that ``decode()`` gives the
leaf's own shape back.

Works on Flax NNX ``nnx.State`` (the array inside each ``Variable`` is replaced),
Linen ``params`` dicts and plain nested containers alike.
"""

from __future__ import annotations

import zlib
from typing import Any

import jax
import jax.numpy as jnp

from jaxquant import methods, rotations
from jaxquant.qarray import Layout, check_layout, flatten_by_path
from jaxquant.recipes import check_divisible
from jaxquant.select import Selector, resolve_recipes
from jaxquant.stats import as_xtx

_LAYOUT_BY_NAME: dict[str, Layout] = {"kernel": "in_out", "weight": "out_in"}


def leaf_layout(path: str, layout: str | None = None) -> Layout:
    """Layout of the leaf at ``path``: ``layout`` if given, else from the leaf's name.

    Raises:
        ValueError: the leaf is neither ``kernel`` nor ``weight`` and no layout was given.
    """
    if layout is not None:
        return check_layout(layout)
    name = path.rsplit("/", 1)[-1]
    if name not in _LAYOUT_BY_NAME:
        raise ValueError(
            f"cannot infer the layout of the leaf {path!r} from its name {name!r} (known: "
            f"'kernel' -> in_out, 'weight' -> out_in); pass layout='in_out' or 'out_in'"
        )
    return _LAYOUT_BY_NAME[name]


def leaf_key(key: jax.Array, path: str) -> jax.Array:
    """A per-leaf key: ``key`` folded with a stable (unsalted) hash of the path."""
    return jax.random.fold_in(key, zlib.crc32(path.encode("utf-8")) & 0x7FFFFFFF)


def _check_leaf(w: Any, path: str) -> None:
    if not hasattr(w, "shape") or not hasattr(w, "dtype"):
        raise TypeError(f"the leaf at {path} is {type(w).__name__}, not an array")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"the leaf at {path} has dtype {w.dtype}; only floating weights can be quantized")
    if w.ndim != 2:
        raise ValueError(f"the leaf at {path} has shape {tuple(w.shape)}; only 2-D weights can be quantized")


def _all_finite(x: jax.Array) -> bool:
    return bool(jnp.all(jnp.isfinite(x)))


def quantize_weight(
    w: Any,
    xtx: Any,
    recipe: Any,
    key: jax.Array | None = None,
    *,
    layout: str = "out_in",
    path: str = "<weight>",
) -> Any:
    """Validate one weight and quantize it with the method that implements ``recipe``.

    Args:
        w: 2-D float weight in ``layout``.
        xtx: ``(d_in, d_in)`` input statistics: a ``LayerStats``, an array, or ``None``
            for data-free methods (RTN).
        recipe: a recipe of a registered method; with ``rotate`` set, the weight is
            quantized in a random rotated basis and comes back as a ``RotatedQuantized``.
        key: PRNG key for randomised methods (default ``jax.random.key(0)``).
        layout: ``"out_in"`` (``(d_out, d_in)``) or ``"in_out"`` (Flax kernel).
        path: leaf path, named in every error.

    Returns:
        The quantized array (decodes to ``w``'s shape and layout).

    Raises:
        TypeError: a non-floating weight.
        ValueError: not 2-D, NaN/Inf, indivisible groups, missing or mis-shaped or
            non-finite statistics.
    """
    layout = check_layout(layout)
    _check_leaf(w, path)
    w = jnp.asarray(w)
    w_out_in = w if layout == "out_in" else w.T
    d_out, d_in = w_out_in.shape
    check_divisible(recipe, d_out, d_in, path)
    if not _all_finite(w):
        raise ValueError(f"the weight at {path} holds NaN or Inf")
    if xtx is not None:
        xtx = as_xtx(xtx)
        if xtx.shape != (d_in, d_in):
            raise ValueError(
                f"statistics for {path} have shape {tuple(xtx.shape)}, expected ({d_in}, {d_in}) "
                f"for a weight of shape {tuple(w.shape)} (layout {layout})"
            )
        if not _all_finite(xtx):
            raise ValueError(f"the statistics (XᵀX) for {path} hold NaN or Inf")
        xtx = _on_devices_of(xtx, w)
    elif methods.needs_statistics(recipe):
        raise ValueError(f"{type(recipe).__name__} needs XᵀX statistics, but none were given for {path}")
    key = jax.random.key(0) if key is None else key
    fn = methods.method_for(recipe)
    w32 = w_out_in.astype(jnp.float32)
    xtx32 = None if xtx is None else xtx.astype(jnp.float32)
    rotation = getattr(recipe, "rotate", "none")
    if rotation != "none":
        # The method quantizes the rotated problem as an ordinary out_in weight.
        return rotations.quantize_rotated(
            w32, xtx32, rotation, key, lambda w_r, xtx_r, k: fn(w_r, xtx_r, recipe, k, layout="out_in", path=path),
            layout=layout)
    return fn(w32, xtx32, recipe, key, layout=layout, path=path)


def _on_devices_of(xtx: jax.Array, w: jax.Array) -> jax.Array:
    """``xtx`` moved onto the single device that holds ``w``, when that is where ``w`` is.

    Multi-device calibration returns statistics replicated over its mesh. Quantizing with
    them there would run the whole search on every replica (wasted work), and on XLA:CPU
    with forced host devices (jax 0.10) such a replicated GPTQ program was seen to hang.
    """
    w_devices = w.devices()
    if len(w_devices) == 1 and xtx.devices() != w_devices:
        return jax.device_put(xtx, next(iter(w_devices)))
    return xtx


def quantize(
    tree: Any,
    stats: dict[str, Any] | None,
    recipe: Any,
    *,
    where: Selector | None = None,
    key: jax.Array | None = None,
    layout: str | None = None,
    progress: bool = False,
) -> Any:
    """Quantize the selected weight leaves of a parameter tree.

    Args:
        tree: NNX ``State``, Linen params, or any pytree of arrays.
        stats: ``{path: LayerStats or (d_in, d_in) array}`` keyed by the leaf path
            strings of ``jaxquant.select.path_to_str`` (what ``jaxquant.calibrate``
            returns); may be ``None``/empty for data-free recipes.
        recipe: one recipe for all selected leaves, or a ``{pattern: recipe}`` map /
            ``[(pattern, recipe)]`` list (first matching pattern wins).
        where: selector of the leaves to quantize (default: linear-layer kernels,
            skipping embeddings, norms, biases and the output head).
        key: PRNG key (default ``jax.random.key(0)``); each leaf gets ``key`` folded
            with a stable hash of its path, so results do not depend on tree order.
        layout: force every selected leaf's layout (``"in_out"``/``"out_in"``) instead
            of inferring it from the leaf name.
        progress: show a progress bar over the selected leaves.

    Returns:
        A tree of the same structure, selected leaves replaced by quantized arrays.

    Raises:
        ValueError / TypeError: naming the leaf path, for any invalid leaf, statistics
            or configuration (see ``quantize_weight``).
    """
    plan = resolve_recipes(tree, recipe, where)
    stats = {} if stats is None else stats
    key = jax.random.key(0) if key is None else key
    flat, treedef = flatten_by_path(tree)
    todo = [i for i, (path, _) in enumerate(flat) if path in plan]
    # Validate cheap, whole-tree facts before spending time on any leaf.
    for i in todo:
        path, leaf = flat[i]
        _check_leaf(leaf, path)
        leaf_layout(path, layout)
    it: Any = todo
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(todo, desc="quantize", unit="layer")
    leaves = [leaf for _, leaf in flat]
    for i in it:
        path = flat[i][0]
        r = plan[path]
        xtx = stats.get(path)
        if xtx is None and methods.needs_statistics(r):
            known = sorted(stats)[:10]
            raise ValueError(
                f"{type(r).__name__} needs XᵀX statistics, but stats has no entry for {path} "
                f"(stats has {len(stats)} entries, e.g. {known})"
            )
        if progress:
            it.set_postfix_str(path)
        leaves[i] = quantize_weight(
            leaves[i], xtx, r, leaf_key(key, path), layout=leaf_layout(path, layout), path=path
        )
    return jax.tree_util.tree_unflatten(treedef, leaves)


__all__ = ["leaf_key", "leaf_layout", "quantize", "quantize_weight"]
