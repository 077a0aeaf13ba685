"""Build a C++ source into a shared library at first use and register its XLA FFI targets.

jaxquant's native CPU kernels (the lookup-table product behind ``ops/cpu_ffi.py``, the
AQLM beam search, k-means and codebook gradients behind ``methods/aqlm/native_*.py``) are
C++ files in ``jaxquant/ops/_native/`` with one shared header (``jaxquant_ffi.h``: the FFI
preamble and a block-parallel loop). Each is compiled once with the machine's C++ compiler
(``-O3 -march=native``) into the user cache directory: one file per source, compiler,
flags, jaxlib version and CPU, built under a temporary name and renamed, so concurrent
builders never load a half-written file. The library is loaded with ``ctypes`` and its
handlers registered with ``jax.ffi.register_ffi_target``. The CUDA source (``aq_lut_cuda.cu``)
takes the same path with ``nvcc``, for the first GPU's compute capability, registered for
the ``CUDA`` platform. When no compiler is found or the build fails the library reports
itself unavailable (with the reason) and callers fall back to their XLA or Pallas paths.
``JAXQUANT_NO_FFI=1`` disables every native kernel.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import jax

FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
CUDA_FLAGS = ("-O3", "-std=c++17", "--shared", "-Xcompiler", "-fPIC")

# The kernels' sources (.cc, .cu) and their shared header, shipped as package data.
SOURCE_DIR = Path(__file__).parent / "ops" / "_native"


def _source_key_text(source_file: str) -> str:
    """The source and every header beside it: what a build's result depends on."""
    headers = sorted(SOURCE_DIR.glob("*.h"))
    return "\0".join(p.read_text() for p in [SOURCE_DIR / source_file, *headers])


def cache_dir() -> Path:
    """Where built libraries are kept (``$XDG_CACHE_HOME/jaxquant/ffi``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxquant" / "ffi"


def _cpu_flags_line() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return ""


def cpu_flags() -> frozenset[str]:
    """The host CPU's feature flags from ``/proc/cpuinfo`` (empty where it is unreadable)."""
    line = _cpu_flags_line()
    return frozenset(line.split(":", 1)[1].split()) if ":" in line else frozenset()


def cpu_id() -> str:
    """A string that identifies this CPU model and its features (for caches)."""
    # -march=native code must not be reused on another CPU sharing the cache directory.
    return _cpu_flags_line() or platform.processor() + platform.machine()


def _cuda_arch() -> str:
    """``sm_XY`` of the first GPU (its compute capability), for nvcc's ``-arch``."""
    cc = str(getattr(jax.devices("gpu")[0], "compute_capability", ""))
    major, _, minor = cc.partition(".")
    if not (major.isdigit() and minor.isdigit()):
        raise RuntimeError(f"cannot read the GPU's compute capability (got {cc!r})")
    return f"sm_{major}{minor}"


def _toolchain(platform_name: str, cuda_arch: str | None) -> tuple[str, tuple[str, ...], str]:
    """(compiler, flags, machine id for the cache key) for ``cpu`` or ``CUDA``."""
    if platform_name == "CUDA":
        default = "/usr/local/cuda/bin/nvcc"  # CUDA's install path, often not on PATH
        nvcc = os.environ.get("NVCC") or shutil.which("nvcc") or (default if os.path.exists(default) else None)
        if nvcc is None:
            raise RuntimeError("no nvcc found (set NVCC)")
        arch = cuda_arch or _cuda_arch()
        return nvcc, (*CUDA_FLAGS, f"-arch={arch}"), arch
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    return cxx, FLAGS, cpu_id()


def build(name: str, source_file: str, platform_name: str = "cpu", cuda_arch: str | None = None) -> ctypes.CDLL:
    """Compile a source of ``jaxquant/ops/_native/`` (cached by its text and headers, flags,
    compiler, jaxlib and machine) and load it.

    Args:
        name: file name stem of the library.
        source_file: the C++ (``platform_name="cpu"``) or CUDA (``"CUDA"``) file's name.
        platform_name: ``"cpu"`` builds with the C++ compiler, ``"CUDA"`` with nvcc for
            the first GPU's compute capability.
        cuda_arch: nvcc ``-arch`` (``"sm_90"``) instead of the first GPU's; lets a
            machine without a GPU check that a CUDA source builds.

    Raises:
        RuntimeError: no compiler, or the compiler failed (its stderr tail included).
    """
    compiler, flags, machine = _toolchain(platform_name, cuda_arch)
    import jaxlib

    parts = [_source_key_text(source_file), *flags, compiler, jaxlib.__version__, machine]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    out = cache_dir() / f"{name}_{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            so = Path(tmp) / f"{name}.so"
            cmd = [compiler, *flags, f"-I{jax.ffi.include_dir()}", f"-I{SOURCE_DIR}", str(SOURCE_DIR / source_file),
                   "-o", str(so)]
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"compiling the FFI kernel {name} failed:\n{proc.stderr[-4000:]}")
            os.replace(so, out)  # atomic: a concurrent builder never sees a half-written file
    return ctypes.CDLL(str(out))


class NativeLibrary:
    """A native source with FFI handlers, built and registered on first ``available()``.

    Args:
        name: file name stem of the built library.
        source_file: the source's file name in ``jaxquant/ops/_native/``.
        targets: FFI target name -> exported handler symbol.
        platform: ``"cpu"`` (C++ source) or ``"CUDA"`` (CUDA source, built with nvcc).
    """

    def __init__(self, name: str, source_file: str, targets: dict[str, str], platform: str = "cpu") -> None:
        self.name = name
        self.platform = platform
        self.source_file = source_file
        self.targets = dict(targets)
        self.state: dict[str, Any] = {}
        self._lock = threading.Lock()

    def available(self) -> bool:
        """Build (once) and register the handlers; False when disabled or the build failed."""
        with self._lock:
            if "ok" not in self.state:
                if os.environ.get("JAXQUANT_NO_FFI", "") not in ("", "0"):
                    self.state.update(ok=False, error="disabled by JAXQUANT_NO_FFI")
                else:
                    try:
                        lib = build(self.name, self.source_file, self.platform)
                        for target, symbol in self.targets.items():
                            jax.ffi.register_ffi_target(
                                target, jax.ffi.pycapsule(getattr(lib, symbol)), platform=self.platform)
                        self.state.update(ok=True, lib=lib)
                    except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as e:
                        self.state.update(ok=False, error=str(e))
            return bool(self.state["ok"])

    def unavailable_reason(self) -> str | None:
        """Why ``available()`` is False (None when it is True or was not asked yet)."""
        return self.state.get("error")


def require_few_rows_kernel(library: NativeLibrary, label: str, rows: int, max_rows: int) -> None:
    """Check that ``library``'s CPU kernel can run a product with ``rows`` rows of ``x`` here.

    Raises:
        NotImplementedError: not on the CPU backend, more than ``max_rows`` rows, or the
            library could not be built (the reason is in the message, after ``label``).
    """
    if jax.default_backend() != "cpu":
        raise NotImplementedError(f"{label}: backend is not cpu")
    if rows > max_rows:
        raise NotImplementedError(f"{label}: {rows} rows > {max_rows}")
    if not library.available():
        raise NotImplementedError(f"{label}: unavailable ({library.unavailable_reason()})")
