"""The main job: train a small model offline, quantize it every available way, compare.

``run_quickstart`` (the ``jaxquant quickstart`` command):

1. trains, once, a small Llama-architecture byte-level model on the built-in corpus
   (CPython's documentation) and caches it in Hugging Face format in the user cache
   directory (``quickstart-<config hash>``, written under a temporary name and renamed);
2. calibrates ``XᵀX`` on random training windows, once;
3. quantizes with every method in ``MAIN_METHODS`` (all of ``METHODS`` with
   ``--all``) and measures honest bits per weight
   (``jaxquant.tree_bits``), size, validation perplexity and seconds;
4. prints one table and writes ``results.json`` and ``perplexity_vs_bits.png``.

A method is one line of ``METHODS``: a label, a function from the layer facts (the
group size that divides every layer) to a recipe, and a kind:

- ``"oneshot"``: ``jaxquant.quantize`` of every linear layer from the full-precision
  model's ``XᵀX`` (RTN, GPTQ, AQLM);
- ``"blocks"`` / ``"blocks+ft"``: ``jaxquant.pipeline.quantize_model``, block by block on
  the inputs of the already-quantized blocks, without / with block fine-tuning;
- ``"pv"`` / ``"ste"``: global KL distillation to the full-precision model with
  ``jaxquant.pv_tuning`` (PV-Tuning, or the straight-through baseline) for
  ``QuickstartConfig.tune.steps`` steps, starting from the ``"blocks+ft"`` result of the
  same recipe (computed once per run and shared by the rows that start from it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import recipes, recipes_named
from jaxquant.methods import needs_statistics
from jaxquant.atomic_files import atomic_write_bytes
from jaxquant.data import (
    BYTE_TOKENIZER_FILE,
    ByteTokenizer,
    builtin_corpus,
    calibration_windows,
    split_text,
)
from jaxquant.eval import perplexity, unigram_perplexity
from jaxquant.finetune.block import BlockFinetuneConfig
from jaxquant.host_memory import peak_rss_mb
from jaxquant.models.config import ModelConfig
from jaxquant.models.llama import LlamaForCausalLM, functional
from jaxquant.models.loading import from_pretrained, save_pretrained
from jaxquant.qarray import tree_bits
from jaxquant.train import TrainConfig, train
from jaxquant.validate import require_positive_ints

_FORMAT_VERSION = 2  # bump when training code changes what a config produces


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """Global fine-tuning (PV-Tuning and its straight-through baseline) of the quickstart rows.

    Both modes see the same batches (same ``seed``) for the same number of ``steps``.

    Attributes:
        steps: optimizer steps.
        batch_size: training windows per step.
        seqlen: tokens per window.
        p_lr: Adam learning rate of the continuous parameters (P step).
        v_lr: Adam learning rate of the straight-through buffers (PV).
        ste_v_lr: the same for the straight-through rows, which run without buffer decay
            (the classic estimator) and need their own rate: they degrade at PV's.
        v_b1: Adam first-moment decay of the straight-through buffers (both modes).
        v_b2: Adam second-moment decay of the straight-through buffers (both modes).
        update_fraction: fraction of each layer's code groups re-encoded per V step (PV).
        trust_ratio: optional bound on a layer's ``‖ΔŴ‖_F / ‖Ŵ‖_F`` per V step (PV).
        buffer_decay: pull of the straight-through buffers back to the decoded weights
            after each V step (0 keeps them, 1 resets them).
        every: V step every this many steps.
        beam_size: beam width of the re-encoding search.
        force_update: move every selected group along its buffer (see ``VStep``; PV).
        seed: data-order seed.
    """

    steps: int = 100
    batch_size: int = 8
    seqlen: int = 256
    p_lr: float = 1e-4
    # The lowest means over 10 held-out data-order seeds at 100 steps
    # (benchmarks/results/pv_vs_straight_through.md):
    # PV 4.0990 with the V-step settings below, against 4.1025 with the earlier v_lr 5e-4
    # without trust ratio or decay; straight-through 4.1003 at 1e-3, 4.1248 at 2e-3.
    v_lr: float = 5e-3
    ste_v_lr: float = 1e-3
    v_b1: float = 0.9
    v_b2: float = 0.999
    update_fraction: float = 0.03
    trust_ratio: float | None = 0.005
    buffer_decay: float = 0.1
    every: int = 1
    beam_size: int = 8
    force_update: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        require_positive_ints(self, "steps", "batch_size", "seqlen", "every", "beam_size")
        if self.seqlen < 2:
            raise ValueError(f"seqlen={self.seqlen} must be >= 2")
        for name in ("v_b1", "v_b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)!r} must lie in [0, 1)")

    def distill_config(self, mode: str) -> Any:
        """These settings as a ``jaxquant.finetune.distillation.DistillConfig`` in ``mode`` (float32
        first moments; no evaluations inside the loop)."""
        from jaxquant.finetune.distillation import DistillConfig  # noqa: PLC0415
        from jaxquant.finetune.pv import VStep  # noqa: PLC0415

        v_step = VStep(mode=mode, update_fraction=self.update_fraction, trust_ratio=self.trust_ratio,
                       beam_size=self.beam_size, force_update=self.force_update, buffer_decay=self.buffer_decay)
        return DistillConfig(steps=self.steps, batch_size=self.batch_size, seqlen=self.seqlen, p_lr=self.p_lr,
                             v_lr=self.v_lr, v_beta1=self.v_b1, v_beta2=self.v_b2, mu_dtype="float32",
                             v_step=v_step, every=self.every, seed=self.seed, eval_every=0)

    def for_mode(self, mode: str) -> TuneConfig:
        """The settings a ``mode`` row runs with: these for ``"pv"``; for ``"ste"``, the
        classic straight-through estimator at ``ste_v_lr`` (no buffer decay)."""
        if mode == "pv":
            return self
        if mode == "ste":
            return dataclasses.replace(self, v_lr=self.ste_v_lr, buffer_decay=0.0, force_update=False)
        raise ValueError(f"mode={mode!r} must be 'pv' or 'ste'")


@dataclasses.dataclass(frozen=True)
class QuickstartConfig:
    """Everything that determines the quickstart model and its evaluation.

    Attributes:
        model: architecture (byte-level vocabulary of 256).
        train: optimisation settings.
        eval_seqlen: window length for validation perplexity.
        calib_windows: number of random training windows for calibration.
        calib_seqlen: tokens per calibration window.
        calib_batch: windows per calibration batch.
        block_finetune: block fine-tuning settings of the ``"blocks+ft"`` rows.
        tune: global fine-tuning settings of the ``"pv"``/``"ste"`` rows.
        aqlm_overrides: ``(field, value)`` pairs replaced in every AQLM recipe (the fast
            settings use fewer rounds and a narrower beam).
    """

    model: ModelConfig
    train: TrainConfig
    eval_seqlen: int = 256
    calib_windows: int = 128
    calib_seqlen: int = 256
    calib_batch: int = 16
    block_finetune: BlockFinetuneConfig = BlockFinetuneConfig(lr=1e-4, max_epochs=10)
    tune: TuneConfig = TuneConfig()
    aqlm_overrides: tuple[tuple[str, Any], ...] = ()

    def recipe(self, method: Method, group: int) -> Any:
        """``method``'s recipe for layers whose groups of ``group`` divide every ``d_in``."""
        if method.make_recipe is None:
            raise ValueError(f"Method {method.label!r} has no recipe")
        recipe = method.make_recipe(group)
        if isinstance(recipe, recipes.AQLM) and self.aqlm_overrides:
            recipe = dataclasses.replace(recipe, **dict(self.aqlm_overrides))
        return recipe


