"""Package attributes imported on first use (PEP 562).

A package's ``__init__`` lists what it exports once, as the imports in its
``if TYPE_CHECKING:`` block, and calls ``install_lazy_exports(__name__)``. Type checkers
and IDEs read that block; at run time nothing in it is imported until an attribute is
read. So ``import jaxquant.cli`` and ``jaxquant --help`` do not load JAX, Flax and orbax
(seconds), while ``jaxquant.quantize`` and ``from jaxquant.pipeline import
quantize_model`` work as with eager imports.
"""

from __future__ import annotations

import ast
import importlib
import sys
import types
from typing import Any


class _LazyPackage(types.ModuleType):
    _lazy_exports: dict[str, str]

    def __getattr__(self, name: str) -> Any:  # only for names not yet in the namespace
        exports = self.__dict__.get("_lazy_exports", {})
        if name not in exports:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        module_name, _, attribute = exports[name].partition(":")
        module = importlib.import_module(module_name)
        value = getattr(module, attribute) if attribute else module
        self.__dict__[name] = value  # later reads find it without coming here
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        # Importing the submodule ``jaxquant.quantize`` binds it on the package, where it
        # would hide the function ``jaxquant.quantize``; the export keeps the name.
        target = self.__dict__.get("_lazy_exports", {}).get(name, "")
        if isinstance(value, types.ModuleType) and ":" in target:
            return
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(self.__dict__.get("_lazy_exports", {})) | set(self.__dict__))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def exports_of(package: str, source: str) -> dict[str, str]:
    """The exports that ``source``'s top-level ``if TYPE_CHECKING:`` imports declare.

    ``from package import sub`` exports the submodule ``package.sub``; ``from module import
    name [as alias]`` exports ``module``'s attribute ``name`` as ``alias``.

    Returns:
        ``{name: "module"}`` for a submodule, ``{name: "module:attribute"}`` for an
        attribute of a module.

    Raises:
        ValueError: no such block, or a statement in it that is not ``from ... import``.
    """
    exports: dict[str, str] = {}
    blocks = [n for n in ast.parse(source).body if isinstance(n, ast.If) and _is_type_checking(n.test)]
    if not blocks:
        raise ValueError(f"{package}: no top-level 'if TYPE_CHECKING:' block lists its exports")
    for statement in (s for block in blocks for s in block.body):
        if not isinstance(statement, ast.ImportFrom) or statement.level or statement.module is None:
            raise ValueError(
                f"{package}: line {statement.lineno} of the TYPE_CHECKING block is not an absolute 'from ... import'"
            )
        for alias in statement.names:
            name = alias.asname or alias.name
            if statement.module == package:
                exports[name] = f"{package}.{alias.name}"
            else:
                exports[name] = f"{statement.module}:{alias.name}"
    return exports


def install_lazy_exports(package: str) -> list[str]:
    """Make ``package`` import the names of its ``if TYPE_CHECKING:`` block on first use.

    Args:
        package: the package's ``__name__`` (call this from its ``__init__``).

    Returns:
        The exported names, sorted (the package's ``__all__``).
    """
    module = sys.modules[package]
    source = module.__spec__.loader.get_source(package)
    exports = exports_of(package, source)
    module.__dict__["_lazy_exports"] = exports
    module.__class__ = _LazyPackage
    return sorted(exports)


__all__ = ["exports_of", "install_lazy_exports"]
