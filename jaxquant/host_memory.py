"""This process's resident memory: its peak so far, and giving freed heap back to the system."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import resource


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if platform.system() == "Darwin" else peak / 2**10


def release_freed_memory() -> None:
    """Return freed heap pages to the system (glibc's ``malloc_trim``; elsewhere nothing).

    XLA compiles a large program in many small allocations. glibc keeps the freed ones
    in its heap, where the large buffers a step allocates next (served by ``mmap``) can
    never use them: compiling SmolLM2's fine-tuning step left 1.2 GB resident that way.
    Call this after compiling and before running.
    """
    if platform.system() != "Linux":
        return
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return
    trim(0)


__all__ = ["peak_rss_mb", "release_freed_memory"]