# 1.84 M parameters, 400 steps (≈ 3 minutes on a quiet 2-core machine) -> validation
# perplexity 4.02 per byte; d = 256 keeps an AQLM codebook's overhead small. Weights start
# at std 1/√d = 0.0625: the Hugging Face 0.02 leaves this small, briefly trained model far
# behind (100 steps: perplexity 8.1 at 0.02, 6.4 at 0.0625; 400 steps: 4.6 at 0.02;
# benchmarks/results/quickstart_train_sweep.json).
DEFAULT = QuickstartConfig(
    model=ModelConfig(hidden_size=256, intermediate_size=768, num_layers=2, num_heads=4, num_kv_heads=4,
                      head_dim=64, max_position_embeddings=256, vocab_size=256),
    train=TrainConfig(steps=400, batch_size=16, seqlen=256, init_std=0.0625),
    # AQLM rounds stop once one gains less than 3% (the library default is 1%): on this
    # model the later rounds cost half the AQLM time and did not lower perplexity
    # (AQLM+FT 4.066 at 3%, 4.071 at 1%: benchmarks/results/quickstart_tuning_sweep.json,
    # quickstart_tuning.json).
    aqlm_overrides=(("tolerance", 0.03),),
)
# Tiny and quick (well under a minute in all): what the tests and the notebook run.
FAST = QuickstartConfig(
    model=ModelConfig(hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4, num_kv_heads=4,
                      head_dim=16, max_position_embeddings=128, vocab_size=256),
    train=TrainConfig(steps=120, batch_size=8, seqlen=128, warmup_steps=10),
    eval_seqlen=128,
    calib_windows=32,
    calib_seqlen=128,
    calib_batch=8,
    block_finetune=BlockFinetuneConfig(lr=1e-4, max_epochs=3),
    tune=TuneConfig(steps=10, batch_size=4, seqlen=128, beam_size=4),
    aqlm_overrides=(("max_rounds", 2), ("adam_steps", 20), ("beam_size", 2), ("kmeans_iters", 10)),
)

