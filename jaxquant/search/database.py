"""The options a mixed-precision search chooses between: every selected layer quantized
at every *level* (a recipe applied to the whole model), with each option's honest bits.

A level is a parameter tree in which the same set of layers is quantized; levels may use
different methods (GPTQ at 2-4 bits, AQLM, PVQ, ...). An *assignment* picks one level per
layer: an integer array ``choice`` with ``choice[i]`` the level of ``layer_paths[i]``.
Its average bits per weight counts each option's stored bits (codes, codebooks, scales,
rotation signs), so a layer whose codebook is large for its size pays for it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.io import load
from jaxquant.qarray import QuantizedArray, flatten_by_path, is_quantized, replace_by_path


def _quantized_leaves(tree: Any) -> dict[str, QuantizedArray]:
    return {path: leaf for path, leaf in flatten_by_path(tree)[0] if is_quantized(leaf)}


@dataclasses.dataclass(frozen=True, eq=False)
class LevelDatabase:
    """Per-layer options, ``options[i][k]``: layer ``layer_paths[i]`` at level ``level_names[k]``.

    Attributes:
        level_names: one name per level (its recipe name, e.g. ``gptq-3-g64``).
        layer_paths: the layers every level quantizes, in tree order.
        options: the quantized arrays, ``[layer][level]``.
        errors: optional per-option error ``[layer, level]`` (e.g. each layer's relative
            output error on calibration data), used by error-based baselines.
    """

    level_names: tuple[str, ...]
    layer_paths: tuple[str, ...]
    options: tuple[tuple[QuantizedArray, ...], ...]
    errors: np.ndarray | None = None

    def __post_init__(self) -> None:
        if len(set(self.level_names)) != len(self.level_names):
            raise ValueError(f"level names must be unique, got {list(self.level_names)}")
        if len(self.options) != len(self.layer_paths):
            raise ValueError(f"options holds {len(self.options)} layers but layer_paths {len(self.layer_paths)}")
        for path, row in zip(self.layer_paths, self.options):
            if len(row) != len(self.level_names):
                raise ValueError(f"layer {path} has {len(row)} options, expected one per level ({len(self.level_names)})")
            shapes = {tuple(q.shape) for q in row}
            if len(shapes) != 1:
                raise ValueError(f"layer {path} has different shapes across levels: "
                                 + ", ".join(f"{n}: {tuple(q.shape)}" for n, q in zip(self.level_names, row)))
        if self.errors is not None and np.shape(self.errors) != (self.num_layers, self.num_levels):
            raise ValueError(f"errors has shape {np.shape(self.errors)}, expected ({self.num_layers}, {self.num_levels})")

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_trees(cls, trees: Mapping[str, Any], errors: np.ndarray | None = None) -> LevelDatabase:
        """A database from one quantized parameter tree per level (name -> tree).

        Raises:
            ValueError: no levels, a level that quantizes nothing, or levels that do not
                quantize the same layers (the differing paths are named).
        """
        if not trees:
            raise ValueError("a level database needs at least one level")
        leaves = {name: _quantized_leaves(tree) for name, tree in trees.items()}
        names = list(leaves)
        first = names[0]
        if not leaves[first]:
            raise ValueError(f"level {first!r} has no quantized layer")
        paths = list(leaves[first])
        for name in names[1:]:
            missing = sorted(set(paths) - set(leaves[name]))
            extra = sorted(set(leaves[name]) - set(paths))
            if missing or extra:
                raise ValueError(f"level {name!r} does not quantize the layers level {first!r} does: "
                                 f"missing {missing[:5]}, extra {extra[:5]}")
        options = tuple(tuple(leaves[name][p] for name in names) for p in paths)
        return cls(tuple(names), tuple(paths), options, None if errors is None else np.asarray(errors, np.float64))

    @classmethod
    def load(cls, checkpoints: Mapping[str, str | os.PathLike], errors: np.ndarray | None = None) -> LevelDatabase:
        """A database from one ``jaxquant.io`` checkpoint per level (name -> path).

        Only the quantized leaves of each checkpoint are kept.
        """
        return cls.from_trees({name: _quantized_leaves(load(path)) for name, path in checkpoints.items()}, errors)

    # ------------------------------------------------------------------ sizes and bits

    @property
    def num_layers(self) -> int:
        return len(self.layer_paths)

    @property
    def num_levels(self) -> int:
        return len(self.level_names)

    # Computed once: the search asks for them on every candidate.
    @functools.cached_property
    def sizes(self) -> np.ndarray:
        """Weights per layer, ``[layers]`` (int64)."""
        return np.array([row[0].d_out * row[0].d_in for row in self.options], np.int64)

    @functools.cached_property
    def bits(self) -> np.ndarray:
        """Stored bits of every option, ``[layers, levels]`` (float64)."""
        return np.array([[q.storage_bits for q in row] for row in self.options], np.float64)

    def check_choice(self, choice: Any) -> np.ndarray:
        """``choice`` as an int array, or a ``ValueError`` naming what is wrong with it."""
        arr = np.asarray(choice)
        if arr.shape != (self.num_layers,) or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"choice must be {self.num_layers} integer level indices, got shape {arr.shape} "
                             f"dtype {arr.dtype}")
        bad = np.flatnonzero((arr < 0) | (arr >= self.num_levels))
        if bad.size:
            raise ValueError(f"choice picks levels outside 0..{self.num_levels - 1}: "
                             + ", ".join(f"{self.layer_paths[i]}={int(arr[i])}" for i in bad[:5]))
        return arr.astype(np.int64)

    def average_bits(self, choice: Any) -> float:
        """Bits per weight of the assignment over the database's layers."""
        choice = self.check_choice(choice)
        return float(self.bits[np.arange(self.num_layers), choice].sum() / self.sizes.sum())

    def uniform(self, level: int | str) -> np.ndarray:
        """The assignment that puts every layer at one level (index or name)."""
        k = self.level_names.index(level) if isinstance(level, str) else int(level)
        if not 0 <= k < self.num_levels:
            raise ValueError(f"level {level!r} is not one of {list(self.level_names)}")
        return np.full(self.num_layers, k, np.int64)

    # ------------------------------------------------------------------ assembly

    def chosen(self, choice: Any) -> dict[str, QuantizedArray]:
        """``{layer path: quantized array}`` of an assignment."""
        choice = self.check_choice(choice)
        return {p: row[k] for p, row, k in zip(self.layer_paths, self.options, choice)}

    def assemble(self, base: Any, choice: Any) -> Any:
        """``base`` (e.g. the float model's parameters) with the chosen quantized arrays.

        Raises:
            ValueError: ``base`` lacks some of the database's layers.
        """
        new = self.chosen(choice)
        missing = sorted(set(new) - {p for p, _ in flatten_by_path(base)[0]})
        if missing:
            raise ValueError(f"the base tree has no leaves at {missing[:5]} (the database's layers)")
        return replace_by_path(base, new)

    def level_counts(self, choice: Any) -> dict[str, int]:
        """How many layers an assignment puts at each level."""
        choice = self.check_choice(choice)
        return {name: int((choice == k).sum()) for k, name in enumerate(self.level_names)}


