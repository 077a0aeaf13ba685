"""Frozen, validated quantization recipes.

A recipe is a small immutable description of *how* to quantize a weight. Recipes are
validated when constructed, so a bad configuration fails where it is written rather than
deep inside a compiled search. ``jaxquant.recipes_named`` builds them from names and
from JSON/TOML-like data.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

_PARAM_DTYPES = ("float16", "bfloat16", "float32")
# Changes of basis a recipe may quantize in (``jaxquant.rotations``); ``rotate=True`` is "hadamard".
ROTATIONS = ("none", "hadamard", "dct", "orthogonal")


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r} must be an int")
    if value < lo or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name}={value} must be {bounds}")


def _check_float(name: str, value: Any, lo: float, hi: float | None = None, *, open_lo: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name}={value!r} must be a number")
    bad_lo = value <= lo if open_lo else value < lo
    if bad_lo or (hi is not None and value > hi):
        sign = ">" if open_lo else ">="
        bounds = f"{sign} {lo}" if hi is None else f"in {'(' if open_lo else '['}{lo}, {hi}]"
        raise ValueError(f"{name}={value} must be {bounds}")


def _check_group_size(value: Any) -> None:
    if value is not None:
        _check_int("group_size", value, 1)


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r} must be a bool")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} must be one of {choices}")


def _check_rotate(recipe: Any) -> None:
    """Validate ``recipe.rotate`` and store it as one of ``ROTATIONS`` (``True`` is
    ``"hadamard"``, ``False`` is ``"none"``)."""
    value = recipe.rotate
    if isinstance(value, bool):
        value = "hadamard" if value else "none"
    _check_choice("rotate", value, ROTATIONS)
    object.__setattr__(recipe, "rotate", value)


def rotation_suffix(rotate: str) -> str:
    """The part of a recipe name that says its rotation: ``""``, ``"-rot"`` (Hadamard) or ``"-rot-dct"``."""
    return {"none": "", "hadamard": "-rot"}.get(rotate, f"-rot-{rotate}")


def _input_groups(group_size: int | None) -> tuple[tuple[str, str, int], ...]:
    return () if group_size is None else (("d_in", "group_size", group_size),)


def check_divisible(recipe: Any, d_out: int, d_in: int, path: str) -> None:
    """Raise unless the weight's dimensions divide into the recipe's groups.

    A recipe declares its groups with an optional ``divisors()`` method returning
    ``(dimension, field, size)`` pairs, ``dimension`` being ``"d_out"`` or ``"d_in"``.

    Raises:
        ValueError: naming the dimension, the recipe field and the leaf path.
    """
    sizes = {"d_out": d_out, "d_in": d_in}
    divisors = getattr(recipe, "divisors", tuple)()
    for dim, field, group in divisors:
        if sizes[dim] % group:
            name = getattr(recipe, "name", type(recipe).__name__)
            raise ValueError(f"{dim}={sizes[dim]} is not divisible by {field}={group} at {path} ({name})")


@dataclasses.dataclass(frozen=True)
class ScalarGrid:
    """What RTN and GPTQ share: ``bits`` per code on a grid per group of input columns.

    Attributes:
        bits: bits per code, 1..8.
        group_size: input columns sharing a scale; ``None`` means one group per row.
        symmetric: centred grid without a stored zero point.
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    prefix: ClassVar[str]
    # Subclasses also define clip_search, param_dtype and rotate (after their own fields,
    # so that positional arguments keep their order).

    def _check_grid(self) -> None:
        _check_int("bits", self.bits, 1, 8)
        _check_group_size(self.group_size)
        _check_bool("symmetric", self.symmetric)
        _check_bool("clip_search", self.clip_search)
        _check_choice("param_dtype", self.param_dtype, _PARAM_DTYPES)
        _check_rotate(self)

    @property
    def name(self) -> str:
        return f"{self.prefix}-{self.bits}bit-g{self.group_size or 'row'}{rotation_suffix(self.rotate)}"

    def divisors(self) -> tuple[tuple[str, str, int], ...]:
        """``(dimension, field, size)`` pairs: each dimension must be a multiple of its size."""
        return _input_groups(self.group_size)


