"""Test configuration: 4 fake CPU devices, strict dtype promotion, float32 by default.

The device count must be fixed before JAX initialises its backends, so it is set at
import time of this conftest, before any test module imports jax.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
# One persistent compilation cache for the whole run: the xdist workers, the notebooks'
# kernels and the tests' subprocesses inherit it, so a program compiled once is loaded,
# not compiled again (the same programs recur across tests: 81 s -> 64 s on three files
# from a cold cache). A new empty directory per run; the process that made it removes it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="jaxquant-tests-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.05",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")

NUM_DEVICES = 4


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def pytest_sessionstart(session):  # noqa: ARG001
    assert jax.device_count() == NUM_DEVICES, f"expected {NUM_DEVICES} CPU devices, got {jax.devices()}"


def pytest_collection_modifyitems(session, config, items):  # noqa: ARG001
    """Start the longest items first: notebooks and tests marked ``slow``.

    With ``-n 2`` the two workers take items in collection order; a long item near the end
    leaves one worker idle while the other finishes it. Stable, so the order is the same in
    every worker, as xdist requires.
    """
    items.sort(key=lambda item: not (item.path.suffix == ".ipynb" or item.get_closest_marker("slow")))
