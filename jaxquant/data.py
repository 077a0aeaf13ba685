"""Text to token batches: tokenizers, the built-in corpus, evaluation windows, calibration samples.

Two tokenizers share one small interface (``encode``, ``decode``, ``vocab_size``,
``bos_token_id``, ``eos_token_id``): ``ByteTokenizer`` (UTF-8 bytes, 256 ids, needs no
files) and ``HFTokenizer`` (transformers ``AutoTokenizer`` read from a local model
directory). ``load_tokenizer(model_dir)`` picks the right one.

The built-in corpus is the English documentation that ships with every CPython
(``pydoc_data.topics``): available offline, about 466 KB, split deterministically into
train / validation / test.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = (0.90, 0.05, 0.05)
BYTE_TOKENIZER_FILE = "jaxquant_tokenizer.json"
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class Tokenizer(Protocol):
    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int | None

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]: ...

    def decode(self, ids: Any) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255; no special tokens."""

    vocab_size = 256
    bos_token_id = None
    eos_token_id = None

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        """Token ids of ``text`` (``add_bos`` is accepted for interface parity; no BOS exists)."""
        del add_bos
        return list(text.encode("utf-8"))

    def decode(self, ids: Any) -> str:
        """Text of ``ids``; invalid UTF-8 (e.g. a cut multi-byte character) becomes U+FFFD."""
        return bytes(int(i) for i in np.asarray(ids).reshape(-1)).decode("utf-8", errors="replace")

    def note(self) -> str:
        """The JSON note saved beside a byte-level model so ``load_tokenizer`` finds it."""
        return json.dumps(
            {"type": "bytes", "vocab_size": 256,
             "description": "byte-level: token id = UTF-8 byte value; no special tokens"}, indent=2
        )


class HFTokenizer:
    """A transformers tokenizer behind the ``Tokenizer`` interface."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.bos_token_id = tokenizer.bos_token_id
        self.eos_token_id = tokenizer.eos_token_id

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        if add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Any) -> str:
        return self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)])


def load_tokenizer(model_dir: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a model: byte-level note, Hugging Face tokenizer files, or GGUF metadata.

    Args:
        model_dir: a model directory, a ``.gguf`` file, or a known model name
            (``jaxquant.known_models``).

    Raises:
        FileNotFoundError: the directory holds neither.
    """
    from jaxquant.known_models import resolve_model  # noqa: PLC0415

    model_dir = resolve_model(model_dir)
    if os.path.isfile(model_dir):
        from jaxquant.io.gguf import load_gguf_tokenizer  # noqa: PLC0415 - only GGUF files need it

        return HFTokenizer(load_gguf_tokenizer(model_dir))
    note = os.path.join(model_dir, BYTE_TOKENIZER_FILE)
    if os.path.isfile(note):
        with open(note, encoding="utf-8") as f:
            kind = json.load(f).get("type")
        if kind != "bytes":
            raise ValueError(f"{note}: unknown tokenizer type {kind!r} (expected 'bytes')")
        return ByteTokenizer()
    if any(os.path.isfile(os.path.join(model_dir, n)) for n in _HF_TOKENIZER_FILES):
        from transformers import AutoTokenizer  # noqa: PLC0415 - heavy import, needed only here

        return HFTokenizer(AutoTokenizer.from_pretrained(model_dir, local_files_only=True))
    raise FileNotFoundError(
        f"missing tokenizer: {model_dir!r} has none of {(*_HF_TOKENIZER_FILES, BYTE_TOKENIZER_FILE)}"
    )


# ----------------------------------------------------------------------------- corpus


