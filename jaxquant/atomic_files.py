"""Files that are either absent or complete: write under a temporary name, then rename.

Every writer in jaxquant (checkpoints, run directories, exports, the quickstart cache and
its results) goes through ``atomic_write``, so a crash or a full disk never leaves a
half-written file under the final name, and a failed write leaves no temporary behind.
This module imports nothing from jaxquant: any layer may use it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from typing import Any, BinaryIO


def _fsync_dir(path: str) -> None:
    # Makes the rename itself durable; not every platform or filesystem allows it.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, rename it to ``path``.

    Args:
        path: the final file name.
        write: writes the whole content to the binary file object it is given.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see ``atomic_write``)."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON (sorted keys; unknown types as strings) atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode("utf-8"))


def staging_dir(path: str | os.PathLike[str]) -> str:
    """Where a directory bound for ``path`` is written before ``commit_dir`` renames it.

    Deterministic (not random), so every host of a multi-host run agrees on it, and a
    leftover of a crashed write to the same path is found and replaced.
    """
    parent, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(parent, f".{name}.jaxquant-partial")


def commit_dir(staging: str, path: str | os.PathLike[str], overwrite: bool) -> None:
    """Rename the complete directory ``staging`` to ``path``; an old ``path`` goes only after.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
    """
    path = os.fspath(path)
    if os.path.exists(path):
        if not overwrite:  # callers check up front too; re-checked in case it appeared meanwhile
            raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
        trash = f"{staging}-old-{uuid.uuid4().hex}"
        os.replace(path, trash)
        os.replace(staging, path)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, path)


__all__ = ["atomic_write", "atomic_write_bytes", "commit_dir", "staging_dir"]
