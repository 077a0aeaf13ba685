"""Recipes by name (``gptq-3``, ``aqlm-2x8``, ...) and from JSON/TOML recipe files.

Names follow one grammar, so every common case has a name without a table to keep in
step with the recipe classes:

* ``rtn-{bits}[-g{group}]`` and ``gptq-{bits}[-g{group}]``: scalar quantization, groups
  of 128 input columns unless ``-g`` says otherwise (``-grow``: one group per row); when
  the layers' input widths are known and 128 does not divide them all, the largest power
  of two that does (64 for SmolLM2's widths 576 and 1536);
* ``aqlm-{M}x{B}[-g{group}]``: ``M`` codebooks of ``2**B`` codewords over groups of 8
  input columns unless ``-g`` says otherwise (``aqlm-2x8`` and ``aqlm-1x16`` are the
  paper's 2-bit configurations; ``aqlm-1x8-g4`` is 2 code bits with a tiny codebook);
* ``spqr-{bits}[-g{group}]``, ``vptq-{v}x{B}[r{R}]``, ``kashin-{u bits}-{v bits}`` and
  ``pvq-{group}x{pulses}[a{amplitude bits}]`` (PVQ rotates by default).

Any name but Kashin's may end in ``-rot`` (quantize in a random Hadamard-rotated basis, see
``jaxquant.rotations``) or ``-rot-dct`` / ``-rot-orthogonal``: ``gptq-3-g64-rot``.

A recipe file (``.json`` or ``.toml``) holds one key, ``recipe``: a single recipe
(a table with ``method`` and fields, or a name), or a list of ``[pattern, recipe]``
pairs where the first pattern that matches a layer's path decides::

    {"recipe": [["attn", {"method": "gptq", "bits": 4}], ["mlp", "aqlm-2x8"]]}

    # TOML, the same thing
    [[recipe]]
    pattern = "attn"
    method = "gptq"
    bits = 4
    [[recipe]]
    pattern = "mlp"
    name = "aqlm-2x8"
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from collections.abc import Iterable
from typing import Any

from jaxquant import methods
from jaxquant.recipes import Recipe

RecipeSpec = Recipe | list[tuple[str, Recipe]]


def example_names() -> list[str]:
    """Recipe names of every registered method, for messages and help texts."""
    return [name for method in methods.registered() for name in method.examples]


def named_recipe(name: str, d_ins: Iterable[int] | None = None) -> Recipe:
    """The recipe a name stands for (see the module docstring for the grammar).

    Every registered method with a ``name_pattern`` is tried in registration order.

    Args:
        name: the recipe name.
        d_ins: the input widths of the layers it will quantize; a scalar name without
            ``-g`` then takes the largest group of at most 128 that divides them all.

    Raises:
        ValueError: no method knows the name, or its numbers are out of range (the
            message lists example names).
    """
    key = name.strip().lower()
    rotated = re.fullmatch(r"(.+?)-rot(?:-(\w+))?", key)
    if rotated:
        base, kind = rotated.groups()
        recipe = named_recipe(base, d_ins)
        if "rotate" not in {f.name for f in dataclasses.fields(recipe)}:
            raise ValueError(f"recipe name {name!r}: {type(recipe).__name__} recipes have no rotation "
                             "(drop the -rot suffix)")
        return dataclasses.replace(recipe, rotate=kind or "hadamard")
    for method in methods.registered():
        m = None if method.name_pattern is None else re.fullmatch(method.name_pattern, key)
        if m:
            return method.from_name(m, d_ins)
    raise ValueError(
        f"recipe name {name!r} is not known; names look like {', '.join(example_names())} "
        "(or pass a .json/.toml recipe file)"
    )


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Build a recipe from plain data, e.g. ``{"method": "gptq", "bits": 3}``.

    Raises:
        ValueError: unknown method.
        TypeError: unknown fields (all of them are named, with the allowed ones).
    """
    data = dict(data)
    cls = methods.method_named(str(data.pop("method", ""))).recipe_type
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise TypeError(f"unknown {cls.__name__} fields {unknown}; allowed: {sorted(allowed)}")
    return cls(**data)


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """Inverse of ``recipe_from_dict``."""
    return {"method": methods.method_of(recipe).family, **dataclasses.asdict(recipe)}


