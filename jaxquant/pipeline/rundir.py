"""The output directory of a pipeline run: its identity, crash-safe state, and logs.

Layout::

    OUT/
      run.json          the run's configuration and its hash (written once, first)
      layers.jsonl      one line per quantized layer (rebuilt from progress on resume)
      state/
        progress.json   commit record: blocks done, the inputs file, logs so far
        block-0003/     jaxquant.io checkpoint of quantized block 3
        inputs-0004.npy inputs of the next block (outputs of quantized block 3)
      params/           jaxquant.io checkpoint of the whole quantized tree (at the end)
      summary.json      final summary (at the end)

Every file is written under a temporary name and renamed; ``progress.json`` is renamed
last, so it is the commit point of a block: a run killed at any moment restarts from
the last committed block, and files of a block that was not committed are rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

import numpy as np

from jaxquant.atomic_files import atomic_write, atomic_write_bytes, atomic_write_json

RUN_FILE = "run.json"
PROGRESS_FILE = "progress.json"
LAYERS_FILE = "layers.jsonl"
SUMMARY_FILE = "summary.json"
STATE_DIR = "state"
PARAMS_DIR = "params"
FORMAT_VERSION = 1


def config_hash(config: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``config``."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def atomic_save_npy(path: str, array: np.ndarray) -> None:
    """``np.save`` through a temporary file and a rename."""
    atomic_write(path, lambda f: np.save(f, np.asarray(array), allow_pickle=False))


def _differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k), current.get(k)
        name = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, name + ".")
        elif json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            out.append(name)
    return out


class RunDir:
    """An output directory holding (at most) one run.

    Args:
        path: the directory.
        config: the run's configuration (JSON data); its hash identifies the run.
    """

    def __init__(self, path: str | os.PathLike, config: dict[str, Any]) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.config = config
        self.hash = config_hash(config)
        self.state = os.path.join(self.path, STATE_DIR)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def block_dir(self, i: int) -> str:
        return os.path.join(self.state, f"block-{i:04d}")

    def inputs_file(self, i: int) -> str:
        return os.path.join(self.state, f"inputs-{i:04d}.npy")

    def open(self, resume: bool) -> dict[str, Any] | None:
        """Check the directory and claim it for this run, or find this run's progress.

        Returns:
            The saved progress record to continue from, or ``None`` for a fresh start.

        Raises:
            ValueError: the directory holds something else — files of no run, a
                different run (the differing settings are named), or this same run
                while ``resume`` is false. Nothing is written in these cases.
        """
        entries = os.listdir(self.path) if os.path.isdir(self.path) else None
        if os.path.exists(self.path) and entries is None:
            raise ValueError(f"out_dir {self.path!r} exists and is not a directory")
        if not entries:
            # run.json first: a directory that holds anything holds its run's identity.
            os.makedirs(self.path, exist_ok=True)
            atomic_write_json(self.file(RUN_FILE), {"config": self.config, "hash": self.hash})
            os.makedirs(self.state, exist_ok=True)
            return None
        run_file = self.file(RUN_FILE)
        if not os.path.isfile(run_file):
            raise ValueError(
                f"out_dir {self.path!r} is not empty and holds no jaxquant quantize run ({RUN_FILE} is missing); "
                f"nothing was written. Choose a new or empty directory"
            )
        try:
            with open(run_file, encoding="utf-8") as f:
                saved = json.load(f)
            saved_hash, saved_config = saved["hash"], saved["config"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{run_file} is damaged ({e}); nothing was written. Choose a new directory") from None
        if saved_hash != self.hash:
            diff = _differences(saved_config, self.config)
            action = "resume it with the original settings" if resume else "choose a new directory"
            raise ValueError(
                f"out_dir {self.path!r} holds a different run (settings that differ: {', '.join(diff) or 'format'}); "
                f"nothing was overwritten. To continue that run, {action}"
            )
        if not resume:
            raise ValueError(
                f"out_dir {self.path!r} already holds this run; pass resume=True (--resume) to continue it, "
                f"or choose a new directory. Nothing was overwritten"
            )
        os.makedirs(self.state, exist_ok=True)
        return self.read_progress()

    def read_progress(self) -> dict[str, Any] | None:
        path = os.path.join(self.state, PROGRESS_FILE)
        if not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                progress = json.load(f)
            progress["blocks_done"], progress["layers"], progress["blocks"]  # noqa: B018 - fields a resume reads
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is damaged ({type(e).__name__}: {e}); nothing was changed. Delete {self.state} "
                             "to start the run over") from None
        if progress.get("config_hash") != self.hash:
            raise ValueError(f"{path} belongs to another run (config hash mismatch); nothing was overwritten")
        return progress

    def commit(self, progress: dict[str, Any]) -> None:
        """Write the progress record (the commit point of a block) and the layer log."""
        # The log first: it may run one block ahead of the commit (a resume rewrites it
        # from the committed record), never behind it.
        self.write_layers(progress["layers"])
        atomic_write_json(os.path.join(self.state, PROGRESS_FILE), {**progress, "config_hash": self.hash})

    def write_layers(self, layers: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(rec, sort_keys=True) + "\n" for rec in layers)
        atomic_write_bytes(self.file(LAYERS_FILE), text.encode("utf-8"))

    def clean_state(self, keep_inputs: str | None, blocks_done: int) -> None:
        """Remove state files the committed progress no longer needs (stale inputs, blocks
        written by an attempt that was not committed, temporary files)."""
        if not os.path.isdir(self.state):
            return
        for name in os.listdir(self.state):
            full = os.path.join(self.state, name)
            if name.startswith("inputs-") and full != keep_inputs:
                os.unlink(full)
            elif name.startswith(".tmp-"):
                os.unlink(full)
            elif name.startswith("block-") and name[6:].isdigit() and int(name[6:]) >= blocks_done:
                shutil.rmtree(full, ignore_errors=True)

    def remove_block_state(self) -> None:
        """After the final checkpoint is committed: drop per-block checkpoints and inputs."""
        if not os.path.isdir(self.state):
            return
        for name in os.listdir(self.state):
            full = os.path.join(self.state, name)
            if name.startswith("block-") or name.startswith(".block-"):
                shutil.rmtree(full, ignore_errors=True)
            elif name.startswith(("inputs-", ".tmp-")) or name in (".targets.npy", ".next.npy"):
                os.unlink(full)


__all__ = ["FORMAT_VERSION", "LAYERS_FILE", "PARAMS_DIR", "RunDir", "SUMMARY_FILE", "atomic_save_npy", "config_hash"]
