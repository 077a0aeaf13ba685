"""Orthogonal changes of basis for incoherence processing, and the rotated array type.

A weight ``W`` ``(d_out, d_in)`` is quantized in a rotated basis, ``W' = U W Vᵀ``, with
``U`` and ``V`` orthogonal. Rotations spread a few large weights and a few dominant input
directions over all coordinates, so a grid or codebook fitted to the rotated weight wastes
less of its range (QuIP#, QTIP and PVQ quantize this way). Nothing is lost at run time:
``x Wᵀ = (x Vᵀ) W'ᵀ U``, so ``ops.matmul`` rotates the activations, multiplies by the
quantized ``W'`` with its own kernel and rotates the result back; and the statistics the
methods minimise their output error under become ``V XᵀX Vᵀ``.

Every rotation here is ``T · diag(signs)``: random signs drawn per layer (stored as
``int8``, one bit each in the honest count) followed by a fixed orthogonal transform ``T``
of the width, one of ``ROTATIONS``:

- ``"hadamard"``: the normalised Walsh-Hadamard transform in O(n log n) for a width that
  is a power of two. A width ``n = 2^k · m`` with ``m`` odd (576 = 64 · 9, 1536 = 512 · 3)
  uses ``C_m ⊗ H_{2^k}``, the Kronecker product with the orthonormal DCT-II of size ``m``
  (no Hadamard matrix of odd order above 1 exists); its cost is ``O(n (k + m))``.
- ``"dct"``: the orthonormal DCT-II of the whole width (a dense product).
- ``"orthogonal"``: a dense orthogonal matrix drawn once per width from a fixed seed (QR of
  a Gaussian matrix), the same in every layer; the random signs make it differ per layer.

Functions act on the last axis of row vectors: ``rotate(x)`` maps each row ``r`` to
``V r`` and ``unrotate(z)`` maps ``z`` to ``Vᵀ z``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.qarray import Layout, QuantizedArray, register_array_type, static_field
from jaxquant.recipes import ROTATIONS

_ORTHOGONAL_SEED = 20241
_HIGHEST = jax.lax.Precision.HIGHEST


def _check_kind(kind: str) -> None:
    if kind not in ROTATIONS or kind == "none":
        raise ValueError(f"rotation kind={kind!r} must be one of {ROTATIONS[1:]}")


def odd_and_power_of_two(n: int) -> tuple[int, int]:
    """``(m, 2^k)`` with ``n = m · 2^k`` and ``m`` odd."""
    if n < 1:
        raise ValueError(f"a rotation needs a width >= 1, got {n}")
    p = n & -n  # the largest power of two dividing n
    return n // p, p


def walsh_hadamard(x: jax.Array) -> jax.Array:
    """Normalised Walsh-Hadamard transform of the last axis (a power of two), in Sylvester
    order: ``x @ H_n / sqrt(n)``, in ``log2(n)`` butterfly passes. It is its own inverse."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"walsh_hadamard needs a power-of-two last axis, got {n}")
    lead = x.shape[:-1]
    h = 1
    while h < n:
        pairs = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = jnp.stack([a + b, a - b], axis=-2)
        h *= 2
    return x.reshape(*lead, n) * jnp.asarray(1.0 / np.sqrt(n), x.dtype)