class DecodedOptions:
    """Every option of a database decoded once to a dense array, for fast candidate swaps.

    Candidate trees built by ``tree`` share these arrays, so evaluating a new assignment
    copies nothing and a compiled forward pass takes it without recompiling (shapes and
    dtypes do not depend on the assignment).
    """

    def __init__(self, database: LevelDatabase, dtype: Any = jnp.float32) -> None:
        self.database = database
        self.arrays: list[list[jax.Array]] = [[jax.block_until_ready(q.decode(dtype)) for q in row]
                                              for row in database.options]

    def tree(self, base: Any, choice: Any) -> Any:
        """``base`` with each database layer replaced by its chosen option, decoded."""
        choice = self.database.check_choice(choice)
        return replace_by_path(base, {p: self.arrays[i][k]
                                      for i, (p, k) in enumerate(zip(self.database.layer_paths, choice))})


def level_errors(layer_records: Sequence[Mapping[str, Mapping[str, Any]]], paths: Sequence[str],
                 key: str = "rel_error") -> np.ndarray:
    """``[layers, levels]`` errors from per-level records ``{path: record}`` (``layers.jsonl`` rows).

    Raises:
        ValueError: a level has no record (or no ``key``) for some layer.
    """
    out = np.empty((len(paths), len(layer_records)), np.float64)
    for k, records in enumerate(layer_records):
        for i, p in enumerate(paths):
            value = records.get(p, {}).get(key)
            if value is None:
                raise ValueError(f"level {k} has no {key!r} for layer {p}")
            out[i, k] = float(value)
    return out


__all__ = ["DecodedOptions", "LevelDatabase", "level_errors"]
