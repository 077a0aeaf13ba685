"""Quantization methods and their registry.

A method maps one weight (and its ``XᵀX``) to a quantized array. It lives in one module
or folder under ``methods/`` and is made known by one call to ``register``: its recipe
type, its quantize function, how recipe names spell it, and, when it makes a new array
type, that type and its ``Reencoder``. ``quantize``, the pipeline, PV-Tuning,
checkpoints and named recipes all look methods up here (``docs/extending.md``).

A quantize function has the signature of ``QuantizeFn``: ``fn(w, xtx, recipe, key, *,
layout, path) -> quantized array``, where ``w`` is the weight in ``(d_out, d_in)``
storage order (float32), ``xtx`` the ``(d_in, d_in)`` input statistics (``None`` for
data-free methods), ``layout`` the layout of the leaf the result replaces, and ``path``
the leaf's path, used only in error messages.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import jax

from jaxquant import recipes
from jaxquant.methods.reencoding import Reencoder
from jaxquant.qarray import AdditiveQuantized, QuantizedArray, ScalarQuantized, register_array_type


class QuantizeFn(Protocol):
    def __call__(
        self, w: jax.Array, xtx: jax.Array | None, recipe: Any, key: jax.Array, *, layout: str, path: str
    ) -> Any: ...


# (name match, widths of the layers it will quantize or None) -> recipe
FromName = Callable[[re.Match[str], Iterable[int] | None], Any]


@dataclasses.dataclass(frozen=True)
class Method:
    """One registered quantization method.

    Attributes:
        family: the method's name in recipe files (``{"method": family, ...}``).
        recipe_type: the frozen dataclass of its recipes.
        quantize: the ``QuantizeFn``, or ``"module:function"`` imported on first use (so
            a method's heavy setup is paid only by its users).
        needs_statistics: whether it reads ``XᵀX`` (calibration data).
        name_pattern: a regular expression for recipe names (``gptq-3-g64``), matched on
            the lowercased name; ``None`` when the method has no names.
        from_name: builds the recipe from a match of ``name_pattern``.
        examples: names shown when a recipe name is not understood.
        array_type: the quantized array type it makes, registered for checkpoints.
        reencoder: how fine-tuning re-encodes that array type (PV-Tuning's V step).
    """

    family: str
    recipe_type: type
    quantize: QuantizeFn | str
    needs_statistics: bool = True
    name_pattern: str | None = None
    from_name: FromName | None = None
    examples: tuple[str, ...] = ()
    array_type: type[QuantizedArray] | None = None
    reencoder: Reencoder | None = None

    def quantize_fn(self) -> QuantizeFn:
        if isinstance(self.quantize, str):
            module, name = self.quantize.split(":")
            return getattr(importlib.import_module(module), name)
        return self.quantize


_METHODS: dict[type, Method] = {}
_REENCODERS: dict[type, Reencoder] = {}


def register(method: Method) -> Method:
    """Make a method known to every part of jaxquant (registering a recipe type again
    replaces its method).

    Raises:
        ValueError: its family belongs to another recipe type, its array type's name to
            another class, or ``name_pattern`` comes without ``from_name``.
    """
    for other in _METHODS.values():
        if other.recipe_type is not method.recipe_type and other.family == method.family:
            raise ValueError(f"register: the family {method.family!r} is taken by {other.recipe_type.__name__}")
    if method.name_pattern is not None and method.from_name is None:
        raise ValueError(f"register({method.family!r}): name_pattern needs from_name")
    if method.array_type is not None:
        register_array_type(method.array_type)
        if method.reencoder is not None:
            _REENCODERS[method.array_type] = method.reencoder
    _METHODS[method.recipe_type] = method
    return method


def registered() -> list[Method]:
    """Every registered method, in registration order."""
    return list(_METHODS.values())


def method_named(family: str) -> Method:
    """The registered method of a family name (case-insensitive).

    Raises:
        ValueError: no method has that family (the known ones are listed).
    """
    for method in _METHODS.values():
        if method.family == family.lower():
            return method
    raise ValueError(f"method={family!r} must be one of {sorted(m.family for m in _METHODS.values())}")


def method_of(recipe: Any) -> Method:
    """The registered method of ``recipe``.

    Raises:
        TypeError: no method is registered for the recipe's type.
    """
    try:
        return _METHODS[type(recipe)]
    except KeyError:
        known = [m.recipe_type.__name__ for m in _METHODS.values()]
        raise TypeError(f"recipe {recipe!r} is not a known recipe type ({known})") from None


def method_for(recipe: Any) -> QuantizeFn:
    """The quantize function that implements ``recipe``."""
    return method_of(recipe).quantize_fn()


def needs_statistics(recipe: Any) -> bool:
    """Whether the method of ``recipe`` reads ``XᵀX``."""
    return method_of(recipe).needs_statistics


def reencoder_for(q: Any) -> Reencoder:
    """How fine-tuning re-encodes the quantized array ``q``.

    Raises:
        TypeError: no method registered a ``Reencoder`` for ``q``'s type.
    """
    try:
        return _REENCODERS[type(q)]
    except KeyError:
        known = sorted(t.__name__ for t in _REENCODERS)
        raise TypeError(f"no method registered a Reencoder for {type(q).__name__} "
                        f"(PV-Tuning and straight-through need one); registered: {known}") from None


# ----------------------------------------------------------------------------- built-in methods


def default_group(d_ins: Iterable[int] | None) -> int:
    """The group of a scalar name without ``-g``: 128, or the largest power of two below
    it that divides every layer width (64 for SmolLM2's widths 576 and 1536)."""
    # gcd with 128 is a power of two: the largest group <= 128 dividing every width.
    return 128 if d_ins is None else math.gcd(128, *d_ins)


def _scalar_from_name(cls: type) -> FromName:
    def build(m: re.Match[str], d_ins: Iterable[int] | None) -> Any:
        bits, group = m.groups()
        group_size = default_group(d_ins) if group is None else (None if group == "row" else int(group))
        return cls(bits=int(bits), group_size=group_size)

    return build


def _aqlm_from_name(m: re.Match[str], d_ins: Iterable[int] | None) -> Any:
    num, bits, group = m.groups()
    return recipes.AQLM(num_codebooks=int(num), codebook_bits=int(bits), group_size=8 if group is None else int(group))


def _spqr_from_name(m: re.Match[str], d_ins: Iterable[int] | None) -> Any:
    bits, group = m.groups()
    return recipes.SpQR(bits=int(bits)) if group is None else recipes.SpQR(bits=int(bits), group_size=int(group))


def _vptq_from_name(m: re.Match[str], d_ins: Iterable[int] | None) -> Any:
    vector, bits, residual = m.groups()
    return recipes.VPTQ(vector_size=int(vector), codebook_bits=int(bits), residual_bits=int(residual or 0))


def _kashin_from_name(m: re.Match[str], d_ins: Iterable[int] | None) -> Any:
    u_bits, v_bits = m.groups()
    return recipes.Kashin(u_bits=int(u_bits), v_bits=int(v_bits))


def _pvq_from_name(m: re.Match[str], d_ins: Iterable[int] | None) -> Any:
    group, pulses, amplitude = m.groups()
    return recipes.PVQ(group_size=int(group), pulses=int(pulses), amplitude_bits=int(amplitude or 2))


def _register_builtins() -> None:
    from jaxquant.methods import scalar_reencode  # noqa: PLC0415 (light: no search code)
    from jaxquant.methods.aqlm import reencode as aqlm_reencode  # noqa: PLC0415
    from jaxquant.methods import rotated_reencode  # noqa: PLC0415
    from jaxquant.methods.kashin import reencode as kashin_reencode  # noqa: PLC0415
    from jaxquant.methods.kashin.array import KashinQuantized  # noqa: PLC0415
    from jaxquant.methods.pvq import reencode as pvq_reencode  # noqa: PLC0415
    from jaxquant.methods.pvq.array import PVQQuantized  # noqa: PLC0415
    from jaxquant.methods.spqr import reencode as spqr_reencode  # noqa: PLC0415
    from jaxquant import rotations  # noqa: PLC0415 (also registers RotatedQuantized for checkpoints)
    from jaxquant.methods.spqr.array import SpQRQuantized  # noqa: PLC0415
    from jaxquant.methods.vptq import reencode as vptq_reencode  # noqa: PLC0415
    from jaxquant.methods.vptq.array import VPTQQuantized  # noqa: PLC0415

    register(Method("rtn", recipes.RTN, "jaxquant.methods.rtn:quantize_rtn", needs_statistics=False,
                    name_pattern=r"rtn-(\d+)(?:-g(\d+|row))?", from_name=_scalar_from_name(recipes.RTN),
                    examples=("rtn-4", "rtn-3", "rtn-2"),
                    array_type=ScalarQuantized, reencoder=scalar_reencode.REENCODER))
    register(Method("gptq", recipes.GPTQ, "jaxquant.methods.gptq:quantize_gptq",
                    name_pattern=r"gptq-(\d+)(?:-g(\d+|row))?", from_name=_scalar_from_name(recipes.GPTQ),
                    examples=("gptq-4", "gptq-3", "gptq-2", "gptq-2-g64"),
                    array_type=ScalarQuantized, reencoder=scalar_reencode.REENCODER))
    register(Method("aqlm", recipes.AQLM, "jaxquant.methods.aqlm:quantize_aqlm",
                    name_pattern=r"aqlm-(\d+)x(\d+)(?:-g(\d+))?", from_name=_aqlm_from_name,
                    examples=("aqlm-2x8", "aqlm-1x16", "aqlm-1x8", "aqlm-1x8-g4"),
                    array_type=AdditiveQuantized, reencoder=aqlm_reencode.REENCODER))
    register(Method("spqr", recipes.SpQR, "jaxquant.methods.spqr.quantize:quantize_spqr",
                    name_pattern=r"spqr-(\d+)(?:-g(\d+))?", from_name=_spqr_from_name,
                    examples=("spqr-3", "spqr-4", "spqr-3-g32"),
                    array_type=SpQRQuantized, reencoder=spqr_reencode.REENCODER))
    register(Method("vptq", recipes.VPTQ, "jaxquant.methods.vptq.quantize:quantize_vptq",
                    name_pattern=r"vptq-(\d+)x(\d+)(?:r(\d+))?", from_name=_vptq_from_name,
                    examples=("vptq-8x8r8", "vptq-4x8", "vptq-8x12"),
                    array_type=VPTQQuantized, reencoder=vptq_reencode.REENCODER))
    register(Method("kashin", recipes.Kashin, "jaxquant.methods.kashin.quantize:quantize_kashin",
                    needs_statistics=False, name_pattern=r"kashin-(\d+)-(\d+)", from_name=_kashin_from_name,
                    examples=("kashin-1-1", "kashin-2-2"), array_type=KashinQuantized,
                    reencoder=kashin_reencode.REENCODER))
    register(Method("pvq", recipes.PVQ, "jaxquant.methods.pvq.quantize:quantize_pvq",
                    name_pattern=r"pvq-(\d+)x(\d+)(?:a(\d+))?", from_name=_pvq_from_name,
                    examples=("pvq-8x14", "pvq-16x27a3"), array_type=PVQQuantized,
                    reencoder=pvq_reencode.REENCODER))
    # A rotated array re-encodes through the array it wraps, whatever its method.
    _REENCODERS[rotations.RotatedQuantized] = rotated_reencode.reencoder(reencoder_for)


_register_builtins()