@functools.lru_cache(maxsize=32)
def dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix ``C`` ``(n, n)``: ``C[k, i] = a_k cos(π (2i + 1) k / 2n)``."""
    i = np.arange(n)
    c = np.cos(np.pi * (2 * i[None, :] + 1) * i[:, None] / (2 * n)) * np.sqrt(2.0 / n)
    c[0] /= np.sqrt(2.0)
    return c.astype(np.float32)


@functools.lru_cache(maxsize=32)
def orthogonal_matrix(n: int) -> np.ndarray:
    """A dense ``(n, n)`` orthogonal matrix, the same for every call with ``n`` (QR of a
    Gaussian matrix from a fixed seed, signs fixed so that it is Haar-distributed)."""
    g = np.random.default_rng(_ORTHOGONAL_SEED + n).standard_normal((n, n))
    q, r = np.linalg.qr(g)
    return (q * np.sign(np.diag(r))[None, :]).astype(np.float32)


def _left(matrix: np.ndarray, x: jax.Array) -> jax.Array:
    """Each row vector ``r`` of ``x`` (last axis) mapped to ``matrix @ r``."""
    return jnp.einsum("...j,ij->...i", x, jnp.asarray(matrix, x.dtype), precision=_HIGHEST)


def _transform(x: jax.Array, kind: str, transpose: bool) -> jax.Array:
    """``T r`` (or ``Tᵀ r``) for each row vector ``r`` of ``x``, ``T`` the fixed transform."""
    n = x.shape[-1]
    if kind == "hadamard":
        m, p = odd_and_power_of_two(n)
        if m == 1:
            return walsh_hadamard(x)
        # (C ⊗ H) vec(X) = vec(C X Hᵀ) for the row-major [m, p] view of each row.
        c = dct_matrix(m).T if transpose else dct_matrix(m)
        xm = walsh_hadamard(x.reshape(*x.shape[:-1], m, p))
        xm = jnp.einsum("ij,...jk->...ik", jnp.asarray(c, x.dtype), xm, precision=_HIGHEST)
        return xm.reshape(x.shape)
    matrix = dct_matrix(n) if kind == "dct" else orthogonal_matrix(n)
    return _left(matrix.T if transpose else matrix, x)


def rotate(x: jax.Array, signs: jax.Array, kind: str) -> jax.Array:
    """``V r = T (signs ⊙ r)`` for each row vector ``r`` of ``x`` (last axis)."""
    _check_kind(kind)
    return _transform(x * signs.astype(x.dtype), kind, transpose=False)


def unrotate(z: jax.Array, signs: jax.Array, kind: str) -> jax.Array:
    """``Vᵀ r = signs ⊙ (Tᵀ r)`` for each row vector ``r`` of ``z``: the inverse of ``rotate``."""
    _check_kind(kind)
    return _transform(z, kind, transpose=True) * signs.astype(z.dtype)


def dense_rotation(signs: jax.Array, kind: str) -> jax.Array:
    """The matrix ``V`` ``(n, n)`` of ``rotate`` (for tests and small problems)."""
    eye = jnp.eye(signs.shape[0], dtype=jnp.float32)
    return rotate(eye, signs, kind).T


def random_signs(key: jax.Array, n: int) -> jax.Array:
    """``n`` independent ±1 as ``int8``."""
    return jnp.where(jax.random.bernoulli(key, 0.5, (n,)), 1, -1).astype(jnp.int8)


@functools.partial(jax.jit, static_argnames="kind")
def rotate_weight(w: jax.Array, in_signs: jax.Array, out_signs: jax.Array, kind: str) -> jax.Array:
    """``U W Vᵀ`` for ``W`` ``(d_out, d_in)``, ``U`` from ``out_signs`` and ``V`` from ``in_signs``."""
    w_in = rotate(w, in_signs, kind)  # rows r -> V r: W Vᵀ
    return rotate(w_in.T, out_signs, kind).T  # columns c -> U c


@functools.partial(jax.jit, static_argnames="kind")
def rotate_statistics(xtx: jax.Array, signs: jax.Array, kind: str) -> jax.Array:
    """``V XᵀX Vᵀ``: the statistics of the rotated inputs ``x Vᵀ``."""
    return rotate(rotate(xtx, signs, kind).T, signs, kind).T


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, repr=False)  # repr: QuantizedArray's one-line summary
class RotatedQuantized(QuantizedArray):
    """Any quantized array, stored in a rotated basis: ``W = Uᵀ W' V`` with ``W'`` = ``inner``.

    Attributes:
        inner: the quantized ``W' = U W Vᵀ``, an ``out_in`` array of shape ``(d_out, d_in)``.
        in_signs: ``int8 [d_in]`` ±1, the random signs of ``V``.
        out_signs: ``int8 [d_out]`` ±1, the random signs of ``U``.
        kind: the fixed transform of both rotations, one of ``ROTATIONS``.
        shape: shape of the dense leaf this array stands for.
        layout: ``"out_in"`` (PyTorch ``weight``) or ``"in_out"`` (Flax ``kernel``).
    """

    inner: QuantizedArray
    in_signs: jax.Array
    out_signs: jax.Array
    kind: str = static_field()
    shape: tuple[int, int] = static_field()
    layout: Layout = static_field("out_in")

    @property
    def dtype(self) -> jnp.dtype:
        return self.inner.dtype

    @property
    def row_group(self) -> int:
        # The output rotation mixes every row: rows come only from a whole decode.
        return self.d_out

    def decode_out_in(self, dtype: Any = jnp.float32) -> jax.Array:
        """Dense weight in the storage layout ``(d_out, d_in)``: ``Uᵀ W' V``."""
        w = unrotate(self.inner.decode_out_in(jnp.float32), self.in_signs, self.kind)  # rows r -> Vᵀ r: W'V
        return unrotate(w.T, self.out_signs, self.kind).T.astype(dtype)  # columns c -> Uᵀ c

    def decode_rows(self, start: jax.Array, n_rows: int) -> jax.Array:
        return jax.lax.dynamic_slice_in_dim(self.decode_out_in(), start, n_rows, axis=0)

    def unwrap_for_matmul(self, x: jax.Array) -> tuple[jax.Array, QuantizedArray, Callable[[jax.Array], jax.Array]]:
        """``x Wᵀ = (x Vᵀ) W'ᵀ U``: the rotated activations, ``W'``, and the output rotation."""
        x_rotated = rotate(x.astype(jnp.float32), self.in_signs, self.kind)
        return x_rotated, self.inner, lambda y: unrotate(y.astype(jnp.float32), self.out_signs, self.kind)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"in_signs": (self.d_in,), "out_signs": (self.d_out,)}

    def check_shapes(self) -> None:
        super().check_shapes()
        if tuple(self.inner.shape) != (self.d_out, self.d_in) or self.inner.layout != "out_in":
            raise ValueError(f"RotatedQuantized.inner is {self.inner!r}; expected an out_in array of shape "
                             f"{(self.d_out, self.d_in)} for a weight of shape {tuple(self.shape)} ({self.layout})")
        self.inner.check_shapes()

    @property
    def storage_bits(self) -> int:
        """The inner array's bits plus one bit per stored sign."""
        return self.inner.storage_bits + self.d_in + self.d_out

    @property
    def resident_bytes(self) -> int:
        return self.inner.resident_bytes + self.d_in + self.d_out

    @property
    def scheme(self) -> str:
        return f"{self.inner.scheme} +{self.kind}"