def _one(value: Any, where: str) -> Recipe:
    if isinstance(value, str):
        return named_recipe(value)
    if isinstance(value, dict):
        value = dict(value)
        if "name" in value:
            name = value.pop("name")
            if value:
                raise TypeError(f"{where}: a recipe given by name={name!r} takes no other fields, got {sorted(value)}")
            return named_recipe(name)
        return recipe_from_dict(value)
    raise TypeError(f"{where}: a recipe must be a name or a table with 'method', got {type(value).__name__}")


def parse_recipe(data: Any, where: str = "recipe") -> RecipeSpec:
    """Build a recipe (or ``[(pattern, recipe)]`` list) from plain data.

    Accepts a name, a ``{"method": ...}`` table, a list of ``[pattern, recipe]`` pairs,
    or a list of tables each with a ``pattern`` key.

    Raises:
        ValueError / TypeError: naming the entry that is wrong.
    """
    if isinstance(data, str | dict):
        return _one(data, where)
    if not isinstance(data, list) or not data:
        raise TypeError(f"{where} must be a name, a table, or a non-empty list of [pattern, recipe] pairs")
    out: list[tuple[str, Recipe]] = []
    for i, entry in enumerate(data):
        at = f"{where}[{i}]"
        if isinstance(entry, dict):
            entry = dict(entry)
            if "pattern" not in entry:
                raise TypeError(f"{at}: a table in a recipe list needs a 'pattern' key")
            pattern = entry.pop("pattern")
            recipe = _one(entry, at)
        elif isinstance(entry, list | tuple) and len(entry) == 2:
            pattern, recipe = entry[0], _one(entry[1], at)
        else:
            raise TypeError(f"{at} must be [pattern, recipe] or a table with 'pattern', got {entry!r}")
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"{at}: pattern must be a non-empty string, got {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"{at}: pattern {pattern!r} is not a valid regular expression ({e})") from None
        out.append((pattern, recipe))
    return out


def load_recipe_file(path: str | os.PathLike) -> RecipeSpec:
    """Read a ``.json`` or ``.toml`` recipe file (see the module docstring).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unknown extension, unparsable file, or no ``recipe`` key.
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".json", ".toml"):
        raise ValueError(f"recipe file {path!r} must end in .json or .toml")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        data = json.loads(raw) if ext == ".json" else tomllib.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"recipe file {path!r} is not valid {ext[1:].upper()}: {e}") from None
    if not isinstance(data, dict) or "recipe" not in data:
        raise ValueError(f"recipe file {path!r} must hold a top-level 'recipe' key")
    unknown = sorted(set(data) - {"recipe"})
    if unknown:
        raise ValueError(f"recipe file {path!r} has unknown top-level keys {unknown} (only 'recipe')")
    return parse_recipe(data["recipe"], where=f"{os.path.basename(path)}: recipe")


def resolve_recipe_arg(value: str, d_ins: Iterable[int] | None = None) -> RecipeSpec:
    """A ``--recipe`` argument: a recipe file if it names an existing file, else a name
    (fitted to the layers' input widths ``d_ins`` when given, see ``named_recipe``)."""
    if os.path.isfile(value) or value.lower().endswith((".json", ".toml")):
        return load_recipe_file(value)
    return named_recipe(value, d_ins)


def recipe_spec_to_data(spec: Any) -> Any:
    """Plain (JSON) data for a recipe or a ``[(pattern, recipe)]`` list / ``{pattern: recipe}`` map."""
    if isinstance(spec, dict):
        spec = list(spec.items())
    if isinstance(spec, list | tuple):
        return [[pattern, recipe_to_dict(r)] for pattern, r in spec]
    return recipe_to_dict(spec)


__all__ = [
    "example_names",
    "RecipeSpec",
    "load_recipe_file",
    "named_recipe",
    "recipe_from_dict",
    "recipe_to_dict",
    "parse_recipe",
    "recipe_spec_to_data",
    "resolve_recipe_arg",
]