@dataclasses.dataclass(frozen=True)
class RTN(ScalarGrid):
    """Round-to-nearest scalar quantization.

    Attributes:
        bits, group_size, symmetric: the grid (see ``ScalarGrid``).
        clip_search: shrink each group's range to the clipping ratio that minimises its
            squared rounding error instead of using the plain min/max.
        param_dtype: storage dtype of scales and zero points (counted in bits/weight).
        rotate: quantize in a randomly rotated basis (``jaxquant.rotations``): ``True`` or
            one of ``ROTATIONS``.
    """

    clip_search: bool = False
    param_dtype: str = "float16"
    rotate: bool | str = False
    prefix: ClassVar[str] = "rtn"

    def __post_init__(self) -> None:
        self._check_grid()


@dataclasses.dataclass(frozen=True)
class GPTQ(ScalarGrid):
    """GPTQ (Frantar et al., 2023): error-compensating column-by-column rounding.

    Attributes:
        bits, group_size, symmetric: the grid (see ``ScalarGrid``).
        act_order: process columns by decreasing ``diag(XᵀX)``. With groups, group
            parameters are fixed up front from the original column order ("static
            groups") so the stored layout stays contiguous.
        damp: relative damping added to ``diag(XᵀX)`` (fraction of its mean).
        block_size: columns per lazy-batch block.
        clip_search: search each group's clipping range (as in ``RTN``).
        param_dtype: storage dtype of scales and zero points.
        rotate: quantize in a randomly rotated basis (``jaxquant.rotations``): ``True`` or
            one of ``ROTATIONS``.
    """

    act_order: bool = True
    damp: float = 0.01
    block_size: int = 128
    clip_search: bool = False
    param_dtype: str = "float16"
    rotate: bool | str = False
    prefix: ClassVar[str] = "gptq"

    def __post_init__(self) -> None:
        self._check_grid()
        _check_float("damp", self.damp, 0.0, open_lo=True)
        _check_int("block_size", self.block_size, 1)
        _check_bool("act_order", self.act_order)


@dataclasses.dataclass(frozen=True)
class AQLM:
    """Additive quantization of language models (Egiazarian et al., 2024).

    Attributes:
        num_codebooks: ``M``, codewords summed per group.
        codebook_bits: ``B``; each codebook holds ``2**B`` codewords (1..16).
        group_size: input group size ``g`` (weights per codeword along ``d_in``).
        out_group_size: output rows per codeword tile (≥ 1).
        beam_size: beam width of the code search.
        max_rounds: upper bound on (beam search, codebook update) rounds.
        tolerance: stop when a round improves the relative error by less than this
            fraction.
        final_refit: after the last round's code search, run the Adam steps once more
            (codes fixed) so codebooks and scales fit the final codes; kept only if it
            lowers the error. The reference stops right after the search (``False``).
        adam_steps: Adam steps on codebooks and scales per round.
        lr: Adam learning rate.
        b1, b2: Adam moments (the paper's recipe uses β1 = 0, β2 = 0.95).
        kmeans_iters: Lloyd iterations per codebook in the residual k-means init (capped
            for 2^16-entry codebooks, see ``methods.aqlm.quantize.kmeans_iterations``).
        kmeans_max_points: subsample at most this many groups for k-means.
        chunk_rows: output groups processed at once in beam search (memory bound).
        param_dtype: storage dtype of codebooks and scales.
        grad_dtype: operand dtype of the ``(Ŵ-W)·XᵀX`` product that gives the codebook
            and scale gradients (accumulated in float32; the loss that decides when to
            stop is always float32). ``"float32"`` (the default) gives the same codes on
            every CPU. ``"bfloat16"`` is faster where the CPU multiplies bfloat16 fast (up
            to 4× with AMX). ``"auto"`` picks bfloat16 on CPUs where that product was
            measured at least 1.25× faster (once per machine, ``methods.aqlm.grad_dtype``),
            so its codes depend on the machine.
        rotate: quantize in a randomly rotated basis (``jaxquant.rotations``): ``True`` or
            one of ``ROTATIONS``.
    """

    num_codebooks: int = 2
    codebook_bits: int = 8
    group_size: int = 8
    out_group_size: int = 1
    beam_size: int = 8
    max_rounds: int = 20
    tolerance: float = 0.01
    final_refit: bool = True
    adam_steps: int = 100
    lr: float = 1e-4
    b1: float = 0.0
    b2: float = 0.95
    kmeans_iters: int = 100
    kmeans_max_points: int = 65536
    chunk_rows: int = 1024
    param_dtype: str = "float16"
    grad_dtype: str = "float32"
    rotate: bool | str = False

    def __post_init__(self) -> None:
        _check_int("num_codebooks", self.num_codebooks, 1)
        _check_int("codebook_bits", self.codebook_bits, 1, 16)
        _check_int("group_size", self.group_size, 1)
        _check_int("out_group_size", self.out_group_size, 1)
        _check_int("beam_size", self.beam_size, 1)
        _check_int("max_rounds", self.max_rounds, 0)
        _check_float("tolerance", self.tolerance, 0.0)
        _check_bool("final_refit", self.final_refit)
        _check_int("adam_steps", self.adam_steps, 0)
        _check_float("lr", self.lr, 0.0, open_lo=True)
        _check_float("b1", self.b1, 0.0, 1.0)
        _check_float("b2", self.b2, 0.0, 1.0)
        _check_int("kmeans_iters", self.kmeans_iters, 0)
        _check_int("kmeans_max_points", self.kmeans_max_points, 1)
        _check_int("chunk_rows", self.chunk_rows, 1)
        _check_choice("param_dtype", self.param_dtype, _PARAM_DTYPES)
        _check_choice("grad_dtype", self.grad_dtype, ("auto", "float32", "bfloat16"))
        _check_rotate(self)

    @property
    def name(self) -> str:
        return f"aqlm-{self.num_codebooks}x{self.codebook_bits}-g{self.group_size}{rotation_suffix(self.rotate)}"

    def divisors(self) -> tuple[tuple[str, str, int], ...]:
        """``(dimension, field, size)`` pairs: each dimension must be a multiple of its size."""
        return (*_input_groups(self.group_size), ("d_out", "out_group_size", self.out_group_size))


