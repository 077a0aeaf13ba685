"""The package's names are imported on first use and keep their meaning in any import order."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

import jaxquant as jq
from jaxquant.lazy_exports import exports_of


def test_a_submodule_import_does_not_hide_the_function_of_its_name():
    # In a fresh interpreter the submodules load first, then the names are read.
    code = ("import jaxquant.quantize, jaxquant.calibrate, jaxquant.pipeline.run, jaxquant as jq, types; "
            "from jaxquant.pipeline import quantize_model; "
            "print(type(jq.quantize).__name__, type(jq.calibrate).__name__, isinstance(jq.pipeline, types.ModuleType), "
            "quantize_model.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["function", "function", "True", "jaxquant.pipeline.run"]


def test_exports_and_errors():
    assert isinstance(jq.io, types.ModuleType) and callable(jq.store_embeddings)
    assert {"quantize", "tree_bits", "AQLM", "io", "LayerStats"} <= set(dir(jq)) and set(jq.__all__) <= set(dir(jq))
    with pytest.raises(AttributeError, match="module 'jaxquant' has no attribute 'nonsense'"):
        jq.nonsense  # noqa: B018


def test_exports_are_read_from_the_type_checking_block():
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from pkg import sub\n"
        "    from pkg.mod import f, g as h\n"
    )
    assert exports_of("pkg", source) == {"sub": "pkg.sub", "f": "pkg.mod:f", "h": "pkg.mod:g"}
    with pytest.raises(ValueError, match="pkg: no top-level 'if TYPE_CHECKING:' block"):
        exports_of("pkg", "x = 1\n")
    with pytest.raises(ValueError, match="pkg: line 3 of the TYPE_CHECKING block"):
        exports_of("pkg", "import typing\nif typing.TYPE_CHECKING:\n    import os\n")