register_array_type(RotatedQuantized)


def quantize_rotated(w: jax.Array, xtx: jax.Array | None, kind: str, key: jax.Array,
                     quantize_inner: Callable[[jax.Array, jax.Array | None, jax.Array], QuantizedArray],
                     *, layout: Layout) -> RotatedQuantized:
    """Quantize ``w`` ``(d_out, d_in)`` in a randomly rotated basis.

    Args:
        w: float32 weight in storage order.
        xtx: its ``(d_in, d_in)`` input statistics, or ``None``.
        kind: one of ``ROTATIONS`` (not ``"none"``).
        key: draws the signs of both rotations.
        quantize_inner: ``(w', xtx', key) -> out_in quantized array`` of the rotated problem.
        layout: layout of the leaf the result replaces.
    """
    _check_kind(kind)
    d_out, d_in = w.shape
    k_in, k_out, k_inner = jax.random.split(key, 3)
    in_signs, out_signs = random_signs(k_in, d_in), random_signs(k_out, d_out)
    w_rot = rotate_weight(w, in_signs, out_signs, kind)
    xtx_rot = None if xtx is None else rotate_statistics(xtx, in_signs, kind)
    inner = quantize_inner(w_rot, xtx_rot, k_inner)
    shape = (d_out, d_in) if layout == "out_in" else (d_in, d_out)
    return RotatedQuantized(inner, in_signs, out_signs, kind=kind, shape=shape, layout=layout)
