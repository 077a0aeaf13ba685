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
  for buffers reset every step).

``VStep(mode="ste")`` is the straight-through baseline with the same object: each V
step re-encodes *every* group from its buffer (no subspace selection, no trust ratio).

The pieces compose on their own as well: ``continuous_grads`` gives the P step's
gradients for any optax loop over ``split(qtree)[0]``, ``straight_through_buffers``
starts the buffers, and ``v_step(qtree, buffers, VStep(...))`` is the V step as a pure
function. ``pv_tuning`` puts them together with a float32 master copy (below).

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

import dataclasses
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
from jaxquant.validate import require_positive_int

Mode = Literal["pv", "ste"]


@dataclasses.dataclass(frozen=True)
class VStep:
    """Settings of the V step (code re-encoding), validated on construction.

    Attributes:
        mode: ``"pv"`` re-encodes the ``update_fraction`` of each layer's groups whose
            buffer moved furthest from their decoded value (the paper's subspace V step);
            ``"ste"`` re-encodes every group (the straight-through baseline; no trust
            ratio, no forced moves).
        update_fraction: fraction of each layer's groups re-encoded per V step ("pv").
        trust_ratio: optional per-layer bound on ``‖ΔŴ‖_F / ‖Ŵ‖_F`` per V step ("pv").
        beam_size: beam width of the re-encoding search (AQLM arrays).
        force_update: every selected group moves one step along ``buffer - Ŵ`` even where
            its old codes are the closest to the buffer (the reference implementation's
            ``force_code_update``, meant for ``buffer_decay=1``: the buffer then holds only
            the last optimizer step, and ``update_fraction`` and ``trust_ratio`` set how
            many codes move per step). "pv" only.
        buffer_decay: after each V step, pull the buffers toward the decoded weights:
            ``b ← Ŵ + (1 - buffer_decay)(b - Ŵ)`` (0 keeps them; 1 resets them, the
            paper's linearized V step). A buffer then holds a decaying sum of recent
            steps, so it needs a larger buffer learning rate to reach a new codeword.
    """

    mode: Mode = "pv"
    update_fraction: float = 0.01
    trust_ratio: float | None = None
    beam_size: int = 8
    force_update: bool = False
    buffer_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in ("pv", "ste"):
            raise ValueError(f"mode={self.mode!r} must be 'pv' or 'ste'")
        if self.force_update and self.mode != "pv":
            raise ValueError(f"force_update=True is a PV V step; mode={self.mode!r} re-encodes every group to "
                             "its nearest codes")
        if isinstance(self.update_fraction, bool) or not 0.0 < float(self.update_fraction) <= 1.0:
            raise ValueError(f"update_fraction={self.update_fraction!r} must be in (0, 1]")
        if self.trust_ratio is not None and not float(self.trust_ratio) > 0.0:
            raise ValueError(f"trust_ratio={self.trust_ratio!r} must be positive or None")
        require_positive_int("beam_size", self.beam_size)
        if not 0.0 <= float(self.buffer_decay) <= 1.0:
            raise ValueError(f"buffer_decay={self.buffer_decay!r} must be in [0, 1]")


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
    copy of every weight for the straight-through buffers.

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


def group_distances(q: Any, target: jax.Array) -> jax.Array:
    """Squared distance per group between ``target`` and ``q``'s decoding: ``[n_groups]``."""
    return reencoder_for(q).group_distances(q, target)


def num_groups(q: Any) -> int:
    """Number of code groups of a quantized array (tiles for AQLM, weights for scalar)."""
    return reencoder_for(q).num_groups(q)


def v_step_leaf(q: Any, buffer: jax.Array, config: VStep) -> Any:
    """The V step on one quantized array: select groups (all of them for "ste"), re-encode
    them toward ``buffer`` (``(d_out, d_in)``, storage layout)."""
    n = num_groups(q)
    trust_ratio = config.trust_ratio
    if config.mode == "ste":
        idx = jnp.arange(n, dtype=jnp.int32)
        trust_ratio = None
    else:
        # top_k: descending distance, so the trust region admits the furthest first.
        _, idx = jax.lax.top_k(group_distances(q, buffer), num_selected(n, config.update_fraction))
        idx = idx.astype(jnp.int32)
    return reencoder_for(q).reencode(q, buffer, idx, beam_size=config.beam_size, trust_ratio=trust_ratio,
                                      force=config.force_update)


def v_step(qtree: Any, buffers: dict[str, jax.Array], config: VStep) -> tuple[Any, dict[str, jax.Array]]:
    """The V step over a tree: a pure function of its quantized arrays and their buffers.

    Only codes change (the continuous part is read to decode). With ``buffer_decay`` the
    buffers are pulled toward the new decoded weights.

    Args:
        qtree: a tree holding quantized arrays.
        buffers: ``{path: (n, *shape) float32}`` straight-through buffers, grouped by kind
            as ``PVState.buffers`` holds them (``straight_through_buffers`` makes them).
        config: the V step's settings.

    Returns:
        ``(qtree with new codes, buffers)``.
    """
    leaves, treedef, groups, keys = _grouped(qtree, buffers, "v_step")

    def one(q: Any, buf: jax.Array) -> Any:
        return v_step_leaf(q, buf.T if q.layout == "in_out" else buf, config)  # storage layout

    stacked = [stack([leaves[i] for i in group]) for group in groups]
    new = map_stacked(one, [(q, buffers[k]) for q, k in zip(stacked, keys, strict=True)])
    out = list(leaves)
    for group, q in zip(groups, new, strict=True):
        for i, q_i in zip(group, unstack(q, len(group)), strict=True):
            out[i] = q_i
    if config.buffer_decay:
        keep = jnp.float32(1.0 - config.buffer_decay)
        decode = jax.vmap(lambda q: q.decode(jnp.float32))
        buffers = {k: (dec := decode(q)) + keep * (buffers[k] - dec) for k, q in zip(keys, new, strict=True)}
    return jax.tree_util.tree_unflatten(treedef, out), buffers