# A byte-level Mixtral-family model (8 experts, 2 per token) for the mixture-of-experts
# benchmark (benchmarks/moe_quality.py). Its attention holds a quarter of the linear
# weights, so "attention at 4 bits, experts at 2" is exactly as many bits as uniform
# 2-bit (3.0 per weight at group 64 against 32) and uniform 3-bit (3.5: group 32 against 64).
MOE = QuickstartConfig(
    model=ModelConfig(architecture="mixtral", hidden_size=256, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=4, head_dim=64, max_position_embeddings=256, vocab_size=256, num_experts=8,
                      experts_per_token=2),
    train=TrainConfig(steps=400, batch_size=16, seqlen=256, init_std=0.0625),
)
# Its tiny counterpart, trained in about a minute: what the mixture-of-experts notebook runs
# (validation perplexity 6.6; at FAST's 120 steps and default initialisation it was 13.4
# and generated one word over and over).
MOE_FAST = QuickstartConfig(
    model=ModelConfig(architecture="mixtral", hidden_size=64, intermediate_size=64, num_layers=4, num_heads=4,
                      num_kv_heads=4, head_dim=16, max_position_embeddings=128, vocab_size=256, num_experts=8,
                      experts_per_token=2),
    train=TrainConfig(steps=300, batch_size=8, seqlen=128, warmup_steps=10, init_std=0.125),
    eval_seqlen=128,
)

KINDS = ("oneshot", "blocks", "blocks+ft", "pv", "ste")


@dataclasses.dataclass(frozen=True)
class Method:
    """One row of the comparison.

    Attributes:
        label: the row's name in the table.
        make_recipe: group size -> recipe; ``None`` for the unquantized model.
        kind: how the recipe is applied (one of ``KINDS``; see the module docstring).
    """

    label: str
    make_recipe: Callable[[int], Any] | None
    kind: str = "oneshot"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Method {self.label!r}: kind={self.kind!r} must be one of {KINDS}")
        if self.make_recipe is None and self.kind != "oneshot":
            raise ValueError(f"Method {self.label!r}: kind={self.kind!r} needs a recipe")


def _aqlm(m: int, b: int, g: int) -> Callable[[int], recipes.AQLM]:
    # AQLM's group is its own (codeword length), not the scalar methods' group of 128.
    return lambda _group: recipes.AQLM(num_codebooks=m, codebook_bits=b, group_size=g)


# One line per method. On the default model (d = 256) 1x8 g4 costs 2 code bits + 0.13 of
# codebooks + 0.05 of row scales ≈ 2.2 bits/weight: the AQLM rows to compare with 2-bit
# GPTQ g128 (2.25).
METHODS: tuple[Method, ...] = (
    Method("fp32", None),
    Method("RTN 4-bit", lambda g: recipes.RTN(bits=4, group_size=g)),
    Method("RTN 3-bit", lambda g: recipes.RTN(bits=3, group_size=g)),
    Method("RTN 2-bit", lambda g: recipes.RTN(bits=2, group_size=g)),
    Method("GPTQ 4-bit", lambda g: recipes.GPTQ(bits=4, group_size=g)),
    Method("GPTQ 3-bit", lambda g: recipes.GPTQ(bits=3, group_size=g)),
    Method("GPTQ 2-bit", lambda g: recipes.GPTQ(bits=2, group_size=g)),
    Method("AQLM 1x8 g4", _aqlm(1, 8, 4)),
    Method("AQLM 2x8 g8", _aqlm(2, 8, 8)),
    Method("AQLM-blk 1x8 g4", _aqlm(1, 8, 4), "blocks"),
    Method("AQLM+FT 1x8 g4", _aqlm(1, 8, 4), "blocks+ft"),
    Method("STE 1x8 g4", _aqlm(1, 8, 4), "ste"),
    Method("PV 1x8 g4", _aqlm(1, 8, 4), "pv"),
)


