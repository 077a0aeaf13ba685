"""Quantized array types: the leaves that replace dense weights in a parameter tree.

Each type is a registered pytree dataclass: its arrays are children (so ``jax.jit``,
``jax.tree.map`` and optax see them) and its configuration is static metadata (so it
is part of the tree structure and survives ``jit`` untouched).

Storage layout is always ``(d_out, d_in)`` internally, as in the AQLM reference, so
that Hugging Face AQLM checkpoints map onto it by renaming. The one place that knows
about Flax's ``(d_in, d_out)`` kernel convention is the static ``layout`` field:
``decode()`` returns the array in the layout of the leaf it replaced, so
``dequantize(quantize(tree))`` has the structure and shapes of ``tree``.

Bits per weight are counted honestly: integer codes at their nominal (packed) width,
every continuous array (scales, zero points, codebooks) at its dtype's real width.
``resident_bytes`` reports what the arrays occupy in memory right now, where codes of
fewer than 8 bits still take a byte each.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

Layout = Literal["out_in", "in_out"]
_LAYOUTS = ("out_in", "in_out")

# Paths of token embeddings and output heads (``embed/embedding``, ``Embed_0/embedding``,
# ``embed_tokens/weight``, ``wte``, ``lm_head/kernel``, ``head/kernel``): ``tree_bits``
# counts them apart from the linear layers, whose bits per weight a method is judged by.
EMBEDDING_OR_HEAD = re.compile(r"(^|/)(embed\w*|wte|wpe|lm_head|head)(/|$)", re.IGNORECASE)


def static_field(default: Any = dataclasses.MISSING) -> Any:
    """A dataclass field that is static pytree metadata (configuration, not an array)."""
    return dataclasses.field(default=default, metadata=dict(static=True))


def _smallest_uint(bits: int) -> np.dtype:
    """The narrowest unsigned integer dtype that holds ``bits``-bit codes."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if bits <= np.iinfo(dtype).bits:
            return np.dtype(dtype)
    raise ValueError(f"codes of {bits} bits do not fit in 32 bits")


def code_dtype(bits: int) -> np.dtype:
    """Public helper: the storage dtype used for codes of ``bits`` bits."""
    return _smallest_uint(bits)


def _to_leaf_layout(w_out_in: jax.Array, layout: Layout) -> jax.Array:
    return w_out_in if layout == "out_in" else w_out_in.T


# ``QuantizedArray.decode``: one compiled program per array type, shapes and dtype, shared
# by every layer of that form. Decoding op by op outside jit compiles each op apart (about
# 20 programs per form); inside a jit trace this is inlined like any function.
_decode = jax.jit(lambda q, dtype: _to_leaf_layout(q.decode_out_in(dtype), q.layout), static_argnums=1)


def array_bits(x: Any) -> int:
    """Bits an array occupies at its dtype's width (0 for ``None``)."""
    return 0 if x is None else int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize * 8


def _nbytes(x: Any) -> int:
    return 0 if x is None else int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize


