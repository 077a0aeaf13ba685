"""Write a notebook (outputs cleared) from ``(kind, source)`` cells: what the ``make_*.py``
scripts beside it share."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook


def build(cells: list[tuple[str, str]], id_prefix: str | None = None) -> nbformat.NotebookNode:
    """A notebook of ``cells``: ``("md", text)`` or ``("code", source)``; with ``id_prefix``
    the cell ids are ``<id_prefix>-00``, ``-01``, ... (stable across rebuilds)."""
    nb = new_notebook(metadata={"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                                "language_info": {"name": "python"}})
    for i, (kind, text) in enumerate(cells):
        cell = new_markdown_cell(text) if kind == "md" else new_code_cell(text)
        if id_prefix is not None:
            cell["id"] = f"{id_prefix}-{i:02d}"
        nb.cells.append(cell)
    return nb


def write(cells: list[tuple[str, str]], path: Path, id_prefix: str | None = None) -> None:
    """Write the notebook of ``cells`` to ``path`` through a temporary file and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".ipynb")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            nbformat.write(build(cells, id_prefix), fh)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    print(f"wrote {path}")