@dataclasses.dataclass(frozen=True)
class SpQR:
    """SpQR (Dettmers et al., 2024): GPTQ on small groups with quantized statistics and
    unstructured outliers kept apart.

    Each row's weights in a group of ``group_size`` input columns share a min/max grid
    of ``bits``. Those grids' scales and zero points are themselves quantized to
    ``stat_bits`` over groups of ``stat_group`` consecutive rows, with a float16 scale
    and zero per such group. A weight whose rounding error, scaled by GPTQ's ``U_ii``,
    exceeds ``outlier_threshold`` times the layer's mean scaled weight variance is kept
    at float16 in a sparse row-compressed part (it then passes no error on).

    The defaults aim at about 3.25 bits per weight at ``bits=3``; the paper's setting is
    ``SpQR(group_size=16, stat_group=16, outlier_threshold=0.2)`` (about 3.9 bits at 3).

    Attributes:
        bits: bits per weight code, 1..8.
        group_size: input columns sharing a first-level grid (``β1``).
        stat_bits: bits per quantized scale and zero point, 1..8.
        stat_group: consecutive rows whose scales (and zeros) share a second-level grid (``β2``).
        outlier_threshold: relative outlier threshold (``inf`` keeps no outliers).
        act_order: process columns by decreasing ``diag(XᵀX)``; groups are formed in
            that order and the permutation is stored.
        damp: relative damping added to ``diag(XᵀX)`` (fraction of its mean).
        block_size: columns per lazy-batch block (rounded to a multiple of ``group_size``).
        rotate: quantize in a randomly rotated basis (``jaxquant.rotations``): ``True`` or
            one of ``ROTATIONS``.
    """

    bits: int = 3
    group_size: int = 64
    stat_bits: int = 3
    stat_group: int = 64
    outlier_threshold: float = 4.0
    act_order: bool = True
    damp: float = 0.01
    block_size: int = 128
    rotate: bool | str = False

    def __post_init__(self) -> None:
        _check_int("bits", self.bits, 1, 8)
        _check_int("group_size", self.group_size, 2)
        _check_int("stat_bits", self.stat_bits, 1, 8)
        _check_int("stat_group", self.stat_group, 1)
        _check_float("outlier_threshold", self.outlier_threshold, 0.0, open_lo=True)
        _check_bool("act_order", self.act_order)
        _check_float("damp", self.damp, 0.0, open_lo=True)
        _check_int("block_size", self.block_size, 1)
        _check_rotate(self)

    @property
    def name(self) -> str:
        return f"spqr-{self.bits}bit-g{self.group_size}{rotation_suffix(self.rotate)}"

    def divisors(self) -> tuple[tuple[str, str, int], ...]:
        """``(dimension, field, size)`` pairs: each dimension must be a multiple of its size."""
        return (*_input_groups(self.group_size), ("d_out", "stat_group", self.stat_group))



