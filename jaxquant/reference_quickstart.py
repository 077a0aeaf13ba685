"""The main job: SmolLM2-135M, a real pretrained Llama, quantized every main way and compared.

``run_reference_quickstart`` (``jaxquant quickstart``):

1. loads the reference model (``smollm2-135m``, the GGUF file of the ``models`` extra)
   and its tokenizer;
2. calibrates ``XᵀX`` of every linear layer once, on random windows of the built-in
   corpus's train split;
3. for each row: quantizes (GPTQ and AQLM one-shot from those statistics; PV-Tuning by
   KL distillation to the float model, starting from the AQLM row's result), then
   measures honest bits per weight, the whole model's size, seconds, peak memory, token
   perplexity on two held-out texts (the built-in validation split, and the second
   corpus ``stdlib-docs``, never used for calibration or tuning) and a greedy
   continuation of one fixed prompt;
4. prints a table and the continuations, and writes ``results.json`` and
   ``perplexity_vs_bits.png``.

Sizes were chosen by measurement to fit the whole job in 15 minutes on 2 CPU cores
(``REFERENCE``); the full-size runs behind the README's quality table are
``benchmarks/real_model.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import recipes, recipes_named
from jaxquant.methods import needs_statistics
from jaxquant.atomic_files import atomic_write_bytes
from jaxquant.data import SECOND_CORPUS, calibration_windows, eval_windows, load_tokenizer, read_text
from jaxquant.eval import perplexity
from jaxquant.host_memory import peak_rss_mb
from jaxquant.known_models import resolve_model
from jaxquant.models.distill import lean_distillation
from jaxquant.models.generate import generate
from jaxquant.models.llama import functional
from jaxquant.models.loading import from_pretrained
from jaxquant.qarray import dequantize, tree_bits
from jaxquant.quickstart import TuneConfig, global_finetune, machine_record, plot_results

KINDS = ("float", "oneshot", "pv")


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the comparison.

    Attributes:
        label: the row's name in the table.
        recipe: the quantization recipe (``None`` for the float model).
        kind: ``"float"``, ``"oneshot"`` (``jaxquant.quantize`` from the float model's
            statistics) or ``"pv"`` (PV-Tuning from the ``"oneshot"`` result of the same
            recipe, computed once and shared).
    """

    label: str
    recipe: Any = None
    kind: str = "oneshot"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Row {self.label!r}: kind={self.kind!r} must be one of {KINDS}")
        if (self.recipe is None) != (self.kind == "float"):
            raise ValueError(f"Row {self.label!r}: kind={self.kind!r} and recipe={self.recipe!r} disagree")


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
    """Sizes and settings of the main job.

    Attributes:
        model: model name or path.
        eval_seqlen: tokens per evaluation window.
        eval_windows: windows of each held-out text scored (the validation split has 11).
        calib_windows: calibration windows (train split).
        calib_seqlen: tokens per calibration window.
        calib_batch: calibration windows per forward pass.
        tune: PV-Tuning settings (steps, batch, rates).
        prompt: the prompt every row continues greedily.
        sample_tokens: tokens each continuation adds.
    """

    model: str = "smollm2-135m"
    eval_seqlen: int = 512
    eval_windows: int = 11
    calib_windows: int = 16
    calib_seqlen: int = 512
    calib_batch: int = 4
    tune: TuneConfig = TuneConfig()
    prompt: str = "The capital of France is"
    sample_tokens: int = 24


def _aqlm_2bit() -> recipes.AQLM:
    # 1 codebook of 256 codewords over groups of 4: 2 code bits, and at width 576 a
    # per-layer codebook adds only 0.03 bits/weight (2x8 g8's adds 0.13).
    return recipes.AQLM(num_codebooks=1, codebook_bits=8, group_size=4, beam_size=1, max_rounds=1, adam_steps=20,
                        kmeans_iters=10, tolerance=0.03)


ROWS: tuple[Row, ...] = (
    Row("float32", None, "float"),
    Row("RTN 4-bit g64", recipes.RTN(bits=4, group_size=64)),
    Row("RTN 3-bit g64", recipes.RTN(bits=3, group_size=64)),
    Row("RTN 2-bit g64", recipes.RTN(bits=2, group_size=64)),
    Row("GPTQ 4-bit g64", recipes.GPTQ(bits=4, group_size=64)),
    Row("GPTQ 3-bit g64", recipes.GPTQ(bits=3, group_size=64)),
    Row("GPTQ 2-bit g64", recipes.GPTQ(bits=2, group_size=64)),
    Row("AQLM 1x8 g4", _aqlm_2bit()),
    Row("AQLM 1x8 g4 + PV", _aqlm_2bit(), "pv"),
)
MAIN_ROWS: tuple[Row, ...] = tuple(r for r in ROWS if not r.label.startswith(("RTN", "GPTQ 4")))

