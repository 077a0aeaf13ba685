"""``jaxquant finetune QUANT_DIR --teacher MODEL_DIR --steps N --out OUT [--resume]``.

Global PV-Tuning (or straight-through, ``--mode ste``) of a quantized model against its
full-precision teacher by KL distillation on random training windows.

``QUANT_DIR`` is a quantized-model directory (what ``jaxquant quantize`` writes:
``config.json``, tokenizer files, ``params/`` checkpoint). ``OUT`` receives the same
layout (so ``jaxquant eval``-style loading and ``jaxquant export`` read it), plus
``finetune.json`` (settings and the validation-perplexity history). While it runs, ``resume/``
holds an orbax checkpoint of the quantized parameters, the tuner state and the step,
written every ``--save-every`` steps (atomically: ``jaxquant.io.save``); ``--resume``
continues from it, replaying the data stream to the same position. It is removed at the
end unless ``--keep-resume`` keeps it for a longer run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from jaxquant.cli.checks import require, require_positive, with_flags


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``jaxquant finetune``."""
    p.add_argument("quant_dir", help="quantized model directory (config.json + jaxquant checkpoint)")
    p.add_argument("--teacher", required=True,
                   help="full-precision model: Hugging Face directory, .gguf file or known model name")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--mode", default="pv", choices=["pv", "ste"], help="PV-Tuning or straight-through")
    p.add_argument("--p-lr", type=float, default=1e-4, help="Adam learning rate of the P step")
    # The V-step defaults are PV's setting for runs of hundreds of steps on the quickstart
    # model (benchmarks/results/pv_vs_straight_through.md): at 400 steps tied with the best
    # straight-through rate over 10 held-out seeds; at 200 steps below the old defaults
    # (1e-4, 1%), which moved no code.
    p.add_argument("--v-lr", type=float, default=1e-3, help="Adam learning rate of the straight-through buffers")
    # Lean by default: benchmarks/protocols/lean_v_optimizer.md (0.6 GB less on SmolLM2, no
    # loss beyond its margin); --v-beta1 0.9 --mu-dtype float32 is the earlier setting.
    p.add_argument("--v-beta1", type=float, default=0.0,
                   help="first-moment decay of the buffers' Adam; 0 keeps no first moment (the AQLM reference's "
                        "recommended --code_beta1 0)")
    p.add_argument("--v-beta2", type=float, default=0.999, help="second-moment decay of the buffers' Adam")
    p.add_argument("--mu-dtype", default="bfloat16", choices=["float32", "bfloat16"],
                   help="storage dtype of the Adam first moments (P step and buffers)")
    p.add_argument("--update-fraction", type=float, default=0.03, help="groups re-encoded per V step")
    p.add_argument("--trust-ratio", type=float, default=0.005,
                   help="bound on |dW|/|W| per layer per V step (0 turns it off)")
    p.add_argument("--buffer-decay", type=float, default=0.0,
                   help="pull of the straight-through buffers back to the decoded weights after each V step, "
                        "in [0, 1] (0 keeps them)")
    p.add_argument("--force-update", action="store_true",
                   help="PV: move every selected group one step along its buffer even when its old codes are the "
                        "nearest (use with --buffer-decay 1 and --trust-ratio)")
    p.add_argument("--every", type=int, default=1, help="V step every this many steps")
    p.add_argument("--beam-size", type=int, default=8)
    p.add_argument("--text", default="builtin", help="training text file, or 'builtin'")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--micro-batches", type=int, default=1, help="gradient accumulation steps per batch")
    p.add_argument("--seqlen", type=int, default=None,
                   help="tokens per training and validation window (default: 256, or the model's context if shorter)")
    p.add_argument("--eval-every", type=int, default=50, help="validation perplexity every N steps (0: end only)")
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--save-every", type=int, default=100, help="resume checkpoint every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/resume")
    p.add_argument("--keep-resume", action="store_true",
                   help="keep OUT/resume after the last step (parameters and optimizer state, about 20x the "
                        "model), to continue later with --resume --steps N; by default it is removed")
    p.add_argument("--no-progress", action="store_true")


def _check(args: argparse.Namespace) -> None:
    """What the flags mean beyond ``DistillConfig``'s own checks."""
    require_positive(args, "eval_windows")
    require(args, "trust_ratio", args.trust_ratio >= 0, "must be >= 0 (0 turns it off)")


def distill_config(args: argparse.Namespace) -> Any:
    """The ``DistillConfig`` the flags describe (``--trust-ratio 0``: no bound); its errors name the flags."""
    from jaxquant.finetune.distillation import DistillConfig  # noqa: PLC0415
    from jaxquant.finetune.pv import VStep  # noqa: PLC0415

    def make() -> DistillConfig:
        v_step = VStep(mode=args.mode, update_fraction=args.update_fraction, trust_ratio=args.trust_ratio or None,
                       beam_size=args.beam_size, force_update=args.force_update, buffer_decay=args.buffer_decay)
        return DistillConfig(steps=args.steps, batch_size=args.batch_size, micro_batches=args.micro_batches,
                             seqlen=args.seqlen or DistillConfig.seqlen, p_lr=args.p_lr, v_lr=args.v_lr,
                             v_beta1=args.v_beta1, v_beta2=args.v_beta2, mu_dtype=args.mu_dtype, v_step=v_step,
                             every=args.every, seed=args.seed, eval_every=args.eval_every,
                             save_every=args.save_every)

    return with_flags(args, make)