# The rows `jaxquant quickstart` computes by default: every method family at about 2 bits
# (and the scalar baselines at 2-4), within the 10-minute budget. `--all` adds the 2x8 g8
# codebooks, block-wise AQLM without fine-tuning and the straight-through baseline.
MAIN_METHODS: tuple[Method, ...] = tuple(
    m for m in METHODS if m.label not in ("AQLM 2x8 g8", "AQLM-blk 1x8 g4", "STE 1x8 g4")
)


def group_size_for(config: ModelConfig, preferred: int = 128) -> int:
    """The largest group size ≤ ``preferred`` that divides every linear layer's ``d_in``."""
    return math.gcd(preferred, config.hidden_size, config.intermediate_size, config.num_heads * config.head_dim)


def config_hash(cfg: QuickstartConfig, corpus: str) -> str:
    """A short hash of everything that determines the trained model."""
    train_settings = dataclasses.asdict(cfg.train)
    if not cfg.model.num_experts:  # a setting that cannot change a dense model leaves its cache valid
        del train_settings["router_aux_loss_coef"]
    blob = json.dumps(
        {"version": _FORMAT_VERSION, "model": dataclasses.asdict(cfg.model), "train": train_settings,
         "corpus": hashlib.sha256(corpus.encode("utf-8")).hexdigest()},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


def cache_root() -> str:
    """``$JAXQUANT_CACHE_DIR``, else ``$XDG_CACHE_HOME/jaxquant``, else ``~/.cache/jaxquant``."""
    if os.environ.get("JAXQUANT_CACHE_DIR"):
        return os.environ["JAXQUANT_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxquant")


def _is_complete(model_dir: str) -> bool:
    return all(os.path.isfile(os.path.join(model_dir, f)) for f in ("config.json", "model.safetensors", "training.json"))


def train_or_load(
    cfg: QuickstartConfig = DEFAULT, *, cache_dir: str | None = None, progress: bool = True, log: Callable[[str], None] = print
) -> tuple[LlamaForCausalLM, str, dict[str, Any]]:
    """The quickstart model: loaded from the cache, or trained and cached.

    Returns:
        ``(model, model directory, training record)``.
    """
    corpus = builtin_corpus()
    root = cache_root() if cache_dir is None else cache_dir
    model_dir = os.path.join(root, f"quickstart-{config_hash(cfg, corpus)}")
    if _is_complete(model_dir):
        log(f"Using the cached model in {model_dir}")
        with open(os.path.join(model_dir, "training.json"), encoding="utf-8") as f:
            record = json.load(f)
        return from_pretrained(model_dir), model_dir, record
    tok = ByteTokenizer()
    train_tokens = np.asarray(tok.encode(split_text(corpus)["train"]), np.int32)
    n_params = cfg.model.num_params()
    family = "Mixtral" if cfg.model.num_experts else "Llama"
    log(f"Training a {n_params / 1e6:.2f} M-parameter byte-level {family} for {cfg.train.steps} steps "
        f"(once; cached in {model_dir})")
    start = time.perf_counter()
    model, losses = train(cfg.model, train_tokens, cfg.train, progress=progress)
    seconds = time.perf_counter() - start
    record = {"steps": cfg.train.steps, "seconds": round(seconds, 2), "final_loss": float(np.mean(losses[-10:])),
              "losses": [round(x, 4) for x in losses], "num_params": n_params,
              "model": dataclasses.asdict(cfg.model), "train": dataclasses.asdict(cfg.train)}
    os.makedirs(root, exist_ok=True)
    # Write everything under a temporary name, then rename: a crash never leaves a
    # directory that looks complete.
    tmp = tempfile.mkdtemp(dir=root, prefix=".tmp-quickstart-")
    try:
        readme = (
            f"jaxquant quickstart model: a byte-level {family} trained on CPython's pydoc_data.topics.\n"
            f"Tokenizer: byte-level (token id = UTF-8 byte value, vocabulary 256, no special tokens); "
            f"see {BYTE_TOKENIZER_FILE}. transformers reads config.json and model.safetensors as a "
            f"{family}ForCausalLM; encode text with list(text.encode('utf-8')).\n"
        )
        save_pretrained(model, tmp, extra_files={BYTE_TOKENIZER_FILE: tok.note(), "README.txt": readme,
                                                 "training.json": json.dumps(record)})
        if os.path.exists(model_dir):  # an incomplete leftover
            shutil.rmtree(model_dir)
        os.replace(tmp, model_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return model, model_dir, record


def codebook_overhead(config: ModelConfig, num_codebooks: int, codebook_bits: int, group_size: int) -> float:
    """Bits per weight that float16 AQLM codebooks add over all linear layers (codes excluded)."""
    d, f, q, kv = config.hidden_size, config.intermediate_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = [(q, d), (kv, d), (kv, d), (d, q), (f, d), (f, d), (d, f)]
    weights = sum(a * b for a, b in shapes)
    cb_bits = len(shapes) * num_codebooks * 2**codebook_bits * group_size * 16
    return cb_bits / weights


def plot_results(rows: list[dict[str, Any]], path: str, title: str = "",
                 ylabel: str = "validation perplexity (per byte)", log_y: bool = False) -> None:
    """Perplexity against bits per weight, one marker series per method family (PNG)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    families: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        families.setdefault(r["method"].split()[0], []).append(r)
    for name, rs in families.items():
        rs = sorted(rs, key=lambda r: r["bits_per_weight"])
        marker = "*" if len(rs) == 1 else "o"
        ax.plot([r["bits_per_weight"] for r in rs], [r["perplexity"] for r in rs], marker=marker, label=name)
    ax.set_xlabel("bits per weight (codes + scales + codebooks)")
    ax.set_ylabel(ylabel)
    ax.set_xscale("log", base=2)
    if log_y:  # perplexities that span orders of magnitude (a collapsed 2-bit model beside float)
        ax.set_yscale("log")
    ax.set_title(title or "jaxquant quickstart")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def format_table(rows: list[dict[str, Any]]) -> str:
    """The results as a fixed-width text table."""
    width = max([18] + [len(r["method"]) + 2 for r in rows])
    head = f"{'method':<{width}}{'bits/weight':>12}{'size MB':>10}{'val ppl':>10}{'seconds':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:<{width}}{r['bits_per_weight']:>12.3f}{r['size_mb']:>10.3f}"
                     f"{r['perplexity']:>10.3f}{r['seconds']:>10.2f}")
    return "\n".join(lines)


def global_finetune(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    teacher_params: Any,
    qparams: Any,
    train_tokens: np.ndarray,
    cfg: TuneConfig,
    *,
    mode: str = "pv",
    progress: bool = False,
    desc: str = "",
    on_step: Callable[[int, Any], None] | None = None,
    loss_fn: Callable[[Any, Any, jax.Array], jax.Array] | None = None,
    layout: Any = None,
) -> tuple[Any, list[float]]:
    """PV-Tuning (``mode="pv"``) or straight-through (``"ste"``) of ``qparams`` toward the teacher.

    Args:
        apply_fn: ``apply_fn(params, tokens) -> logits`` of the model (student and teacher).
        teacher_params: the full-precision parameters.
        qparams: the quantized parameters to start from.
        train_tokens: 1-D training token ids (random windows are drawn with ``cfg.seed``,
            so both modes see the same data).
        cfg: steps, batch, learning rates, V-step settings.
        mode: ``"pv"`` or ``"ste"`` (``jaxquant.pv_tuning``'s modes).
        progress: show a progress bar.
        desc: progress bar label.
        on_step: optional ``on_step(steps_done, qparams)`` called after every step, e.g. to
            evaluate at chosen steps of one long run (the learning rates are constant, so
            the state after step k equals that of a k-step run with the same seed).
        loss_fn: ``loss_fn(params, teacher_params, tokens)``, the distillation loss if not the
            plain ``KL(teacher ‖ student)`` (``jaxquant.finetune.losses.distillation_loss``),
            e.g. ``losses.chunked_distillation_loss`` (the same value in far less memory).
        layout: the parameter layout ``loss_fn`` takes (``decoded_value_and_grad``'s), e.g.
            the ``LayerStack`` of ``jaxquant.models.distill.lean_distillation``.

    Returns:
        ``(tuned qparams, per-step KL losses)``.

    Raises:
        ValueError: a non-finite loss (learning rate too high).
    """
    from jaxquant.finetune import losses  # noqa: PLC0415
    from jaxquant.finetune.distillation import distill  # noqa: PLC0415

    if loss_fn is None:
        def loss_fn(p: Any, teacher: Any, tokens: jax.Array) -> jax.Array:
            return losses.distillation_loss(apply_fn, apply_fn, teacher)(p, tokens)

    result = distill(qparams, teacher_params, train_tokens, cfg.distill_config(mode), loss_fn, layout=layout,
                     on_step=on_step, progress=progress, desc=desc or f"tuning ({mode})")
    return result.params, result.losses


def machine_record() -> dict[str, Any]:
    """The platform, CPU count, jax version and backend, as every results file records them."""
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
            "backend": jax.default_backend()}


def run_quickstart(
    *,
    fast: bool = False,
    out_dir: str = "quickstart-results",
    cache_dir: str | None = None,
    methods: tuple[Method, ...] = MAIN_METHODS,
    config: QuickstartConfig | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train (or load) the quickstart model, quantize it with ``methods``, report.

    Args:
        fast: use the tiny ``FAST`` settings instead of ``DEFAULT``.
        out_dir: where ``results.json`` and ``perplexity_vs_bits.png`` go.
        cache_dir: model cache root (default ``cache_root()``).
        methods: rows to compute (``METHODS`` for every row).
        config: settings to use instead of ``FAST``/``DEFAULT``.
        progress: show progress bars.
        log: where human-readable lines go.

    Returns:
        The dictionary written to ``results.json``.
    """
    from jaxquant.calibrate import calibrate  # noqa: PLC0415 - heavy, only the main job needs it
    from jaxquant.pipeline import quantize_model  # noqa: PLC0415
    from jaxquant.quantize import quantize  # noqa: PLC0415

    t_all = time.perf_counter()
    cfg = config if config is not None else (FAST if fast else DEFAULT)
    os.makedirs(out_dir, exist_ok=True)
    model, model_dir, record = train_or_load(cfg, cache_dir=cache_dir, progress=progress, log=log)
    tok = ByteTokenizer()
    parts = split_text(builtin_corpus())
    train_tokens = np.asarray(tok.encode(parts["train"]), np.int32)
    val_tokens = np.asarray(tok.encode(parts["validation"]), np.int32)
    unigram = unigram_perplexity(train_tokens, val_tokens, 256)
    apply_fn, params = functional(model)
    group = group_size_for(cfg.model)
    windows = calibration_windows(train_tokens, cfg.calib_windows, cfg.calib_seqlen, seed=0)

    stats = None
    calib_seconds = 0.0
    # Block-sequential results by (kind, recipe): a tuning row starts from its recipe's
    # "blocks+ft" result, computed once whether or not that row is in `methods`.
    blockwise: dict[tuple[str, str], tuple[Any, dict[str, Any], float]] = {}

    def block_quantized(recipe: Any, finetune: bool) -> tuple[Any, dict[str, Any], float]:
        k = ("blocks+ft" if finetune else "blocks", repr(recipe))
        if k not in blockwise:
            start = time.perf_counter()
            res = quantize_model(model, windows, recipe, key=jax.random.key(0),
                                 finetune=cfg.block_finetune if finetune else None, progress=progress,
                                 batch_size=cfg.calib_batch)
            blockwise[k] = (res.params, res.summary, time.perf_counter() - start)
        return blockwise[k]

    rows: list[dict[str, Any]] = []
    for method in methods:
        extra: dict[str, Any] = {}
        if method.make_recipe is None:
            qparams, seconds, recipe_dict = params, 0.0, None
            bits = 8.0 * jnp.dtype(jax.tree.leaves(params)[0].dtype).itemsize
        else:
            recipe = cfg.recipe(method, group)
            recipe_dict = recipes_named.recipe_to_dict(recipe)
            start = time.perf_counter()
            if method.kind == "oneshot":
                needs_stats = needs_statistics(recipe)
                if needs_stats and stats is None:  # calibrate once, on first need
                    c0 = time.perf_counter()
                    batches = [jnp.asarray(windows[i : i + cfg.calib_batch])
                               for i in range(0, len(windows), cfg.calib_batch)]
                    stats = calibrate(apply_fn, params, batches)
                    jax.block_until_ready(stats)
                    calib_seconds = time.perf_counter() - c0
                    start = time.perf_counter()
                qparams = quantize(params, stats if needs_stats else None, recipe, key=jax.random.key(0))
                jax.block_until_ready(qparams)
                # Each calibrated row carries the calibration cost a user running it alone would pay.
                seconds = time.perf_counter() - start + (calib_seconds if needs_stats else 0.0)
            elif method.kind in ("blocks", "blocks+ft"):
                qparams, summary, seconds = block_quantized(recipe, method.kind == "blocks+ft")
                extra["block_rel_errors"] = summary["block_rel_errors"]
                extra["block_rel_errors_finetuned"] = summary["block_rel_errors_finetuned"]
            else:  # "pv" / "ste": global distillation from the block fine-tuned start
                start_params, _, start_seconds = block_quantized(recipe, True)
                t0 = time.perf_counter()
                tune = cfg.tune.for_mode(method.kind)
                qparams, kls = global_finetune(apply_fn, params, start_params, train_tokens, tune,
                                               mode=method.kind, progress=progress, desc=method.label)
                jax.block_until_ready(qparams)
                tune_seconds = time.perf_counter() - t0
                # The row's cost is what a user pays for it alone: the start plus the tuning.
                seconds = start_seconds + tune_seconds
                extra["tune"] = {**dataclasses.asdict(tune), "mode": method.kind, "seconds": round(tune_seconds, 2),
                                 "kl_first": kls[0], "kl_last10": float(np.mean(kls[-10:]))}
            bits = tree_bits(qparams)["bits_per_weight"]
        ppl = perplexity(apply_fn, qparams, val_tokens, cfg.eval_seqlen, batch_size=8)
        size_mb = tree_bits(qparams)["total_bytes"] / 1e6
        row = {"method": method.label, "kind": method.kind, "bits_per_weight": float(bits), "size_mb": size_mb,
               "perplexity": ppl, "seconds": round(seconds, 3), "recipe": recipe_dict,
               "peak_rss_mb": round(peak_rss_mb(), 1), **extra}
        rows.append(row)
        log(f"  {method.label:<16} {bits:6.3f} bits/weight  ppl {ppl:8.3f}  ({seconds:.1f} s)")

    results = {
        "model_dir": model_dir,
        "fast": fast,
        "model": dataclasses.asdict(cfg.model),
        "num_params": cfg.model.num_params(),
        "train": {k: v for k, v in record.items() if k != "losses"},
        "group_size": group,
        "eval": {"split": "validation", "seqlen": cfg.eval_seqlen, "tokens": int(val_tokens.size)},
        "unigram_perplexity": unigram,
        "calibration": {"windows": cfg.calib_windows, "seqlen": cfg.calib_seqlen, "seconds": round(calib_seconds, 3)},
        "block_finetune": dataclasses.asdict(cfg.block_finetune),
        "tune": dataclasses.asdict(cfg.tune),
        "aqlm_codebook_overhead_bits": {
            "2x8 g8": codebook_overhead(cfg.model, 2, 8, 8),
            "1x8 g4": codebook_overhead(cfg.model, 1, 8, 4),
            "1x8 g8": codebook_overhead(cfg.model, 1, 8, 8),
            "1x16 g8": codebook_overhead(cfg.model, 1, 16, 8),
        },
        "rows": rows,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "total_seconds": round(time.perf_counter() - t_all, 2),
        "machine": machine_record(),
    }
    atomic_write_bytes(os.path.join(out_dir, "results.json"), json.dumps(results, indent=2).encode("utf-8"))
    plot_results(rows, os.path.join(out_dir, "perplexity_vs_bits.png"),
                 title=f"{cfg.model.num_params() / 1e6:.2f} M-param byte-level Llama (unigram ppl {unigram:.1f})")
    log("")
    log(format_table(rows))
    log(f"unigram baseline perplexity: {unigram:.2f}; group size {group}; "
        f"GPTQ/AQLM seconds include calibration ({calib_seconds:.1f} s, {cfg.calib_windows} x {cfg.calib_seqlen} "
        f"tokens); PV/STE seconds include their AQLM+FT start; {cfg.tune.steps} tuning steps of "
        f"{cfg.tune.batch_size} x {cfg.tune.seqlen} tokens")
    log(f"results: {os.path.join(out_dir, 'results.json')}, plot: {os.path.join(out_dir, 'perplexity_vs_bits.png')}")
    return results