REFERENCE = ReferenceConfig(tune=TuneConfig(steps=20, batch_size=4, seqlen=256, p_lr=1e-4, v_lr=1e-3,
                                            update_fraction=0.03, trust_ratio=0.005, buffer_decay=0.0,
                                            beam_size=4))


def _sample(model: Any, params: Any, prompt_ids: list[int], tokens: int) -> list[int]:
    new = generate(model, prompt_ids, tokens, params=params, max_length=len(prompt_ids) + tokens + 64)
    return [int(t) for t in np.asarray(new)]


def run_reference_quickstart(
    *,
    out_dir: str = "quickstart-results",
    rows: tuple[Row, ...] = MAIN_ROWS,
    config: ReferenceConfig = REFERENCE,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Quantize the reference model with every row's method and compare (see the module docstring).

    Args:
        out_dir: where ``results.json`` and ``perplexity_vs_bits.png`` go.
        rows: rows to compute (``ROWS`` for all).
        config: sizes and settings.
        progress: show progress bars.
        log: where human-readable lines go.

    Returns:
        The dictionary written to ``results.json``.
    """
    from jaxquant.calibrate import calibrate  # noqa: PLC0415 - heavy, only the main job needs it
    from jaxquant.quantize import quantize  # noqa: PLC0415

    t_all = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    model_path = resolve_model(config.model)
    log(f"Loading {config.model} ({model_path})")
    model = from_pretrained(model_path)
    tokenizer = load_tokenizer(model_path)
    apply_fn, params = functional(model)
    train_ids = np.asarray(tokenizer.encode(read_text("builtin", split="train")), np.int32)
    held_out = {
        "builtin validation": eval_windows(tokenizer.encode(read_text("builtin", split="validation")),
                                           config.eval_seqlen)[: config.eval_windows].reshape(-1),
        SECOND_CORPUS: eval_windows(tokenizer.encode(read_text(SECOND_CORPUS)),
                                    config.eval_seqlen)[: config.eval_windows].reshape(-1),
    }
    prompt_ids = tokenizer.encode(config.prompt, add_bos=False)
    calib = calibration_windows(train_ids, config.calib_windows, config.calib_seqlen, seed=0)
    log(f"{model.config.num_params() / 1e6:.1f} M parameters; calibration {config.calib_windows} x "
        f"{config.calib_seqlen} tokens; evaluation {config.eval_windows} x {config.eval_seqlen} tokens per text")

    stats = None
    calib_seconds = 0.0
    oneshot: dict[str, tuple[Any, float]] = {}  # repr(recipe) -> (quantized params, seconds)

    def quantized(recipe: Any) -> tuple[Any, float]:
        nonlocal stats, calib_seconds
        if repr(recipe) not in oneshot:
            needs_stats = needs_statistics(recipe)
            if needs_stats and stats is None:  # calibrate once, on first need
                c0 = time.perf_counter()
                stats = calibrate(apply_fn, params, [jnp.asarray(calib[i : i + config.calib_batch])
                                                     for i in range(0, len(calib), config.calib_batch)])
                jax.block_until_ready(stats)
                calib_seconds = time.perf_counter() - c0
            start = time.perf_counter()
            q = quantize(params, stats if needs_stats else None, recipe, key=jax.random.key(0), progress=progress)
            jax.block_until_ready(q)
            # Each calibrated row carries the calibration cost a user running it alone would pay.
            oneshot[repr(recipe)] = (q, time.perf_counter() - start + (calib_seconds if needs_stats else 0.0))
        return oneshot[repr(recipe)]

    results_rows: list[dict[str, Any]] = []
    for row in rows:
        extra: dict[str, Any] = {}
        if row.kind == "float":
            qparams, seconds = params, 0.0
        elif row.kind == "oneshot":
            qparams, seconds = quantized(row.recipe)
        else:
            start_params, start_seconds = quantized(row.recipe)
            t0 = time.perf_counter()
            kl, layout = lean_distillation(model)  # chunked logits, scanned layers
            qparams, kls = global_finetune(apply_fn, params, start_params, train_ids, config.tune, mode="pv",
                                           progress=progress, desc=row.label, loss_fn=kl, layout=layout)
            jax.block_until_ready(qparams)
            tune_seconds = time.perf_counter() - t0
            seconds = start_seconds + tune_seconds
            extra["tune"] = {**dataclasses.asdict(config.tune), "seconds": round(tune_seconds, 2),
                             "kl_first": kls[0], "kl_last": kls[-1]}
        # Scored on the decoded weights: the same numbers as the quantized kernels give,
        # through one compiled dense forward shared by every row.
        dense = dequantize(qparams)
        ppl = {name: perplexity(apply_fn, dense, ids, config.eval_seqlen, batch_size=2)
               for name, ids in held_out.items()}
        sample = tokenizer.decode(_sample(model, dense, prompt_ids, config.sample_tokens))
        sizes = tree_bits(qparams)
        bits = 32.0 if row.kind == "float" else sizes["bits_per_weight"]
        results_rows.append({
            "method": row.label, "kind": row.kind, "bits_per_weight": float(bits),
            "size_mb": sizes["total_bytes"] / 1e6, "ppl": ppl["builtin validation"], "ppl_second": ppl[SECOND_CORPUS],
            "seconds": round(seconds, 2), "peak_rss_mb": round(peak_rss_mb(), 1), "sample": sample,
            "recipe": None if row.recipe is None else recipes_named.recipe_to_dict(row.recipe), **extra,
        })
        log(f"  {row.label:<18} {bits:6.3f} bits/weight  ppl {ppl['builtin validation']:8.3f} / "
            f"{ppl[SECOND_CORPUS]:8.3f}  ({seconds:.1f} s)")

    results = {
        "model": config.model,
        "model_path": model_path,
        "num_params": model.config.num_params(),
        "bits_rule": "bits/weight counts the quantized linear layers only (codes + codebooks + scales, float16 "
                     "scales and codebooks); size_mb is the whole model: embeddings (tied with the head), norms "
                     "and every other unquantized tensor at its stored dtype (float32)",
        "eval": {"seqlen": config.eval_seqlen, "windows": config.eval_windows,
                 "texts": {k: int(v.size) for k, v in held_out.items()}},
        "calibration": {"windows": config.calib_windows, "seqlen": config.calib_seqlen,
                        "seconds": round(calib_seconds, 2)},
        "tune": dataclasses.asdict(config.tune),
        "prompt": config.prompt,
        "rows": results_rows,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "total_seconds": round(time.perf_counter() - t_all, 2),
        "machine": machine_record(),
    }
    atomic_write_bytes(os.path.join(out_dir, "results.json"), json.dumps(results, indent=2).encode("utf-8"))
    plot_results([{**r, "perplexity": r["ppl"]} for r in results_rows],
                 os.path.join(out_dir, "perplexity_vs_bits.png"),
                 title=f"{config.model}: held-out perplexity against bits per weight",
                 ylabel="token perplexity (built-in validation split)", log_y=True)
    log("")
    log(format_table(results_rows))
    log("")
    log(f"Greedy continuations of {config.prompt!r}:")
    for r in results_rows:
        log(f"  {r['method']:<18} {r['sample']!r}")
    log("")
    log(results["bits_rule"] + ".")
    log(f"GPTQ/AQLM seconds include calibration ({calib_seconds:.1f} s); the PV row's include its AQLM start; "
        f"{config.tune.steps} tuning steps of {config.tune.batch_size} x {config.tune.seqlen} tokens. "
        f"Total {results['total_seconds']:.0f} s.")
    log(f"results: {os.path.join(out_dir, 'results.json')}, plot: {os.path.join(out_dir, 'perplexity_vs_bits.png')}")
    return results


def format_table(rows: list[dict[str, Any]]) -> str:
    """The results as a fixed-width text table."""
    width = max([18] + [len(r["method"]) + 2 for r in rows])
    head = (f"{'method':<{width}}{'bits/weight':>12}{'size MB':>10}{'ppl val':>10}{'ppl docs':>10}{'seconds':>10}"
            f"{'peak GB':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:<{width}}{r['bits_per_weight']:>12.3f}{r['size_mb']:>10.1f}{r['ppl']:>10.3f}"
                     f"{r['ppl_second']:>10.3f}{r['seconds']:>10.1f}{r['peak_rss_mb'] / 1024:>9.2f}")
    return "\n".join(lines)


__all__ = ["MAIN_ROWS", "REFERENCE", "ROWS", "ReferenceConfig", "Row", "format_table", "run_reference_quickstart"]
