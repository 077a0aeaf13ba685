"""A value set on a ``threading.local`` for the duration of a ``with`` block: how a caller
hands something (a recorder, a token mask) to code it calls deep inside a model, without
adding an argument to every signature on the way."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def thread_setting(local: threading.local, name: str, value: Any) -> Iterator[None]:
    """``local.<name>`` set to ``value`` inside the ``with`` block, restored after it
    (nested blocks restore the outer value)."""
    previous = getattr(local, name, None)
    setattr(local, name, value)
    try:
        yield
    finally:
        setattr(local, name, previous)