class QuantizedArray(abc.ABC):
    """The interface every quantized array type implements.

    A quantized array is a registered pytree dataclass standing for one 2-D weight. Its
    array fields are children: floating ones are the continuous part (what the P step and
    optax update) and integer ones the discrete part (codes), so ``split`` and ``merge``
    need no knowledge of the type. Its configuration fields are static metadata and must
    include ``shape`` (the dense leaf's shape) and ``layout`` (``"out_in"`` or
    ``"in_out"``).

    A subclass implements ``decode_rows``, ``expected_shapes``, ``storage_bits``,
    ``resident_bytes`` and ``scheme``, and is registered by
    name with ``register_array_type`` so that checkpoints can name it. How fine-tuning
    re-encodes it toward a target lives with its method (``jaxquant.Reencoder``, registered
    by ``jaxquant.register_method``).
    """

    shape: tuple[int, int]
    layout: Layout

    def decode_out_in(self, dtype: Any = jnp.float32) -> jax.Array:
        """Dense weight in the storage layout ``(d_out, d_in)``: every row through
        ``decode_rows`` (a type with a cheaper whole decode overrides it)."""
        return self.decode_rows(jnp.int32(0), self.d_out).astype(dtype)

    @abc.abstractmethod
    def decode_rows(self, start: jax.Array, n_rows: int) -> jax.Array:
        """Rows ``start : start + n_rows`` of ``decode_out_in()`` as float32 ``[n_rows, d_in]``.

        ``start`` may be traced; it and ``n_rows`` are multiples of ``row_group``. The
        generic matmul of ``jaxquant.ops`` decodes a weight tile by tile through this.
        """

    @abc.abstractmethod
    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape each array field must have, from ``shape``, ``layout`` and the static fields."""

    def check_shapes(self) -> None:
        """Raise ``ValueError`` naming the field unless every array has its expected shape
        (``None`` fields are skipped)."""
        for name, want in self.expected_shapes().items():
            got = getattr(self, name)
            if got is not None and tuple(got.shape) != tuple(want):
                raise ValueError(f"{type(self).__name__}.{name} has shape {tuple(got.shape)}, expected {tuple(want)} "
                                 f"for a {self.scheme} weight of shape {tuple(self.shape)} ({self.layout})")

    @property
    @abc.abstractmethod
    def storage_bits(self) -> int:
        """Total bits stored: codes at their nominal width, other arrays at their dtype's."""

    @property
    @abc.abstractmethod
    def resident_bytes(self) -> int:
        """Bytes the arrays occupy in memory now."""

    @property
    def code_widths(self) -> dict[str, int]:
        """Array fields of integer codes, with the bits each code needs.

        Checkpoints store a field whose width is narrower than its dtype packed at that
        width (``jaxquant.bitpack``), so that a file holds about ``storage_bits``. This
        default names none.
        """
        return {}

    @property
    @abc.abstractmethod
    def scheme(self) -> str:
        """A short description of the format, e.g. ``int3 asym g64``."""

    @property
    def dtype(self) -> jnp.dtype:
        """The dtype of the continuous part: that of the first floating-point array field."""
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            x = getattr(self, field.name)
            if not field.metadata.get("static") and x is not None and jnp.issubdtype(x.dtype, jnp.floating):
                return x.dtype
        raise TypeError(f"{type(self).__name__} has no floating-point array field")

    @property
    def row_group(self) -> int:
        """Output rows that share codes: ``decode_rows`` takes whole multiples of it."""
        return 1

    @property
    def d_out(self) -> int:
        return self.shape[0] if self.layout == "out_in" else self.shape[1]

    @property
    def d_in(self) -> int:
        return self.shape[1] if self.layout == "out_in" else self.shape[0]

    @property
    def ndim(self) -> int:
        return 2

    @property
    def bits_per_weight(self) -> float:
        return self.storage_bits / (self.d_out * self.d_in)

    def decode(self, dtype: Any = jnp.float32) -> jax.Array:
        """Dense weight with the shape and layout of the leaf it replaced (one compiled
        program per array form and dtype)."""
        return _decode(self, dtype)

    def few_rows_matmul(self, x: jax.Array) -> jax.Array:
        """``x @ W`` through the type's own kernel, for ``x`` of a few rows ``[rows, d_in]``.

        ``ops.matmul`` tries it for at most ``ops.dispatch.DECODE_BATCH_ROWS`` rows, before
        its generic tile-wise decode. This default has no kernel.

        Raises:
            NotImplementedError: the type has no kernel, or its kernel cannot run this call
                (backend, rows, build); the reason is in the message.
        """
        raise NotImplementedError(f"{type(self).__name__} has no kernel of its own")

    def unwrap_for_matmul(
        self, x: jax.Array
    ) -> tuple[jax.Array, QuantizedArray, Callable[[jax.Array], jax.Array]] | None:
        """For a type that wraps another quantized array (a rotation, say): how ``x @ W``
        reduces to a product with the wrapped array.

        Args:
            x: ``[rows, d_in]`` activations.

        Returns:
            ``None`` for an ordinary type (this default), else ``(x', inner, finish)``
            with ``x @ W == finish(x' @ inner)``; ``ops.matmul`` computes ``x' @ inner``
            with whatever implementation suits ``inner``.
        """
        return None

    def take_rows(self, rows: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
        """Decoded rows ``W[rows]`` of an ``out_in`` array (an embedding lookup).

        This default decodes the whole table; a type with a cheaper row decoder overrides it.
        """
        if self.layout != "out_in":
            raise ValueError(f"take_rows needs an out_in array (rows are output channels), got {self!r}")
        return self.decode_out_in(dtype)[rows]

    def __repr__(self) -> str:
        return _describe(self)


_ARRAY_TYPES: dict[str, type[QuantizedArray]] = {}


def register_array_type(cls: type[QuantizedArray], name: str | None = None) -> type[QuantizedArray]:
    """Register a quantized array type under ``name`` (its class name by default).

    Checkpoints record a quantized leaf by this name and rebuild it from the class
    registered under it. Registering the same class again is allowed; another class
    under a taken name is not.

    Raises:
        TypeError: ``cls`` is not a dataclass subclass of ``QuantizedArray``.
        ValueError: ``name`` belongs to another class.
    """
    if not (isinstance(cls, type) and issubclass(cls, QuantizedArray) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"register_array_type: {cls!r} must be a dataclass subclass of QuantizedArray")
    name = cls.__name__ if name is None else name
    if _ARRAY_TYPES.get(name, cls) is not cls:
        raise ValueError(f"register_array_type: the name {name!r} is taken by {_ARRAY_TYPES[name]!r}")
    _ARRAY_TYPES[name] = cls
    return cls


def array_type(name: str) -> type[QuantizedArray]:
    """The quantized array type registered under ``name``.

    Raises:
        KeyError: no type has that name (the registered names are listed).
    """
    if name not in _ARRAY_TYPES:
        raise KeyError(f"no quantized array type is registered as {name!r}; registered: {sorted(_ARRAY_TYPES)}")
    return _ARRAY_TYPES[name]


def array_type_name(cls: type) -> str:
    """The name ``cls`` is registered under.

    Raises:
        KeyError: ``cls`` is not registered.
    """
    for name, registered in _ARRAY_TYPES.items():
        if registered is cls:
            return name
    raise KeyError(f"{cls.__name__} is not a registered quantized array type; call "
                   "jaxquant.register_array_type (or register its method) first")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, repr=False)  # repr: QuantizedArray's one-line summary
