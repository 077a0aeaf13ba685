"""Native kernels live in jaxquant/ops/_native/ as C++/CUDA files, never in Python strings."""

from __future__ import annotations

import pathlib
import re

import jaxquant
from jaxquant.methods.aqlm import native_grads, native_kernels
from jaxquant.native_build import SOURCE_DIR
from jaxquant.ops import cpu_ffi, cuda_ffi

PACKAGE = pathlib.Path(jaxquant.__file__).parent
# Lines only C++ or CUDA source has.
_NATIVE_LINE = re.compile(r"^\s*(#include\s*[<\"]|__global__\s|template\s*<|namespace\s+\w+\s*=|XLA_FFI_DEFINE)", re.M)


def test_no_python_file_holds_native_source():
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if _NATIVE_LINE.search(p.read_text())]
    assert offenders == []


def test_every_library_names_a_shipped_source():
    for module in (cpu_ffi, cuda_ffi, native_kernels, native_grads):
        path = SOURCE_DIR / module.SOURCE_FILE
        assert path.is_file() and module.LIBRARY.source_file == module.SOURCE_FILE
        assert "XLA_FFI_DEFINE_HANDLER" in path.read_text()
    # The CPU sources share one header for the FFI preamble and the block-parallel loop.
    for module in (cpu_ffi, native_kernels, native_grads):
        text = (SOURCE_DIR / module.SOURCE_FILE).read_text()
        assert '#include "jaxquant_ffi.h"' in text and "namespace ffi = xla::ffi;" not in text