@dataclasses.dataclass(frozen=True)
class VPTQ:
    """VPTQ (Liu et al., 2024): vector quantization with GPTQ's second-order error feedback.

    Each column of ``W`` (one input channel) is cut into vectors of ``vector_size``
    consecutive output rows. Every vector is coded by the nearest codeword of a
    ``2**codebook_bits``-entry codebook, plus, with ``residual_bits``, the nearest
    codeword of a residual codebook to what is left. Codebooks come from k-means on the
    weights' vectors, each weighted by its column's ``diag(XᵀX)`` (the reference's
    "Hessian-weighted" k-means). Columns are then coded one at a time in
    ``diag(XᵀX)``-decreasing order, each column's error spread over the columns not yet
    coded as in GPTQ. With ``normalize``, each column is divided by its RMS (stored in
    float16) before coding, so one codebook serves columns of any size. A fraction
    ``outlier_fraction`` of the columns, those with the largest ``diag(XᵀX)``, get a
    codebook of their own.

    The defaults give 2 bits of codes per weight: vectors of 8 rows, 256 codewords and 256
    residual codewords (2.28 bits per weight with the codebooks and column scales on a 512
    × 512 layer, 2.15 on SmolLM2-135M's layers; their share falls with the layer's size).
    On SmolLM2 they reach a perplexity of 22 where vectors of 4 rows and one codebook at
    2.06 bits reach 44-76 (``docs/experiments/vptq.md``).

    Attributes:
        vector_size: ``v``, output rows per vector; must divide ``d_out``.
        codebook_bits: bits per code; the codebook holds ``2**codebook_bits`` vectors (1..16).
        residual_bits: bits per residual code (0: no residual codebook).
        outlier_fraction: fraction of the input columns coded with their own codebook, in [0, 0.5].
        normalize: scale each column by its RMS before coding.
        kmeans_iters: Lloyd iterations per codebook.
        kmeans_max_points: vectors k-means is fitted on at most (a random subset).
        act_order: code columns by decreasing ``diag(XᵀX)``.
        damp: relative damping added to ``diag(XᵀX)`` (fraction of its mean).
        block_size: columns per lazy-batch block.
        param_dtype: storage dtype of codebooks and column scales.
        rotate: quantize in a randomly rotated basis (``jaxquant.rotations``): ``True`` or
            one of ``ROTATIONS``.
    """

    vector_size: int = 8
    codebook_bits: int = 8
    residual_bits: int = 8
    outlier_fraction: float = 0.0
    normalize: bool = True
    kmeans_iters: int = 50
    kmeans_max_points: int = 65536
    act_order: bool = True
    damp: float = 0.01
    block_size: int = 128
    param_dtype: str = "float16"
    rotate: bool | str = False

    def __post_init__(self) -> None:
        _check_int("vector_size", self.vector_size, 1)
        _check_int("codebook_bits", self.codebook_bits, 1, 16)
        _check_int("residual_bits", self.residual_bits, 0, 16)
        _check_float("outlier_fraction", self.outlier_fraction, 0.0, 0.5)
        _check_bool("normalize", self.normalize)
        _check_int("kmeans_iters", self.kmeans_iters, 0)
        _check_int("kmeans_max_points", self.kmeans_max_points, 1)
        _check_bool("act_order", self.act_order)
        _check_float("damp", self.damp, 0.0, open_lo=True)
        _check_int("block_size", self.block_size, 1)
        _check_choice("param_dtype", self.param_dtype, _PARAM_DTYPES)
        _check_rotate(self)

    @property
    def name(self) -> str:
        residual = f"r{self.residual_bits}" if self.residual_bits else ""
        return f"vptq-{self.vector_size}x{self.codebook_bits}{residual}{rotation_suffix(self.rotate)}"

    def divisors(self) -> tuple[tuple[str, str, int], ...]:
        """``(dimension, field, size)`` pairs: each dimension must be a multiple of its size."""
        return (("d_out", "vector_size", self.vector_size),)