def run(args: argparse.Namespace) -> int:
    """Run ``jaxquant finetune``; returns the exit status."""
    import jax  # noqa: PLC0415

    from jaxquant import io  # noqa: PLC0415
    from jaxquant.atomic_files import atomic_write_json  # noqa: PLC0415
    from jaxquant.data import eval_windows, load_tokenizer, read_text  # noqa: PLC0415
    from jaxquant.eval import perplexity  # noqa: PLC0415
    from jaxquant.finetune.distillation import distill  # noqa: PLC0415
    from jaxquant.host_memory import release_freed_memory  # noqa: PLC0415
    from jaxquant.models import from_pretrained, functional  # noqa: PLC0415
    from jaxquant.models.distill import lean_distillation  # noqa: PLC0415
    from jaxquant.models.files import write_model_files  # noqa: PLC0415
    from jaxquant.models.quantized_dirs import load_quantized_dir  # noqa: PLC0415
    from jaxquant.qarray import dequantize, tree_bits  # noqa: PLC0415

    _check(args)
    settings = distill_config(args)  # bad flags fail before anything loads
    config, qparams = load_quantized_dir(args.quant_dir)
    teacher = from_pretrained(args.teacher)
    if teacher.config.hidden_size != config.hidden_size or teacher.config.num_layers != config.num_layers:
        raise ValueError(f"--teacher {args.teacher!r} has a different architecture from {args.quant_dir!r}")
    apply_fn, teacher_params = functional(teacher)
    if jax.tree.structure(jax.eval_shape(dequantize, qparams)) != jax.tree.structure(teacher_params):
        raise ValueError(f"the parameters in {args.quant_dir!r} do not match the teacher's structure")
    if args.seqlen is None:
        args.seqlen = min(settings.seqlen, config.max_position_embeddings)
        settings = dataclasses.replace(settings, seqlen=args.seqlen)
    if args.seqlen > config.max_position_embeddings:  # training and validation windows are --seqlen tokens
        raise ValueError(f"--seqlen {args.seqlen} exceeds the model's context of {config.max_position_embeddings}")
    tokenizer = load_tokenizer(args.teacher)
    train_ids = tokenizer.encode(read_text(args.text, split="train"))
    val_ids = tokenizer.encode(read_text(args.text, split="validation"))
    val = eval_windows(val_ids, args.seqlen)[: args.eval_windows].reshape(-1)

    kl, layout = lean_distillation(teacher)  # chunked logits, scanned layers: docs/experiments/finetune_memory.md

    def val_ppl(qp: Any) -> float:
        # One window per forward pass: eight windows' logits and softmax temporaries
        # (SmolLM2: about 1 GB at 256 tokens) would outgrow the training step itself.
        ppl = perplexity(apply_fn, dequantize(qp), val, args.seqlen, batch_size=1)
        release_freed_memory()
        return ppl

    result = distill(qparams, teacher_params, train_ids, settings, kl, layout=layout, eval_fn=val_ppl,
                     out_dir=args.out, resume=args.resume, keep_resume=args.keep_resume, donate=True,
                     progress=not args.no_progress, desc=f"finetune ({args.mode})", log=print,
                     names=("kl", "validation perplexity"))
    qparams = result.params
    history = [{"step": h["step"], "val_ppl": h["value"], **({"kl": h["loss"]} if "loss" in h else {})}
               for h in result.history]
    io.save(os.path.join(args.out, "params"), qparams, overwrite=True)
    write_model_files(args.teacher, args.out)
    teacher_ppl = perplexity(apply_fn, teacher_params, val, args.seqlen, batch_size=1)
    report = {"quant_dir": os.path.abspath(args.quant_dir), "teacher": os.path.abspath(args.teacher),
              "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
              "bits_per_weight": tree_bits(qparams)["bits_per_weight"], "teacher_val_ppl": teacher_ppl,
              "history": history}
    atomic_write_json(os.path.join(args.out, "finetune.json"), report)
    first, last = history[0]["val_ppl"], history[-1]["val_ppl"]
    print(f"validation perplexity {first:.4f} -> {last:.4f} after {args.steps} {args.mode} steps "
          f"(teacher {teacher_ppl:.4f}, {report['bits_per_weight']:.3f} bits/weight); wrote {args.out}\n"
          f"(perplexities on the first {len(val) // args.seqlen} windows of {args.seqlen} tokens of the validation "
          f"split of --text {args.text}; jaxquant eval scores a whole text)")
    return 0


__all__ = ["configure", "run"]
