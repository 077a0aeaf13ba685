"""PV-Tuning (Malinovskii et al., 2024) as an optax-style transform over quantized trees.

A quantized weight has a continuous part (codebooks, scales, zero points) and a
discrete part (codes). PV-Tuning alternates two steps from one gradient of the loss
with respect to the *decoded* weights ``∂L/∂Ŵ``:

- **P step**: the gradient is pulled back through ``decode`` (a ``jax.vjp``) onto the
  continuous parameters, and ``p_optimizer`` (any optax transform) updates them; the
  other continuous leaves of the tree (norms, embeddings, ...) are updated by the same
  optimizer with their own gradients. Codes never change in the P step.
- **V step**: a dense *straight-through buffer* per quantized layer starts at the
  decoded weight and follows ``v_optimizer`` on ``∂L/∂Ŵ`` every step. Every ``every``
  steps, the ``update_fraction`` of the layer's groups whose buffer moved furthest from
  the current decoded value are re-encoded toward the buffer (squared error), by beam
  search for additive (AQLM) arrays and by rounding for scalar arrays. A group keeps
  its old codes unless the new ones are strictly closer to the buffer, and with
  ``trust_ratio`` the changes are accepted in order of selection only while
  ``‖ΔŴ‖_F ≤ trust_ratio · ‖Ŵ‖_F`` for the layer. Codes outside the selected subset
  never change. With ``force_update`` the selected groups move even where their old
  codes are the closest to the buffer: each takes the closest codes whose change points
  along ``buffer - Ŵ`` (the reference implementation's forced, directional update, made
  for buffers reset every step). ``metric="adam"`` (not in the paper) weighs the
  selection distance and the re-encoding error of each weight by ``sqrt(ν)``,
  ``v_optimizer``'s Adam second moment, and re-encodes by coordinate descent over the
  codebooks. ``selection="gain"`` (not in the paper) picks instead the groups whose
  re-encoding lowers their distance to the buffer most.

``mode="ste"`` is the straight-through baseline with the same object: each V step
re-encodes *every* group from its buffer (no subspace selection, no trust ratio).

Everything in ``update`` has static shapes (the number of selected groups is fixed
from the fraction and the layer's shape at trace time), so one compilation serves
every step; the V step runs under ``lax.cond``.

The "group" is the unit of codes: an ``og × ig`` tile (all its ``M`` codes) for
``AdditiveQuantized``, a single weight for ``ScalarQuantized``. Selection and
re-encoding go through the ``Reencoder`` each array type's method registers
(``jaxquant.methods``), so a new array type is tuned without a change here.

Mixed precision: the tuner keeps in its state a float32 master copy of every continuous
leaf stored in another dtype (codebooks are often stored in float16, where small
optimizer steps round away) and writes it, cast to the leaf's dtype, into the returned
tree; float32 leaves are their own master. Change the tree only through ``update`` while
tuning.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxquant.in_order import alike_groups, map_stacked, stack, unstack
from jaxquant.methods import reencoder_for
from jaxquant.qarray import (
    dequantize,
    flatten_by_path,
    is_quantized,
    merge,
    split,
)

Mode = Literal["pv", "ste"]
Metric = Literal["euclidean", "adam"]
Selection = Literal["distance", "gain"]


class PVState(NamedTuple):
    """State of ``pv_tuning``: a pytree, so it can be jit-carried and checkpointed.

    Attributes:
        count: int32 number of ``update`` calls so far.
        master: float32 copies of the continuous leaves of the tree (``split(qtree)[0]``)
            stored in other dtypes; ``None`` for float32 leaves, whose master is the leaf.
        p_state: ``p_optimizer`` state over the float32 continuous part.
        buffers: ``{path: (n, *shape) float32}`` straight-through buffers, one per
            quantized leaf in its dense layout, stacked by kind (the leaves whose paths
            differ only in integer parts, of one type, static fields, shapes and dtypes),
            in tree order, under the path of the first of them.
        v_state: ``v_optimizer`` state over ``buffers``.
    """

    count: jax.Array
    master: Any
    p_state: Any
    buffers: dict[str, jax.Array]
    v_state: Any


class PVTuning(NamedTuple):
    """An ``init``/``update`` pair (the shape of an optax ``GradientTransformation``).

    ``update(grads, state, qtree) -> (new_qtree, new_state)``: ``grads`` has the
    structure of ``dequantize(qtree)`` (see ``decoded_value_and_grad``).
    """

    init: Callable[[Any], PVState]
    update: Callable[[Any, PVState, Any], tuple[Any, PVState]]


# ----------------------------------------------------------------------------- optimizers


def adam(learning_rate: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
         mu_dtype: Any = None) -> optax.GradientTransformation:
    """``optax.adam``, without a first moment in memory when ``b1 == 0``.

    Adam with ``b1 = 0`` (the AQLM reference's recommended V-step setting,
    ``--code_beta1 0``) is RMSprop with bias correction and ``eps`` outside the square
    root; ``optax.adam`` would still keep a zero-decay first moment, one more float32
    copy of every weight for the straight-through buffers. The state has ``nu`` either
    way, so ``metric="adam"`` works with both.

    Args:
        learning_rate, b1, b2, eps: as in ``optax.adam``.
        mu_dtype: dtype of the first moment (e.g. ``jnp.bfloat16``; ``None``: float32).
    """
    if not 0.0 <= b1 < 1.0 or not 0.0 <= b2 < 1.0:
        raise ValueError(f"adam: b1={b1!r} and b2={b2!r} must be in [0, 1)")
    if b1 == 0.0:
        return optax.chain(optax.scale_by_rms(decay=b2, eps=eps, eps_in_sqrt=False, bias_correction=True),
                           optax.scale(-learning_rate))
    return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype)


# ----------------------------------------------------------------------------- gradients


def decoded_value_and_grad(
    loss_fn: Callable[..., Any], *, has_aux: bool = False, layout: Any = None
) -> Callable[..., tuple[Any, Any]]:
    """``jax.value_and_grad`` of ``loss_fn`` with respect to the decoded weights.

    Args:
        loss_fn: ``loss_fn(params, *args, **kwargs) -> scalar`` (or ``(scalar, aux)``
            with ``has_aux``), where ``params`` is a dense parameter tree of the model
            (in ``layout``'s packed form when given).
        has_aux: as in ``jax.value_and_grad``.
        layout: optional object with ``pack_decoded(qtree)`` (the decoded tree in packed
            form) and ``unpack(tree)`` (e.g. ``jaxquant.models.llama.LayerStack``): the
            loss sees the packed decoded tree and its gradient is unpacked after it, so
            the loss may scan stacked layers.

    Returns:
        ``f(qtree, *args, **kwargs) -> (value, grads)`` where the loss is evaluated at
        ``dequantize(qtree)`` and ``grads`` has that dense tree's structure: the input
        ``pv_tuning(...).update`` expects.
    """
    vg = jax.value_and_grad(loss_fn, has_aux=has_aux)

    def wrapped(qtree: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        if layout is None:
            return vg(dequantize(qtree), *args, **kwargs)
        value, grads = vg(layout.pack_decoded(qtree), *args, **kwargs)
        return value, layout.unpack(grads)

    return wrapped


def _pull_back(q: Any, g: jax.Array) -> Any:
    """Cotangent of ``q.decode()`` pulled back to ``q``'s continuous part (codes ``None``)."""
    cont, disc = split(q)
    _, vjp = jax.vjp(lambda c: merge(c, disc).decode(jnp.float32), cont)
    (ct,) = vjp(g.astype(jnp.float32))
    return ct


def _quantized_groups(leaves: list[Any], paths: list[str]) -> list[list[int]]:
    """Indices of the quantized ``leaves``, grouped by kind: the same path up to its
    integer parts (``layers/*/mlp/up_proj/kernel``) and the same type, static fields,
    shapes and dtypes.

    The per-layer work of the P and V steps runs as one ``lax.map`` per group (all of a
    model's ``up_proj`` weights, say), so the compiled step holds one copy of it per kind
    of layer instead of one per layer. Grouping by path as well keeps each group in the
    order and extent of a model's stacked layers (``jaxquant.models.llama.LayerStack``),
    whose stacked gradients then pass to the buffers without a copy.
    """
    quantized = [i for i, leaf in enumerate(leaves) if is_quantized(leaf)]
    kinds = ["/".join("*" if part.isdigit() else part for part in paths[i].split("/")) for i in quantized]
    return [[quantized[j] for j in group] for group in alike_groups([leaves[i] for i in quantized], kinds)]


def continuous_grads(grads: Any, qtree: Any) -> Any:
    """Gradients w.r.t. the decoded tree turned into gradients of ``split(qtree)[0]``.

    Quantized leaves get the pull-back of their dense gradient through ``decode``; other
    floating leaves keep their gradient; everything else becomes ``None``.
    """
    leaves, treedef, paths = _quantized_paths(qtree)
    g_leaves = treedef.flatten_up_to(grads)
    groups = _quantized_groups(leaves, paths)
    stacked = [_stacked_grads(g_leaves, group) for group in groups]
    return jax.tree_util.tree_unflatten(treedef, _pulled_back(leaves, g_leaves, groups, stacked))


def _pulled_back(leaves: list[Any], g_leaves: list[Any], groups: list[list[int]],
                 stacked_grads: list[jax.Array]) -> list[Any]:
    """``continuous_grads``'s leaves, from each group's already stacked dense gradient."""
    pulled = map_stacked(_pull_back, [(stack([leaves[i] for i in group]), g)
                                      for group, g in zip(groups, stacked_grads, strict=True)])
    out: list[Any] = [None if is_quantized(leaf) or g is None or not jnp.issubdtype(jnp.asarray(leaf).dtype,
                                                                                   jnp.inexact) else g
                      for leaf, g in zip(leaves, g_leaves, strict=True)]
    for group, ct in zip(groups, pulled, strict=True):
        for i, ct_i in zip(group, unstack(ct, len(group)), strict=True):
            out[i] = ct_i
    return out


def _stacked_grads(g_leaves: list[Any], group: list[int]) -> jax.Array:
    """A group's dense gradients, float32, stacked in tree order (the layout of the leaves)."""
    return jnp.stack([jnp.asarray(g_leaves[i], jnp.float32) for i in group])


# ----------------------------------------------------------------------------- re-encoding


def num_selected(n_groups: int, fraction: float) -> int:
    """Groups re-encoded per V step: ``ceil(fraction · n_groups)``, at least 1 (static)."""
    return max(1, min(n_groups, math.ceil(fraction * n_groups - 1e-9)))


def group_distances(q: Any, target: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Squared distance per group between ``target`` and ``q``'s decoding, each weight's
    term multiplied by ``weights`` when given: ``[n_groups]``."""
    diff = target.astype(jnp.float32) - q.decode_out_in(jnp.float32)
    sq = diff * diff if weights is None else weights.astype(jnp.float32) * diff * diff
    return reencoder_for(q).group_sums(q, sq)


def group_gains(q: Any, target: jax.Array, *, beam_size: int, weights: jax.Array | None = None) -> jax.Array:
    """How much re-encoding each group toward ``target`` would lower its squared error
    (each weight's term multiplied by ``weights`` when given): ``[n_groups]``, ≥ 0.

    The codes are those the type's ``reencode`` would pick from the current ones (a beam
    search, or rounding), so a group with a positive gain is one it would change.

    Raises:
        TypeError: the array type's ``Reencoder`` has no ``group_gains``.
    """
    gains = reencoder_for(q).group_gains
    if gains is None:
        raise TypeError(f"selection='gain': the Reencoder of {type(q).__name__} has no group_gains")
    return gains(q, target, beam_size=beam_size, weights=weights)


def num_groups(q: Any) -> int:
    """Number of code groups of a quantized array (tiles for AQLM, weights for scalar)."""
    return reencoder_for(q).num_groups(q)


def v_step_leaf(
    q: Any,
    buffer: jax.Array,
    *,
    mode: Mode,
    update_fraction: float,
    trust_ratio: float | None,
    beam_size: int,
    weights: jax.Array | None = None,
    force: bool = False,
    selection: Selection = "distance",
) -> Any:
    """One V step on one quantized array: select groups, re-encode them toward ``buffer``
    (distances and re-encoding error weighted per weight by ``weights`` when given; with
    ``force`` every selected group moves along ``buffer - Ŵ``, see ``Reencoder``).
    ``selection`` ranks the groups by ``group_distances`` or by ``group_gains``."""
    n = num_groups(q)
    if mode == "ste":
        idx = jnp.arange(n, dtype=jnp.int32)
        trust_ratio = None
    else:
        if selection == "gain":
            priority = group_gains(q, buffer, beam_size=beam_size, weights=weights)
        else:
            priority = group_distances(q, buffer, weights)
        # top_k: descending priority, so the trust region admits the highest first.
        _, idx = jax.lax.top_k(priority, num_selected(n, update_fraction))
        idx = idx.astype(jnp.int32)
    return reencoder_for(q).reencode(q, buffer, idx, beam_size=beam_size, trust_ratio=trust_ratio,
                                      weights=weights, force=force)


# ----------------------------------------------------------------------------- the transform


def _master(params: Any, continuous: Any) -> Any:
    """The float32 master copies the tuner keeps: of the continuous leaves stored in
    another dtype (float16 codebooks, say), from ``params``; ``None`` for float32 leaves,
    which are their own master (SmolLM2's float32 embedding: 113 MB not duplicated)."""
    return jax.tree.map(lambda p, c: None if c.dtype == jnp.float32 else jnp.array(p, jnp.float32), params, continuous)


def _with_master(master: Any, continuous: Any) -> Any:
    """The float32 continuous part: ``master`` where it holds a copy, the tree's leaf where not."""
    return jax.tree.map(lambda m, c: c if m is None else m, master, continuous, is_leaf=lambda x: x is None)


def _quantized_paths(qtree: Any) -> tuple[list[Any], Any, list[str]]:
    flat, treedef = flatten_by_path(qtree)
    return [leaf for _, leaf in flat], treedef, [path for path, _ in flat]


def _check_args(update_fraction: float, trust_ratio: float | None, every: int, beam_size: int, mode: str,
                buffer_decay: float, metric: str, force_update: bool, selection: str) -> None:
    if mode not in ("pv", "ste"):
        raise ValueError(f"mode={mode!r} must be 'pv' or 'ste'")
    if selection not in ("distance", "gain"):
        raise ValueError(f"selection={selection!r} must be 'distance' or 'gain'")
    if selection == "gain" and (mode != "pv" or force_update):
        raise ValueError(f"selection='gain' is a PV V step without force_update; got mode={mode!r}, "
                         f"force_update={force_update!r}")
    if metric not in ("euclidean", "adam"):
        raise ValueError(f"metric={metric!r} must be 'euclidean' or 'adam'")
    if force_update and mode != "pv":
        raise ValueError(f"force_update=True is a PV V step; mode={mode!r} re-encodes every group to its nearest codes")
    if force_update and metric != "euclidean":
        raise ValueError(f"force_update=True needs metric='euclidean', got metric={metric!r}")
    if isinstance(update_fraction, bool) or not 0.0 < float(update_fraction) <= 1.0:
        raise ValueError(f"update_fraction={update_fraction!r} must be in (0, 1]")
    if trust_ratio is not None and not float(trust_ratio) > 0.0:
        raise ValueError(f"trust_ratio={trust_ratio!r} must be positive or None")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every={every!r} must be an integer >= 1")
    if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size={beam_size!r} must be an integer >= 1")
    if not 0.0 <= float(buffer_decay) <= 1.0:
        raise ValueError(f"buffer_decay={buffer_decay!r} must be in [0, 1]")


def pv_tuning(
    p_optimizer: optax.GradientTransformation,
    v_optimizer: optax.GradientTransformation,
    *,
    update_fraction: float = 0.01,
    trust_ratio: float | None = None,
    every: int = 1,
    beam_size: int = 8,
    mode: Mode = "pv",
    buffer_decay: float = 0.0,
    metric: Metric = "euclidean",
    force_update: bool = False,
    selection: Selection = "distance",
) -> PVTuning:
    """PV-Tuning of a tree holding quantized arrays (see the module docstring).

    Args:
        p_optimizer: optax transform for the continuous part (P step), applied every step.
        v_optimizer: optax transform for the straight-through buffers, applied every step.
        update_fraction: fraction of each layer's groups re-encoded per V step ("pv").
        trust_ratio: optional per-layer bound on ``‖ΔŴ‖_F / ‖Ŵ‖_F`` per V step ("pv").
        every: run the V step (code re-encoding) every this many updates.
        beam_size: beam width of the re-encoding search (AQLM arrays).
        mode: ``"pv"`` (subspace V step) or ``"ste"`` (re-encode every group).
        buffer_decay: after each V step, pull the buffers toward the decoded weights:
            ``b ← Ŵ + (1 - buffer_decay)(b - Ŵ)`` (0 keeps them; 1 resets them, the
            paper's linearized V step). A buffer then holds a decaying sum of recent
            steps, so it needs a larger ``v_optimizer`` rate to reach a new codeword. On
            the quickstart model 0.1 at 5x the rate did best over 100 steps and worse
            over 400, where the extra code changes add up
            (``benchmarks/results/pv_vs_straight_through.md``).
        metric: the distance of the V step's selection and re-encoding. ``"euclidean"``
            is the paper's. ``"adam"`` weighs each weight by ``sqrt(ν)``, the second-moment
            estimate of an Adam-like ``v_optimizer`` (its state's unique ``nu``): the
            metric of the quadratic model Adam's own step minimises, so the codes
            approximate the buffer where the loss is sensitive. The trust ratio stays
            Euclidean. On the quickstart model it did worse than "euclidean"
            (``benchmarks/results/pv_vs_straight_through.md``: 400 steps, seed 0, 4.089
            and 4.093 against 4.081).
        force_update: every selected group moves one step along ``buffer - Ŵ`` even where
            its old codes are the closest to the buffer (the reference implementation's
            ``force_code_update``, meant for ``buffer_decay=1``: then the buffer holds only
            the last optimizer step, and ``update_fraction`` and ``trust_ratio`` set how
            many codes move per step). "pv" mode with the Euclidean metric only. On the
            quickstart model it did no better than the plain V step
            (``benchmarks/results/pv_vs_straight_through.md``: best on seed 0, then 4.103
            against 4.099 over 10 held-out seeds).

        selection: how "pv" picks the ``update_fraction`` of groups. ``"distance"`` (the
            paper's and the reference's): the groups whose buffer moved furthest from
            their decoded value. ``"gain"`` (not in the paper): the groups whose
            re-encoding would bring them closest to their buffer, i.e. the largest drop
            in the V step's error; it searches every group each V step (the cost of
            "ste"), and its selected groups all change unless the trust ratio stops them.
            On the quickstart model it did the same as "distance"
            (``benchmarks/results/pv_vs_straight_through.md``: 1×4 g2, 4.0990 against
            4.0995 over 10 held-out seeds).

    Returns:
        A ``PVTuning`` ``(init, update)`` pair of pure, jit-compatible functions.

    Example:
        >>> tuner = pv_tuning(optax.adam(1e-4), optax.adam(1e-4), update_fraction=0.01)
        >>> state = tuner.init(qparams)
        >>> loss, grads = decoded_value_and_grad(loss_fn)(qparams, batch)
        >>> qparams, state = tuner.update(grads, state, qparams)
    """
    _check_args(update_fraction, trust_ratio, every, beam_size, mode, buffer_decay, metric, force_update, selection)

    def v_weights(v_state: Any, buffers: dict[str, jax.Array]) -> dict[str, jax.Array | None]:
        """Per-weight metric of the V step for every buffer (None: Euclidean)."""
        if metric == "euclidean":
            return dict.fromkeys(buffers)
        try:
            nu = optax.tree_utils.tree_get(v_state, "nu")
        except KeyError as e:  # several states named nu (a chain of Adams)
            raise ValueError(f"pv_tuning(metric='adam'): v_optimizer's state has several 'nu': {e}") from e
        if not isinstance(nu, dict) or set(nu) != set(buffers):
            raise ValueError("pv_tuning(metric='adam'): v_optimizer's state has no second moment 'nu' over "
                             f"the buffers (got {type(nu).__name__}); use an Adam-like v_optimizer")
        return {p: jnp.sqrt(nu[p].astype(jnp.float32)) for p in buffers}

    def init(qtree: Any) -> PVState:
        leaves, _, paths = _quantized_paths(qtree)
        groups = _quantized_groups(leaves, paths)
        if not groups:
            raise ValueError("pv_tuning: the tree holds no quantized arrays")
        for i in (i for group in groups for i in group):
            try:
                reencoder_for(leaves[i])
            except TypeError as e:
                raise TypeError(f"pv_tuning: {e} (at {paths[i]})") from None
        continuous, _ = split(qtree)
        master = _master(continuous, continuous)
        buffers = {paths[group[0]]: jnp.stack([leaves[i].decode(jnp.float32) for i in group]) for group in groups}
        v_state = v_optimizer.init(buffers)
        v_weights(v_state, buffers)  # a v_optimizer without the metric fails here, not mid-jit
        return PVState(
            count=jnp.zeros((), jnp.int32),
            master=master,
            p_state=p_optimizer.init(_with_master(master, continuous)),
            buffers=buffers,
            v_state=v_state,
        )

    def update(grads: Any, state: PVState, qtree: Any) -> tuple[Any, PVState]:
        leaves, treedef, paths = _quantized_paths(qtree)
        try:
            g_leaves = treedef.flatten_up_to(grads)
        except (ValueError, TypeError) as e:
            raise ValueError(
                "pv_tuning.update: grads must have the structure of dequantize(qtree) "
                f"(use decoded_value_and_grad): {e}"
            ) from e
        groups = _quantized_groups(leaves, paths)
        keys = [paths[group[0]] for group in groups]
        if set(keys) != set(state.buffers):
            raise ValueError(f"pv_tuning.update: the tree's quantized layers group as {keys}, the state's buffers "
                             f"as {list(state.buffers)} (a state from another tree?)")

        # One stacked dense gradient per group serves the P step's pull-back and the buffers.
        stacked_grads = [_stacked_grads(g_leaves, group) for group in groups]

        # P step: optax on the float32 master copy of the continuous part.
        p_grads = jax.tree_util.tree_unflatten(treedef, _pulled_back(leaves, g_leaves, groups, stacked_grads))
        p_grads = jax.tree.map(lambda g: g.astype(jnp.float32), p_grads)
        # optax's bias corrections mix Python floats with int32 counts, which strict dtype
        # promotion rejects; the user's optimizers run under standard promotion.
        continuous, discrete = split(qtree)
        params = _with_master(state.master, continuous)
        with jax.numpy_dtype_promotion("standard"):
            p_updates, p_state = p_optimizer.update(p_grads, state.p_state, params)
        params = optax.apply_updates(params, p_updates)
        master = _master(params, continuous)
        continuous = jax.tree.map(lambda m, c: m.astype(c.dtype), params, continuous)
        qtree = merge(continuous, discrete)
        leaves = jax.tree_util.tree_leaves(qtree, is_leaf=is_quantized)

        # Straight-through buffers follow the dense gradient every step.
        v_grads = dict(zip(keys, stacked_grads, strict=True))
        with jax.numpy_dtype_promotion("standard"):
            v_updates, v_state = v_optimizer.update(v_grads, state.v_state, state.buffers)
        buffers = optax.apply_updates(state.buffers, v_updates)

        # V step: re-encode codes toward the buffers every `every` updates.
        stacked = {key: stack([leaves[i] for i in group]) for key, group in zip(keys, groups, strict=True)}

        def v_step(args: tuple[dict[str, Any], dict[str, jax.Array]]) -> tuple[dict[str, Any], dict[str, jax.Array]]:
            qs, bufs = args
            weights = v_weights(v_state, bufs)  # inside the cond: no work on steps without a V step
            def one(q: Any, buf: jax.Array, w: jax.Array | None) -> Any:
                if q.layout == "in_out":  # v_step_leaf works in storage layout
                    buf, w = buf.T, None if w is None else w.T
                return v_step_leaf(q, buf, mode=mode, update_fraction=update_fraction, trust_ratio=trust_ratio,
                                   beam_size=beam_size, weights=w, force=force_update, selection=selection)

            new_qs = dict(zip(keys, map_stacked(one, [(qs[k], bufs[k], weights[k]) for k in keys]), strict=True))
            if buffer_decay:
                keep = jnp.float32(1.0 - buffer_decay)
                decode = jax.vmap(lambda q: q.decode(jnp.float32))
                bufs = {k: (dec := decode(new_qs[k])) + keep * (bufs[k] - dec) for k in bufs}
            return new_qs, bufs

        do_v = (state.count + 1) % every == 0
        stacked, buffers = jax.lax.cond(do_v, v_step, lambda a: a, (stacked, buffers))
        out = list(leaves)
        for key, group in zip(keys, groups, strict=True):
            for i, q in zip(group, unstack(stacked[key], len(group)), strict=True):
                out[i] = q
        new_state = PVState(count=state.count + 1, master=master, p_state=p_state, buffers=buffers, v_state=v_state)
        return jax.tree_util.tree_unflatten(treedef, out), new_state

    return PVTuning(init=init, update=update)


__all__ = [
    "PVState",
    "PVTuning",
    "adam",
    "continuous_grads",
    "decoded_value_and_grad",
    "group_distances",
    "group_gains",
    "num_groups",
    "num_selected",
    "pv_tuning",
    "v_step_leaf",
]