def _grouped(qtree: Any, buffers: dict[str, jax.Array], who: str) -> tuple[list[Any], Any, list[list[int]], list[str]]:
    """``(leaves, treedef, groups, keys)`` of ``qtree``'s quantized leaves grouped by kind,
    ``keys`` naming each group as its buffer does.

    Raises:
        ValueError: the groups are not the buffers' (buffers made for another tree).
    """
    leaves, treedef, paths = _quantized_paths(qtree)
    groups = _quantized_groups(leaves, paths)
    keys = [paths[group[0]] for group in groups]
    if set(keys) != set(buffers):
        raise ValueError(f"{who}: the tree's quantized layers group as {keys}, the buffers as {list(buffers)} "
                         "(buffers made for another tree?)")
    return leaves, treedef, groups, keys


def straight_through_buffers(qtree: Any) -> dict[str, jax.Array]:
    """The straight-through buffers of a tree: each quantized array's decoding, float32,
    stacked by kind of layer under the path of the first of them (``PVState.buffers``)."""
    leaves, _, paths = _quantized_paths(qtree)
    groups = _quantized_groups(leaves, paths)
    if not groups:
        raise ValueError("pv_tuning: the tree holds no quantized arrays")
    for i in (i for group in groups for i in group):
        try:
            reencoder_for(leaves[i])
        except TypeError as e:
            raise TypeError(f"pv_tuning: {e} (at {paths[i]})") from None
    return {paths[group[0]]: jnp.stack([leaves[i].decode(jnp.float32) for i in group]) for group in groups}


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


def pv_tuning(
    p_optimizer: optax.GradientTransformation,
    v_optimizer: optax.GradientTransformation,
    v_step_config: VStep = VStep(),
    *,
    every: int = 1,
) -> PVTuning:
    """PV-Tuning of a tree holding quantized arrays (see the module docstring).

    The P step is ``p_optimizer`` over the continuous part, so anything optax offers
    wraps it as usual (``optax.chain``, schedules, ``optax.MultiSteps``,
    ``optax.apply_if_finite``). The buffers follow ``v_optimizer``; the V step is
    ``v_step`` with ``v_step_config``, every ``every`` updates.

    Args:
        p_optimizer: optax transform for the continuous part (P step), applied every step.
        v_optimizer: optax transform for the straight-through buffers, applied every step.
        v_step_config: the V step's settings.
        every: run the V step (code re-encoding) every this many updates.

    Returns:
        A ``PVTuning`` ``(init, update)`` pair of pure, jit-compatible functions.

    Example:
        >>> tuner = pv_tuning(optax.adam(1e-4), optax.adam(1e-4), VStep(update_fraction=0.01))
        >>> state = tuner.init(qparams)
        >>> loss, grads = decoded_value_and_grad(loss_fn)(qparams, batch)
        >>> qparams, state = tuner.update(grads, state, qparams)
    """
    if not isinstance(v_step_config, VStep):
        raise TypeError(f"pv_tuning: v_step_config must be a VStep, got {type(v_step_config).__name__}")
    require_positive_int("every", every)

    def init(qtree: Any) -> PVState:
        buffers = straight_through_buffers(qtree)
        continuous, _ = split(qtree)
        master = _master(continuous, continuous)
        return PVState(
            count=jnp.zeros((), jnp.int32),
            master=master,
            p_state=p_optimizer.init(_with_master(master, continuous)),
            buffers=buffers,
            v_state=v_optimizer.init(buffers),
        )

    def update(grads: Any, state: PVState, qtree: Any) -> tuple[Any, PVState]:
        leaves, treedef, groups, keys = _grouped(qtree, state.buffers, "pv_tuning.update")
        try:
            g_leaves = treedef.flatten_up_to(grads)
        except (ValueError, TypeError) as e:
            raise ValueError(
                "pv_tuning.update: grads must have the structure of dequantize(qtree) "
                f"(use decoded_value_and_grad): {e}"
            ) from e

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

        # Straight-through buffers follow the dense gradient every step.
        v_grads = dict(zip(keys, stacked_grads, strict=True))
        with jax.numpy_dtype_promotion("standard"):
            v_updates, v_state = v_optimizer.update(v_grads, state.v_state, state.buffers)
        buffers = optax.apply_updates(state.buffers, v_updates)

        # V step: re-encode codes toward the buffers every `every` updates.
        do_v = (state.count + 1) % every == 0
        qtree, buffers = jax.lax.cond(do_v, lambda a: v_step(*a, v_step_config), lambda a: a, (qtree, buffers))
        new_state = PVState(count=state.count + 1, master=master, p_state=p_state, buffers=buffers, v_state=v_state)
        return qtree, new_state

    return PVTuning(init=init, update=update)


__all__ = [
    "PVState",
    "PVTuning",
    "adam",
    "continuous_grads",
    "decoded_value_and_grad",
    "VStep",
    "group_distances",
    "num_groups",
    "num_selected",
    "pv_tuning",
    "straight_through_buffers",
    "v_step",
    "v_step_leaf",
]