@dataclasses.dataclass(frozen=True)
class Kashin:
    """Kashin quantization (Merkulov et al., "Quantization of Large Language Models with an
    Overdetermined Basis"): each row ``w`` of the weight is split as ``w = u + Qᵀ v`` with
    both factors flat (small largest entry), so each sits well on a tiny grid.

    The split is Kashin's representation by alternating truncation: ``iterations`` times,
    the part of the residual within ``±truncation · ‖residual‖₂ / √d_in`` goes to ``u``,
    then the same for ``Q`` times what is left goes to ``v``. ``u`` is then coded on a
    ``2**u_bits``-level k-means grid (per-row scale), and ``v`` is refitted to what ``u``'s
    codes left, ``Q (w − û)``, and coded on a ``2**v_bits``-level grid. ``Q`` is a fixed
    orthogonal transform with random signs (``jaxquant.rotations``). No data is used.

    Attributes:
        u_bits: bits per code of ``u`` (1..8).
        v_bits: bits per code of ``v`` (1..8).
        transform: ``Q``'s transform, one of ``ROTATIONS`` other than ``"none"``.
        iterations: truncation rounds of the split.
        truncation: ``η``, the truncation level relative to the residual's RMS.
        kmeans_iters: Lloyd iterations of each factor's grid.
        param_dtype: storage dtype of grids and per-row scales.
    """

    u_bits: int = 1
    v_bits: int = 1
    transform: str = "hadamard"
    iterations: int = 20
    truncation: float = 0.3
    kmeans_iters: int = 30
    param_dtype: str = "float16"

    def __post_init__(self) -> None:
        _check_int("u_bits", self.u_bits, 1, 8)
        _check_int("v_bits", self.v_bits, 1, 8)
        _check_choice("transform", self.transform, ROTATIONS[1:])
        _check_int("iterations", self.iterations, 1)
        _check_float("truncation", self.truncation, 0.0, open_lo=True)
        _check_int("kmeans_iters", self.kmeans_iters, 0)
        _check_choice("param_dtype", self.param_dtype, _PARAM_DTYPES)

    @property
    def name(self) -> str:
        return f"kashin-{self.u_bits}-{self.v_bits}"


@dataclasses.dataclass(frozen=True)
class PVQ:
    """Pyramid vector quantization (van der Ouderaa et al., 2024) with GPTQ's error feedback.

    Each column of ``W`` is cut into groups of ``group_size`` consecutive output rows. A
    group's direction is coded as the nearest point of the pyramid lattice ``{y ∈ Zᵈ :
    Σ|yᵢ| = pulses}`` (an implicit codebook: ``ceil(log2 |P(d, K)|)`` bits, nothing stored
    for the codebook), its amplitude on a ``2**amplitude_bits``-level grid fitted by k-means
    to the amplitudes, in units of the column's RMS (stored per column). Columns are coded
    one at a time in ``diag(XᵀX)``-decreasing order, each column's error spread over the
    columns not yet coded (the Hessian-aware variant). The weight is first rotated (random
    Hadamard on both sides, ``rotate``) so that its groups look alike.

    The defaults give 3.16 bits per weight on a 512-wide layer: 23 bits of direction and 2
    of amplitude per 8 weights, plus the column scales and signs.

    Attributes:
        group_size: ``d``, output rows per group; must divide ``d_out``.
        pulses: ``K``, the lattice's L1 radius (more pulses: finer directions, more bits).
        amplitude_bits: bits per group amplitude (1..8).
        act_order: code columns by decreasing ``diag(XᵀX)``.
        damp: relative damping added to ``diag(XᵀX)`` (fraction of its mean).
        block_size: columns per lazy-batch block.
        kmeans_iters: Lloyd iterations of the amplitude grid.
        param_dtype: storage dtype of the amplitude grid and column scales.
        rotate: the change of basis (``True`` or one of ``ROTATIONS``; ``"none"`` for none).
    """

    group_size: int = 8
    pulses: int = 14
    amplitude_bits: int = 2
    act_order: bool = True
    damp: float = 0.01
    block_size: int = 128
    kmeans_iters: int = 30
    param_dtype: str = "float16"
    rotate: bool | str = True

    def __post_init__(self) -> None:
        _check_int("group_size", self.group_size, 1, 64)
        _check_int("pulses", self.pulses, 1, 127)
        _check_int("amplitude_bits", self.amplitude_bits, 1, 8)
        _check_bool("act_order", self.act_order)
        _check_float("damp", self.damp, 0.0, open_lo=True)
        _check_int("block_size", self.block_size, 1)
        _check_int("kmeans_iters", self.kmeans_iters, 0)
        _check_choice("param_dtype", self.param_dtype, _PARAM_DTYPES)
        _check_rotate(self)

    @property
    def name(self) -> str:
        return f"pvq-{self.group_size}x{self.pulses}a{self.amplitude_bits}{rotation_suffix(self.rotate)}"

    def divisors(self) -> tuple[tuple[str, str, int], ...]:
        """``(dimension, field, size)`` pairs: each dimension must be a multiple of its size."""
        return (("d_out", "group_size", self.group_size),)


Recipe = Any  # an instance of any registered recipe type (see jaxquant.methods.register)
