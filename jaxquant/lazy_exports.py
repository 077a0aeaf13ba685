"""Package attributes imported on first use (PEP 562).

A package's ``__init__`` names what it exports and from where; nothing is imported until
an attribute is read. So ``import jaxquant.cli`` and ``jaxquant --help`` do not load JAX,
Flax and orbax (seconds), while ``jaxquant.quantize`` and ``from jaxquant.pipeline import
quantize_model`` work as with eager imports.
"""

from __future__ import annotations

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


def install_lazy_exports(package: str, exports: dict[str, str]) -> None:
    """Make ``package`` import its exports on first use.

    Args:
        package: the package's ``__name__`` (call this from its ``__init__``).
        exports: ``{name: "module"}`` for a submodule, ``{name: "module:attribute"}`` for
            an attribute of a module.
    """
    module = sys.modules[package]
    module.__dict__["_lazy_exports"] = dict(exports)
    module.__class__ = _LazyPackage


__all__ = ["install_lazy_exports"]