def builtin_corpus() -> str:
    """CPython's bundled documentation topics, joined in sorted key order."""
    from pydoc_data import topics  # noqa: PLC0415

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def split_text(text: str, fractions: tuple[float, float, float] = SPLIT_FRACTIONS) -> dict[str, str]:
    """Cut ``text`` into contiguous train / validation / test parts by character fractions.

    Contiguous cuts (rather than shuffled lines) keep held-out text unseen in training.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions={fractions} must be three non-negative numbers summing to 1")
    n = len(text)
    a = int(n * fractions[0])
    b = int(n * (fractions[0] + fractions[1]))
    return {"train": text[:a], "validation": text[a:b], "test": text[b:]}


# Standard-library modules whose docstrings form the second evaluation corpus: English
# prose about library APIs, apart from the language reference of the built-in corpus.
DOCSTRING_MODULES = ("argparse", "collections", "csv", "datetime", "decimal", "email.message", "fractions",
                     "functools", "heapq", "http.client", "http.cookiejar", "inspect", "ipaddress", "json",
                     "logging", "pathlib", "pickle", "random", "shutil", "smtplib", "statistics", "string",
                     "subprocess", "tarfile", "textwrap", "threading", "unittest.case", "urllib.parse",
                     "urllib.request", "zipfile")
SECOND_CORPUS = "stdlib-docs"


def stdlib_docstrings() -> str:
    """The second built-in corpus: docstrings of ``DOCSTRING_MODULES`` (about 158 KB).

    Each module's own docstring, then those of its public classes and functions longer
    than 80 characters, in sorted name order. Never used for calibration or training,
    so it measures held-out quality on text the built-in corpus does not contain.
    """
    import importlib  # noqa: PLC0415
    import inspect  # noqa: PLC0415

    parts = []
    for name in DOCSTRING_MODULES:
        module = importlib.import_module(name)
        if doc := inspect.getdoc(module):
            parts.append(doc)
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            if getattr(obj, "__module__", None) == module.__name__ and len(doc := inspect.getdoc(obj) or "") > 80:
                parts.append(doc)
    return "\n\n".join(parts)


def builtin_split(split: str) -> str:
    """One split (``train``, ``validation`` or ``test``) of the built-in corpus."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")
    return split_text(builtin_corpus())[split]


def read_text(source: str | os.PathLike, split: str = "validation") -> str:
    """Text of a file, of ``split`` of the built-in corpus (``"builtin"``), or the whole
    second corpus (``"stdlib-docs"``, ``stdlib_docstrings``; ``split`` does not apply).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the text is empty.
    """
    if os.fspath(source) == "builtin":
        text = builtin_split(split)
    elif os.fspath(source) == SECOND_CORPUS:
        text = stdlib_docstrings()
    else:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    if not text.strip():
        raise ValueError(f"evaluation text {os.fspath(source)!r} is empty")
    return text


# ----------------------------------------------------------------------------- windows


def as_token_array(tokens: Any) -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"tokens must be a 1-D integer sequence, got shape {arr.shape} dtype {arr.dtype}")
    return arr.astype(np.int32)


def eval_windows(tokens: Any, seqlen: int) -> np.ndarray:
    """Non-overlapping windows ``[n, seqlen]`` covering the tokens; the ragged tail is dropped.

    This is the convention of the GPTQ and AQLM papers for WikiText-2/C4 perplexity.

    Raises:
        ValueError: ``seqlen < 2`` or fewer than ``seqlen`` tokens.
    """
    arr = as_token_array(tokens)
    if seqlen < 2:
        raise ValueError(f"seqlen={seqlen} must be >= 2")
    n = len(arr) // seqlen
    if n == 0:
        raise ValueError(f"text has {len(arr)} tokens, fewer than one window of seqlen={seqlen}")
    return arr[: n * seqlen].reshape(n, seqlen)


def calibration_windows(tokens: Any, num: int, length: int, seed: int = 0) -> np.ndarray:
    """``num`` windows of ``length`` tokens starting at random positions (seeded).

    Raises:
        ValueError: ``num``/``length`` not positive, or the text shorter than ``num * length``
            tokens (too little text to calibrate on that many distinct tokens).
    """
    arr = as_token_array(tokens)
    if num < 1 or length < 1:
        raise ValueError(f"num={num} and length={length} must be positive")
    if len(arr) < num * length:
        raise ValueError(
            f"text has {len(arr)} tokens, fewer than num={num} x length={length} = {num * length} needed for calibration"
        )
    starts = np.random.default_rng(seed).integers(0, len(arr) - length + 1, size=num)
    return np.stack([arr[s : s + length] for s in starts])


def random_batches(tokens: Any, batch_size: int, length: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Endless training batches ``[batch_size, length + 1]`` of random windows (inputs + targets)."""
    arr = as_token_array(tokens)
    if len(arr) < length + 1:
        raise ValueError(f"text has {len(arr)} tokens, fewer than length + 1 = {length + 1}")
    rng = np.random.default_rng(seed)
    offsets = np.arange(length + 1)
    while True:
        starts = rng.integers(0, len(arr) - length, size=batch_size)
        yield arr[starts[:, None] + offsets[None, :]]
