"""A model's side files (config and tokenizer) carried to output directories, and GGUF conversion.

Every command that writes a model directory (``quantize``, ``finetune``, ``convert``)
carries its source's configuration and *all* of its tokenizer files, the chat template
included, through ``write_model_files``; a GGUF source has no such files, so they are
written from its metadata instead. ``convert`` turns any model source (a GGUF file, a
known model name, a Hugging Face directory) into a dense Hugging Face directory that
transformers loads, written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from jaxquant.atomic_files import atomic_write_bytes, commit_dir, staging_dir
from jaxquant.io.hf_model_dir import TOKENIZER_FILES
from jaxquant.known_models import resolve_model


def write_model_files(source: str | os.PathLike, out: str | os.PathLike) -> list[str]:
    """Write ``source``'s ``config.json`` and tokenizer files into the directory ``out``.

    Args:
        source: a model directory, a ``.gguf`` file or a known model name.
        out: an existing directory.

    Returns:
        The names of the files written.
    """
    source, out = resolve_model(source), os.fspath(out)
    if os.path.isfile(source):
        return _write_gguf_files(source, out)
    written = []
    for name in ("config.json", *TOKENIZER_FILES):
        src = os.path.join(source, name)
        if os.path.isfile(src):
            with open(src, "rb") as f:
                atomic_write_bytes(os.path.join(out, name), f.read())
            written.append(name)
    return written


def _write_gguf_files(path: str, out: str) -> list[str]:
    from jaxquant.io.gguf import read_gguf, tokenizer_from_metadata  # noqa: PLC0415
    from jaxquant.models.config import config_from_hf  # noqa: PLC0415

    checkpoint = read_gguf(path, tensors=False)
    config = config_from_hf(checkpoint.hf_config).to_hf_dict()
    atomic_write_bytes(os.path.join(out, "config.json"), json.dumps(config, indent=2).encode("utf-8"))
    before = set(os.listdir(out))
    # transformers writes its files directly; a crash leaves at most complete earlier files
    # beside partial new ones, which callers avoid by writing into a temporary directory.
    tokenizer_from_metadata(checkpoint.metadata, path).save_pretrained(out)
    return ["config.json", *sorted(set(os.listdir(out)) - before)]


def convert(source: str | os.PathLike, out: str | os.PathLike, *, dtype: Any = None,
            overwrite: bool = False) -> str:
    """Write ``source`` as a dense Hugging Face model directory (config, safetensors, tokenizer).

    Args:
        source: a ``.gguf`` file, a known model name, or a model directory.
        out: the directory to create.
        dtype: weight dtype (``jnp.float32`` by default; ``jnp.bfloat16`` halves the size).
        overwrite: replace an existing ``out``.

    Returns:
        ``out``.

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is false.
    """
    import jax.numpy as jnp  # noqa: PLC0415

    from jaxquant.models.loading import from_pretrained, save_pretrained  # noqa: PLC0415

    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"--out {out} already exists (pass --overwrite, or overwrite=True, to replace it)")
    model = from_pretrained(source, dtype=jnp.float32 if dtype is None else dtype)
    staging = staging_dir(out)
    if os.path.exists(staging):  # left over by a crashed conversion to the same path
        shutil.rmtree(staging)
    os.makedirs(staging)
    try:
        write_model_files(source, staging)
        save_pretrained(model, staging)  # last: its config.json states the weights' dtype
        commit_dir(staging, out, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


__all__ = ["convert", "write_model_files"]
