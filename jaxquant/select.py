"""Choosing which leaves of a parameter tree to quantize, and with which recipe.

Leaves are addressed by a *path string*: the tree's key path joined with ``/``, e.g.
``params/Dense_0/kernel`` (Linen) or ``layers/0/mlp/up_proj/kernel`` (NNX state; the
trailing ``.value`` of an NNX ``Variable`` is dropped). Patterns are regular
expressions matched with ``re.search`` against that string.

A *selector* is a predicate ``(path, leaf) -> bool``, a pattern string, or a list of
either (any match selects). A *recipe map* assigns recipes by pattern, first match
wins, e.g. ``[("attn", GPTQ(bits=4)), ("mlp", GPTQ(bits=2))]``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxquant.qarray import flatten_by_path, is_quantized, path_to_str

Predicate = Callable[[str, Any], bool]
Selector = Predicate | str | Sequence[Predicate | str]

# Leaves that are never linear-layer kernels worth quantizing by default: token
# embeddings, norms, and the output head (its error goes straight into the logits).
_DEFAULT_EXCLUDE = re.compile(
    r"(embed|embedding|wte|wpe|norm|ln_|layernorm|lm_head|(^|/)head(/|$)|(^|/)output(/|$))",
    re.IGNORECASE,
)
_KERNEL_NAMES = ("kernel", "weight")


def linear_kernels(path: str, leaf: Any) -> bool:
    """Default selector: 2-D floating kernels of linear layers.

    Picks leaves named ``kernel`` or ``weight`` with two dimensions and a floating dtype,
    and skips embeddings, norms, biases and the output head.
    """
    if not hasattr(leaf, "ndim") or leaf.ndim != 2 or is_quantized(leaf):
        return False
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
        return False
    name = path.rsplit("/", 1)[-1]
    return name in _KERNEL_NAMES and not _DEFAULT_EXCLUDE.search(path)


def as_predicate(selector: Selector | None) -> Predicate:
    """Normalise a selector (predicate, pattern, list, or ``None`` = default)."""
    if selector is None:
        return linear_kernels
    if isinstance(selector, str):
        pattern = re.compile(selector)
        return lambda path, leaf: pattern.search(path) is not None
    if callable(selector):
        return selector
    parts = [as_predicate(s) for s in selector]
    return lambda path, leaf: any(p(path, leaf) for p in parts)


def matching(pattern: str) -> Predicate:
    """Predicate: the default linear-kernel selection restricted to paths matching ``pattern``."""
    compiled = re.compile(pattern)
    return lambda path, leaf: linear_kernels(path, leaf) and compiled.search(path) is not None


def flatten_with_paths(tree: Any) -> list[tuple[str, Any]]:
    """``[(path string, leaf)]`` for every leaf, treating quantized arrays as leaves."""
    return flatten_by_path(tree)[0]


def selected_paths(tree: Any, where: Selector | None = None) -> list[str]:
    """Path strings of the leaves ``where`` selects, in tree order."""
    pred = as_predicate(where)
    return [p for p, leaf in flatten_with_paths(tree) if pred(p, leaf)]


def resolve_recipes(
    tree: Any,
    recipe: Any,
    where: Selector | None = None,
) -> dict[str, Any]:
    """Assign a recipe to each selected leaf.

    Args:
        tree: parameter tree.
        recipe: one recipe for every selected leaf, or a sequence of ``(pattern,
            recipe)`` pairs / a dict ``{pattern: recipe}`` where the first pattern that
            matches a selected path decides.
        where: selector of candidate leaves (default: ``linear_kernels``).

    Returns:
        ``{path: recipe}`` for every selected leaf that some recipe covers.

    Raises:
        ValueError: a pattern of the recipe map matches no selected leaf, or nothing
            at all is selected.
    """
    paths = selected_paths(tree, where)
    if not paths:
        raise ValueError(
            "the selector matched no leaf of the tree; leaves are: "
            + ", ".join(p for p, _ in flatten_with_paths(tree)[:20])
        )
    if isinstance(recipe, dict | list | tuple) and not recipe:
        raise ValueError(f"recipe={recipe!r} is an empty recipe map; give a recipe or (pattern, recipe) pairs")
    if isinstance(recipe, dict):
        pairs = list(recipe.items())
    elif isinstance(recipe, list | tuple):
        bad = [item for item in recipe if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str))]
        if bad:
            raise TypeError(f"recipe map entries must be (pattern, recipe) pairs, got {bad[:3]}")
        pairs = list(recipe)
    else:
        return {p: recipe for p in paths}
    compiled = [(re.compile(pat), pat, r) for pat, r in pairs]
    out: dict[str, Any] = {}
    used: set[str] = set()
    for p in paths:
        for regex, pat, r in compiled:
            if regex.search(p):
                out[p] = r
                used.add(pat)
                break
    unused = [pat for _, pat, _ in compiled if pat not in used]
    if unused:
        raise ValueError(
            f"recipe patterns {unused} match no selected leaf; selected leaves: {paths[:20]}"
        )
    return out