class ScalarQuantized(QuantizedArray):
    """Uniform (scalar) quantization with per-group scale and optional zero point.

    ``W[o, i] ≈ (codes[o, i] - zero[o, g(i)]) * scale[o, g(i)]`` with ``g(i) = i //
    group_size``. Symmetric quantization has no stored zero point: the grid is centred
    on zero, ``zero = (2**bits - 1) / 2``, so 2-bit codes decode to ``{±0.5, ±1.5}·s``.

    Attributes:
        codes: unsigned integer codes, ``[d_out, d_in]`` (one per weight).
        scales: ``[d_out, d_in // group_size]`` step sizes.
        zeros: ``[d_out, d_in // group_size]`` zero points in code units, or ``None``
            for symmetric quantization.
        bits: bits per code (1..8).
        group_size: input columns sharing one scale (``d_in`` for per-channel).
        shape: shape of the dense leaf this array stands for.
        layout: ``"out_in"`` (PyTorch ``weight``) or ``"in_out"`` (Flax ``kernel``).
    """

    codes: jax.Array
    scales: jax.Array
    zeros: jax.Array | None
    bits: int = static_field()
    group_size: int = static_field()
    shape: tuple[int, int] = static_field()
    layout: Layout = static_field("out_in")

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    def _values(self, codes: jax.Array, scales: jax.Array, zeros: jax.Array | None) -> jax.Array:
        """Weights of rows of codes ``[..., d_in]`` with their scales and zeros ``[..., groups]``."""
        groups = codes.astype(jnp.float32).reshape(*codes.shape[:-1], scales.shape[-1], self.group_size)
        zeros = jnp.float32((2**self.bits - 1) / 2) if zeros is None else zeros.astype(jnp.float32)[..., None]
        return ((groups - zeros) * scales.astype(jnp.float32)[..., None]).reshape(codes.shape)

    def decode_out_in(self, dtype: Any = jnp.float32) -> jax.Array:
        """Dense weight in the storage layout ``(d_out, d_in)``."""
        return self._values(self.codes, self.scales, self.zeros).astype(dtype)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        groups = (self.d_out, self.d_in // self.group_size)
        return {"codes": (self.d_out, self.d_in), "scales": groups, "zeros": groups}

    def decode_rows(self, start: jax.Array, n_rows: int) -> jax.Array:
        codes = jax.lax.dynamic_slice_in_dim(self.codes, start, n_rows, axis=0)
        scales = jax.lax.dynamic_slice_in_dim(self.scales, start, n_rows, axis=0)
        zeros = None if self.zeros is None else jax.lax.dynamic_slice_in_dim(self.zeros, start, n_rows, axis=0)
        return self._values(codes, scales, zeros)

    def take_rows(self, rows: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
        """Decoded rows ``W[rows]`` of an ``out_in`` array, without decoding the others.

        This is an embedding lookup on a quantized table ``[vocab, d]``.

        Args:
            rows: integer indices of any shape.
            dtype: dtype of the result.

        Returns:
            ``[*rows.shape, d_in]``.
        """
        if self.layout != "out_in":
            raise ValueError(f"take_rows needs an out_in array (rows are output channels), got {self!r}")
        zeros = None if self.zeros is None else self.zeros[rows]
        return self._values(self.codes[rows], self.scales[rows], zeros).astype(dtype)

    @property
    def storage_bits(self) -> int:
        """Total bits stored: packed codes, scales and zero points."""
        return int(np.prod(self.codes.shape)) * self.bits + array_bits(self.scales) + array_bits(
            self.zeros
        )

    @property
    def resident_bytes(self) -> int:
        """Bytes the arrays occupy in memory now (codes unpacked, one byte each)."""
        return _nbytes(self.codes) + _nbytes(self.scales) + _nbytes(self.zeros)

    @property
    def code_widths(self) -> dict[str, int]:
        return {"codes": self.bits}

    @property
    def scheme(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        return f"int{self.bits} {kind} g{self.group_size}"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, repr=False)  # repr: QuantizedArray's one-line summary
class AdditiveQuantized(QuantizedArray):
    """Additive multi-codebook quantization (AQLM layout).

    The weight is cut into tiles of ``out_group_size × in_group_size``; each tile is the
    sum of ``M`` codewords, one from each codebook, times a per-output-group scale:
    ``W[tile(o, i)] ≈ scales[o] * Σ_m codebooks[m, codes[o, i, m]]``.

    Attributes:
        codes: ``[d_out / og, d_in / ig, M]`` codebook indices (uint8 for B ≤ 8,
            uint16 for B ≤ 16).
        codebooks: ``[M, 2**B, og, ig]`` codewords.
        scales: ``[d_out / og, 1, 1, 1]`` per-output-group scales.
        codebook_bits: ``B``, bits per code.
        shape: shape of the dense leaf this array stands for.
        layout: ``"out_in"`` (PyTorch ``weight``) or ``"in_out"`` (Flax ``kernel``).
    """

    codes: jax.Array
    codebooks: jax.Array
    scales: jax.Array
    codebook_bits: int = static_field()
    shape: tuple[int, int] = static_field()
    layout: Layout = static_field("out_in")

    @property
    def num_codebooks(self) -> int:
        return self.codebooks.shape[0]

    @property
    def out_group_size(self) -> int:
        return self.codebooks.shape[2]

    @property
    def in_group_size(self) -> int:
        return self.codebooks.shape[3]

    @property
    def row_group(self) -> int:
        return self.out_group_size

    def decode_out_in(self, dtype: Any = jnp.float32) -> jax.Array:
        """Dense weight in the storage layout ``(d_out, d_in)``."""
        return decode_additive(self.codes, self.codebooks, self.scales).astype(dtype)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        m, k, og, ig = self.codebooks.shape
        return {"codes": (self.d_out // og, self.d_in // ig, m), "codebooks": (m, 2**self.codebook_bits, og, ig),
                "scales": (self.d_out // og, 1, 1, 1)}

    def decode_rows(self, start: jax.Array, n_rows: int) -> jax.Array:
        og = self.out_group_size
        codes = jax.lax.dynamic_slice_in_dim(self.codes, start // og, n_rows // og, axis=0)
        scales = jax.lax.dynamic_slice_in_dim(self.scales, start // og, n_rows // og, axis=0)
        return decode_additive(codes, self.codebooks, scales)

    @property
    def storage_bits(self) -> int:
        """Total bits stored: codes at B bits each, codebooks and scales at their dtype."""
        return (
            int(np.prod(self.codes.shape)) * self.codebook_bits
            + array_bits(self.codebooks)
            + array_bits(self.scales)
        )

    @property
    def resident_bytes(self) -> int:
        return _nbytes(self.codes) + _nbytes(self.codebooks) + _nbytes(self.scales)

    @property
    def code_widths(self) -> dict[str, int]:
        return {"codes": self.codebook_bits}

    @property
    def scheme(self) -> str:
        og, ig = self.out_group_size, self.in_group_size
        groups = f"g{ig}" if og == 1 else f"g{og}x{ig}"
        return f"aqlm {self.num_codebooks}x{self.codebook_bits} {groups}"


register_array_type(ScalarQuantized)
register_array_type(AdditiveQuantized)


def decode_additive(codes: jax.Array, codebooks: jax.Array, scales: jax.Array) -> jax.Array:
    """Decode AQLM codes to a dense ``(d_out, d_in)`` float32 weight.

    Args:
        codes: ``[n_out_groups, n_in_groups, M]`` integer codes.
        codebooks: ``[M, 2**B, og, ig]``.
        scales: ``[n_out_groups, 1, 1, 1]``.

    Returns:
        ``[n_out_groups * og, n_in_groups * ig]`` float32 weight.
    """
    n_out_groups, n_in_groups, num_codebooks = codes.shape
    _, _, og, ig = codebooks.shape
    idx = codes.astype(jnp.int32)
    tiles = jnp.zeros((n_out_groups, n_in_groups, og, ig), jnp.float32)
    for m in range(num_codebooks):  # M is small and static: an unrolled sum of gathers
        tiles = tiles + codebooks[m].astype(jnp.float32)[idx[..., m]]
    tiles = tiles * scales.astype(jnp.float32)
    # [o_groups, i_groups, og, ig] -> [o_groups, og, i_groups, ig] -> (d_out, d_in)
    return tiles.transpose(0, 2, 1, 3).reshape(n_out_groups * og, n_in_groups * ig)


def is_quantized(x: Any) -> bool:
    """True for a quantized array leaf (an instance of any ``QuantizedArray`` type)."""
    return isinstance(x, QuantizedArray)


def dequantize(tree: Any, dtype: Any = None) -> Any:
    """Replace every quantized array in ``tree`` by its dense decoding.

    Args:
        tree: any pytree (NNX state, Linen params, dict) possibly holding quantized arrays.
        dtype: dtype of the decoded arrays; float32 when ``None``.

    Returns:
        A tree of the same structure with plain arrays where quantized ones were.
    """
    dtype = jnp.float32 if dtype is None else dtype
    return jax.tree.map(
        lambda x: x.decode(dtype) if is_quantized(x) else x, tree, is_leaf=is_quantized
    )


def _is_continuous(x: Any) -> bool:
    return jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)


def split(tree: Any) -> tuple[Any, Any]:
    """Split a tree into its continuous (float) and discrete (integer) parts.

    Both outputs have the structure of ``tree`` with ``None`` where the other part's
    leaves are, so optax can be handed the continuous part directly (``None`` is an
    empty subtree to every optax transform) and ``merge`` puts them back together.

    Returns:
        ``(continuous, discrete)``.
    """
    continuous = jax.tree.map(lambda x: x if _is_continuous(x) else None, tree)
    discrete = jax.tree.map(lambda x: None if _is_continuous(x) else x, tree)
    return continuous, discrete


def merge(continuous: Any, discrete: Any) -> Any:
    """Inverse of ``split``: take each leaf from whichever part holds it."""

    def pick(a: Any, b: Any) -> Any:
        return b if a is None else a

    return jax.tree.map(pick, continuous, discrete, is_leaf=lambda x: x is None)


def tree_bits(tree: Any) -> dict[str, float]:
    """Honest size accounting of a whole tree.

    Token embeddings and output heads (paths matching ``EMBEDDING_OR_HEAD``) are counted
    on their own, quantized or not, so that ``bits_per_weight`` stays the linear layers'
    figure whatever the embeddings are stored at.

    Returns:
        ``{"quantized_weights", "quantized_bits", "bits_per_weight", "embedding_params",
        "embedding_bits", "other_params", "other_bits", "total_bytes"}``: bits per weight
        over the quantized leaves outside the embeddings and head; the embeddings' and
        head's weights and stored bits; every other leaf at its dtype; and the total
        stored bytes of all of them.
    """
    q_weights = q_bits = emb_params = emb_bits = other_params = other_bits = 0
    for path, leaf in flatten_by_path(tree)[0]:
        if is_quantized(leaf):
            n, bits = leaf.d_out * leaf.d_in, leaf.storage_bits
        elif hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            n, bits = int(np.prod(leaf.shape)), array_bits(leaf)
        else:
            continue
        if EMBEDDING_OR_HEAD.search(path):
            emb_params, emb_bits = emb_params + n, emb_bits + bits
        elif is_quantized(leaf):
            q_weights, q_bits = q_weights + n, q_bits + bits
        else:
            other_params, other_bits = other_params + n, other_bits + bits
    return {
        "quantized_weights": q_weights,
        "quantized_bits": q_bits,
        "bits_per_weight": q_bits / q_weights if q_weights else float("nan"),
        "embedding_params": emb_params,
        "embedding_bits": emb_bits,
        "other_params": other_params,
        "other_bits": other_bits,
        "total_bytes": math.ceil((q_bits + emb_bits + other_bits) / 8),
    }


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_to_str(path: Any) -> str:
    """Join a JAX key path into ``a/b/c``, dropping NNX's trailing ``value`` attribute."""
    names = [_key_name(k) for k in path]
    if names and names[-1] in ("value", "raw_value") and isinstance(path[-1], jax.tree_util.GetAttrKey):
        names = names[:-1]
    return "/".join(names)


def flatten_by_path(tree: Any) -> tuple[list[tuple[str, Any]], Any]:
    """``([(path string, leaf)], treedef)`` of ``tree``, quantized arrays as leaves."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)
    return [(path_to_str(p), leaf) for p, leaf in flat], treedef


def replace_by_path(tree: Any, new: dict[str, Any]) -> Any:
    """``tree`` with the leaves at the given path strings replaced (quantized arrays are leaves)."""
    flat, treedef = flatten_by_path(tree)
    return jax.tree_util.tree_unflatten(treedef, [new.get(p, leaf) for p, leaf in flat])


def _describe(q: QuantizedArray) -> str:
    # Arrays are summarised, never printed: a repr of a 4096x4096 layer must stay one line.
    return (
        f"{type(q).__name__}({q.scheme}, shape={tuple(q.shape)}, layout={q.layout}, "
        f"{q.bits_per_weight:.3f} bits/weight, dtype={jnp.dtype(q.dtype).name})"
    )


def map_quantized(fn: Callable[[QuantizedArray], Any], tree: Any) -> Any:
    """Apply ``fn`` to every quantized array of ``tree``, leaving other leaves alone."""
    return jax.tree.map(lambda x: fn(x) if is_quantized(x) else x, tree, is_leaf=is_quantized)


def check_layout(layout: str) -> Layout:
    if layout not in _LAYOUTS:
        raise ValueError(f"layout={layout!r} must be one of {_LAYOUTS}")
    return layout  # type: ignore[return-value]
