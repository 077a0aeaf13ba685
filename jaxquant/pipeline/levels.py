"""A level database for mixed-precision search, built from a model: one block-sequential
quantization run (``quantize_model``) per level, each in its own crash-safe directory.

Layout::

    DATABASE/
      levels/<level name>/   a ``jaxquant quantize`` output directory per level
                             (run.json, layers.jsonl, params/, summary.json)

A level whose directory already holds the finished run with the same settings is
loaded, not recomputed, so searches at several budgets share one database, and a run
made earlier by ``jaxquant quantize --out DATABASE/levels/NAME`` with the same
calibration, seed and batch size is reused as it is. An interrupted level resumes at its
last finished block.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import jax

from jaxquant.pipeline import rundir as rd
from jaxquant.pipeline.run import quantize_model
from jaxquant.search.database import LevelDatabase, level_errors

LEVELS_DIR = "levels"
_LEVEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def level_dir(database_dir: str | os.PathLike, name: str) -> str:
    """The run directory of level ``name``.

    Raises:
        ValueError: a name that is not a plain file name (letters, digits, ``._+-``).
    """
    if not _LEVEL_NAME.fullmatch(name):
        raise ValueError(f"level name {name!r} must be letters, digits and ._+- (it names a directory)")
    return os.path.join(os.fspath(database_dir), LEVELS_DIR, name)


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def build_level_database(
    model: Any,
    calib_tokens: Any,
    levels: Mapping[str, Any],
    database_dir: str | os.PathLike,
    *,
    key: jax.Array,
    batch_size: int = 8,
    progress: bool = True,
    log: bool | None = None,
) -> tuple[LevelDatabase, list[dict[str, Any]]]:
    """Quantize ``model`` once per level (or load earlier runs) and gather the options.

    Args:
        model: the model (as for ``quantize_model``).
        calib_tokens: ``[nsamples, seqlen]`` calibration windows, shared by every level.
        levels: ``{level name: recipe}`` (a recipe or a ``[(pattern, recipe)]`` list).
        database_dir: where the levels' run directories live.
        key: PRNG key of every level's run.
        batch_size: calibration samples per forward pass.
        progress: progress bars of each level's run.
        log: a line per finished block and per level.

    Returns:
        ``(database, report)``: the options with each layer's relative output error per
        level, and one record per level: ``name``, ``bits_per_weight``,
        ``quantize_seconds`` (the run's own time, also when it is reused), ``reused``
        (whether it was finished before this call) and ``megabytes`` on disk.
    """
    log = progress if log is None else log
    trees: dict[str, Any] = {}
    records: list[dict[str, dict[str, Any]]] = []
    report: list[dict[str, Any]] = []
    for name, recipe in levels.items():
        out = level_dir(database_dir, name)
        reused = os.path.isfile(os.path.join(out, rd.SUMMARY_FILE)) and os.path.isdir(os.path.join(out, rd.PARAMS_DIR))
        if log:
            print(f"level {name}: {'loading the finished run' if reused else 'quantizing'} in {out}")
        result = quantize_model(model, calib_tokens, recipe, key=key, out_dir=out, resume=True, progress=progress,
                                batch_size=batch_size, log=log)
        trees[name] = result.params
        records.append({rec["name"]: rec for rec in result.layers})
        report.append({"name": name, "bits_per_weight": result.summary["bits_per_weight"],
                       "quantize_seconds": result.summary["quantize_seconds"], "reused": reused,
                       "megabytes": round(_dir_bytes(os.path.join(out, rd.PARAMS_DIR)) / 1e6, 2)})
    database = LevelDatabase.from_trees(trees)
    return dataclasses.replace(database, errors=level_errors(records, database.layer_paths)), report


__all__ = ["LEVELS_DIR", "build_level_database", "level_dir"]
