"""``jaxquant quantize MODEL_DIR --recipe ... --calib ... --out OUT_DIR [--resume]``.

The output directory holds, besides the run's state and logs (``run.json``,
``layers.jsonl``, ``summary.json``; see ``jaxquant.pipeline.rundir``), a loadable
quantized model: ``config.json`` and the tokenizer files of ``MODEL_DIR`` plus
``params/``, a ``jaxquant.io.save`` checkpoint of the model's NNX state with quantized
kernels (``jaxquant.models.load_quantized_dir`` reads it; ``jaxquant export``
converts AQLM runs to the Hugging Face format).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from jaxquant.cli.checks import compute_dtype, require_positive


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``jaxquant quantize``."""
    p.add_argument("model_dir", help="Hugging Face model directory, .gguf file, or known model name (smollm2-135m)")
    p.add_argument("--recipe", required=True,
                   help="a name (rtn-4, gptq-3, gptq-2-g64, spqr-3, spqr-4, aqlm-2x8, aqlm-1x16, aqlm-1x8-g4, ...) or a .json/.toml file")
    p.add_argument("--calib", required=True, help="calibration text file, or 'builtin' (the built-in corpus, train split)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--out", required=True, help="output directory (new, empty, or this run's for --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (or start it)")
    p.add_argument("--finetune", action="store_true", help="fine-tune each block after quantizing it")
    p.add_argument("--finetune-lr", type=float, default=1e-4)
    p.add_argument("--finetune-epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="calibration samples per forward pass")
    p.add_argument("--offload", action="store_true", help="keep activations in memory-mapped files in --out")
    p.add_argument("--eval", default=None,
                   help="text file or 'builtin' (validation split) to report perplexity on; default: builtin "
                        "when --calib builtin, else none ('none' disables)")
    p.add_argument("--eval-windows", type=int, default=16, help="evaluation windows of --seqlen tokens")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    p.add_argument("--embed-bits", type=int, choices=(32, 16, 8), default=None,
                   help="store the token embeddings and output head at 32 (float32), 16 (float16) or 8 bits "
                        "(round-to-nearest per row); default: as the model has them")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    """Run ``jaxquant quantize``; returns the exit status."""
    import jax  # noqa: PLC0415

    from jaxquant.data import calibration_windows, eval_windows, load_tokenizer, read_text  # noqa: PLC0415
    from jaxquant.eval import perplexity  # noqa: PLC0415
    from jaxquant.finetune.block import BlockFinetuneConfig  # noqa: PLC0415
    from jaxquant.models import from_pretrained  # noqa: PLC0415
    from jaxquant.models.files import write_model_files  # noqa: PLC0415
    from jaxquant.models.blocks import LlamaBlocks  # noqa: PLC0415
    from jaxquant.pipeline.blocks import ComposedApply  # noqa: PLC0415
    from jaxquant.atomic_files import atomic_write_json  # noqa: PLC0415
    from jaxquant.pipeline.rundir import SUMMARY_FILE  # noqa: PLC0415
    from jaxquant.pipeline.run import quantize_model  # noqa: PLC0415
    from jaxquant.recipes_named import resolve_recipe_arg  # noqa: PLC0415

    recipe = resolve_recipe_arg(args.recipe)
    require_positive(args, "nsamples", "seqlen", "batch_size", "eval_windows", "finetune_epochs", "finetune_lr")
    model = from_pretrained(args.model_dir, dtype=compute_dtype(args.dtype))
    cfg = model.config
    fitted = resolve_recipe_arg(args.recipe, d_ins=(cfg.hidden_size, cfg.num_heads * cfg.head_dim,
                                                    cfg.intermediate_size))
    if fitted != recipe:
        print(f"--recipe {args.recipe}: groups of {fitted.group_size}, the largest of at most 128 that divides every "
              "layer's input width")
        recipe = fitted
    context = model.config.max_position_embeddings
    if args.seqlen > context:
        raise ValueError(f"--seqlen {args.seqlen} exceeds the model's context of {context} tokens")
    tokenizer = load_tokenizer(args.model_dir)
    text = read_text(args.calib, split="train")
    ids = tokenizer.encode(text)
    if len(ids) < args.nsamples * args.seqlen:
        raise ValueError(
            f"calibration text {args.calib!r} has {len(ids)} tokens, fewer than --nsamples {args.nsamples} x "
            f"--seqlen {args.seqlen} = {args.nsamples * args.seqlen}"
        )
    tokens = calibration_windows(ids, args.nsamples, args.seqlen, seed=args.seed)
    finetune = BlockFinetuneConfig(lr=args.finetune_lr, max_epochs=args.finetune_epochs) if args.finetune else None
    result = quantize_model(model, tokens, recipe, key=jax.random.key(args.seed), finetune=finetune,
                            out_dir=args.out, resume=args.resume, progress=not args.no_progress,
                            batch_size=args.batch_size, offload=args.offload,
                            embed_bits=args.embed_bits, log=True)
    summary = dict(result.summary)

    eval_source = args.eval if args.eval is not None else ("builtin" if args.calib == "builtin" else "none")
    if eval_source != "none":
        windows = eval_windows(tokenizer.encode(read_text(eval_source, split="validation")), args.seqlen)
        windows = windows[: args.eval_windows].reshape(-1)
        blockwise = LlamaBlocks(model)
        apply = ComposedApply(blockwise)
        summary["perplexity"] = {
            "text": eval_source,
            "windows": int(len(windows) // args.seqlen),
            "seqlen": args.seqlen,
            "full_precision": perplexity(apply, blockwise.params, windows, args.seqlen),
            "quantized": perplexity(apply, result.params, windows, args.seqlen),
        }
    summary["recipe"] = args.recipe
    atomic_write_json(os.path.join(args.out, SUMMARY_FILE), summary)
    write_model_files(args.model_dir, args.out)
    _print_summary(summary, args.out)
    return 0


def _print_summary(s: dict[str, Any], out: str) -> None:
    embed = s.get("embedding_bits_per_weight")
    lines = [
        f"quantized {s['layers']} layers in {s['blocks']} blocks ({s['recipe']}) in {s['quantize_seconds']:.1f} s",
        f"bits per weight {s['bits_per_weight']:.3f} (codes + codebooks/scales, quantized layers); "
        + ("" if embed is None else f"embeddings and head {embed:.3f} bits per weight; ")
        + f"whole model {s['total_bytes'] / 2**20:.2f} MiB",
        f"mean layer relative error {s['mean_layer_rel_error']:.4g}"
        + ("" if s.get("mean_layer_rel_error_finetuned") is None
           else f" ({s['mean_layer_rel_error_finetuned']:.4g} after fine-tuning)"),
    ]
    ppl = s.get("perplexity")
    if ppl:
        lines.append(f"perplexity on the first {ppl['windows']} windows of {ppl['seqlen']} tokens of {ppl['text']} "
                     "(validation split): "
                     f"{ppl['full_precision']:.4f} full precision -> {ppl['quantized']:.4f} quantized")
    lines.append(f"output: {out} (params/, config.json, layers.jsonl, summary.json)")
    print("\n".join(lines))


__all__ = ["configure", "run"]
