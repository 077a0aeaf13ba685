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
import json
import math
import os
import shutil
import time
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
    require_positive(args, "steps", "batch_size", "micro_batches", "eval_windows", "save_every", "every", "beam_size")
    if args.seqlen is not None:
        require_positive(args, "seqlen")
    for name in ("p_lr", "v_lr"):
        require(args, name, getattr(args, name) >= 0, "must be >= 0 (0 freezes that step)")
    require(args, "eval_every", args.eval_every >= 0, "must be >= 0")
    require(args, "trust_ratio", args.trust_ratio >= 0, "must be >= 0 (0 turns it off)")
    for name in ("v_beta1", "v_beta2"):
        require(args, name, 0.0 <= getattr(args, name) < 1.0, "must be in [0, 1)")
    if args.batch_size % args.micro_batches:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by --micro-batches {args.micro_batches}")


def v_step_config(args: argparse.Namespace) -> Any:
    """The ``VStep`` the flags describe (``--trust-ratio 0``: no bound); its errors name the flags."""
    from jaxquant.finetune.pv import VStep  # noqa: PLC0415

    return with_flags(args, lambda: VStep(mode=args.mode, update_fraction=args.update_fraction,
                                          trust_ratio=args.trust_ratio or None, beam_size=args.beam_size,
                                          force_update=args.force_update, buffer_decay=args.buffer_decay))


def run(args: argparse.Namespace) -> int:
    """Run ``jaxquant finetune``; returns the exit status."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import optax  # noqa: PLC0415
    from tqdm.auto import tqdm  # noqa: PLC0415

    from jaxquant import io  # noqa: PLC0415
    from jaxquant.data import eval_windows, load_tokenizer, random_batches, read_text  # noqa: PLC0415
    from jaxquant.eval import perplexity  # noqa: PLC0415
    from jaxquant.finetune import losses, pv  # noqa: PLC0415
    from jaxquant.models.quantized_dirs import load_quantized_dir  # noqa: PLC0415
    from jaxquant.host_memory import release_freed_memory  # noqa: PLC0415
    from jaxquant.models import from_pretrained, functional  # noqa: PLC0415
    from jaxquant.models.distill import lean_distillation  # noqa: PLC0415
    from jaxquant.models.files import write_model_files  # noqa: PLC0415
    from jaxquant.pipeline.rundir import atomic_write_json  # noqa: PLC0415
    from jaxquant.qarray import dequantize, tree_bits  # noqa: PLC0415

    _check(args)
    v_step_config(args)  # bad V-step flags fail before anything loads
    config, qparams = load_quantized_dir(args.quant_dir)
    teacher = from_pretrained(args.teacher)
    if teacher.config.hidden_size != config.hidden_size or teacher.config.num_layers != config.num_layers:
        raise ValueError(f"--teacher {args.teacher!r} has a different architecture from {args.quant_dir!r}")
    apply_fn, teacher_params = functional(teacher)
    if jax.tree.structure(jax.eval_shape(dequantize, qparams)) != jax.tree.structure(teacher_params):
        raise ValueError(f"the parameters in {args.quant_dir!r} do not match the teacher's structure")
    if args.seqlen is None:
        args.seqlen = min(256, config.max_position_embeddings)
    if args.seqlen > config.max_position_embeddings:  # training and validation windows are --seqlen tokens
        raise ValueError(f"--seqlen {args.seqlen} exceeds the model's context of {config.max_position_embeddings}")
    tokenizer = load_tokenizer(args.teacher)
    train_ids = tokenizer.encode(read_text(args.text, split="train"))
    val_ids = tokenizer.encode(read_text(args.text, split="validation"))
    val = eval_windows(val_ids, args.seqlen)[: args.eval_windows].reshape(-1)

    mu_dtype = jnp.dtype(args.mu_dtype)
    tuner = pv.pv_tuning(optax.adam(args.p_lr, mu_dtype=mu_dtype),
                         pv.adam(args.v_lr, b1=args.v_beta1, b2=args.v_beta2, mu_dtype=mu_dtype),
                         v_step_config(args), every=args.every)
    mesh = losses.data_mesh()
    n_dev = mesh.shape["data"]
    shard = args.batch_size % n_dev == 0 and n_dev > 1
    # Chunked logits and scanned layers: docs/experiments/finetune_memory.md.
    kl, layout = lean_distillation(teacher)

    def step(qparams: Any, state: Any, teacher_params: Any, tokens: jax.Array) -> tuple[Any, Any, jax.Array]:
        # The teacher is an argument, not a closure: closed-over arrays become HLO constants.
        vg = pv.decoded_value_and_grad(lambda p, t: kl(p, teacher_params, t), layout=layout)
        loss, grads = losses.accumulate_gradients(vg, qparams, tokens, num_micro=args.micro_batches)
        qparams, state = tuner.update(grads, state, qparams)
        return qparams, state, loss

    # The step donates the parameters and the tuner state: their results take their place.
    step = jax.jit(step, donate_argnums=(0, 1))
    example = jnp.zeros((args.batch_size, args.seqlen), jnp.int32)
    if not shard:  # compiled before the tuner state exists, its freed heap given back
        step = step.lower(qparams, jax.eval_shape(tuner.init, qparams), teacher_params, example).compile()
        release_freed_memory()

    state = tuner.init(qparams)
    start, history = 0, []
    resume_dir = os.path.join(args.out, "resume")
    history_file = os.path.join(args.out, "history.json")
    if args.resume and io.is_checkpoint(resume_dir):
        saved = io.load(resume_dir)
        template = jax.tree_util.tree_structure(state)
        leaves = list(saved["tuner"])
        if len(leaves) != template.num_leaves:
            raise ValueError(f"{resume_dir}: tuner state has {len(leaves)} arrays, expected {template.num_leaves} "
                             "(different settings?)")
        state = jax.tree_util.tree_unflatten(template, [jnp.asarray(x) for x in leaves])
        qparams, start = saved["params"], int(saved["step"])
        with open(history_file) as f:  # written before the checkpoint: may run ahead of it
            history = [h for h in json.load(f) if h["step"] <= start]
    elif args.resume:
        raise FileNotFoundError(f"--resume: no checkpoint at {resume_dir}")
    os.makedirs(args.out, exist_ok=True)
    if shard:  # parameters and tuner state replicated, batches split: GSPMD data parallelism
        qparams, state, teacher_params = losses.replicate((qparams, state, teacher_params), mesh)

    def val_ppl(qp: Any) -> float:
        # One window per forward pass: eight windows' logits and softmax temporaries
        # (SmolLM2: about 1 GB at 256 tokens) would outgrow the training step itself.
        ppl = perplexity(apply_fn, dequantize(qp), val, args.seqlen, batch_size=1)
        release_freed_memory()
        return ppl

    def save_resume(i: int) -> None:
        atomic_write_json(history_file, history)
        io.save(resume_dir, {"params": qparams, "tuner": list(jax.tree_util.tree_leaves(state)), "step": i},
                overwrite=True, checksum=False)

    if not history:
        history.append({"step": 0, "val_ppl": val_ppl(qparams)})
    batches = random_batches(train_ids, args.batch_size, args.seqlen - 1, seed=args.seed)
    for _ in range(start):  # replay the stream so a resumed run sees the same batches
        next(batches)
    bar = tqdm(range(start, args.steps), desc=f"finetune ({args.mode})", disable=args.no_progress,
               initial=start, total=args.steps)
    loss = float("nan")
    log_every, t_loop = max(1, (args.steps - start) // 10), time.perf_counter()
    for i in bar:
        tokens = jnp.asarray(next(batches))
        if shard:
            tokens = losses.shard_batch(tokens, mesh)
        qparams, state, loss_arr = step(qparams, state, teacher_params, tokens)
        loss = float(loss_arr)
        if not math.isfinite(loss):
            raise ValueError(f"the KL loss became {loss} at step {i + 1} (learning rate too high?)")
        done = i + 1
        if args.eval_every and done % args.eval_every == 0 and done != args.steps:
            history.append({"step": done, "val_ppl": val_ppl(qparams), "kl": loss})
            bar.set_postfix(kl=f"{loss:.4f}", val_ppl=f"{history[-1]['val_ppl']:.3f}")
        if args.no_progress and (done % log_every == 0 or done == args.steps):  # a line now and then, without bars
            said = f", validation perplexity {history[-1]['val_ppl']:.4f}" if history[-1]["step"] == done else ""
            print(f"step {done}/{args.steps}: kl {loss:.4f}{said}, {time.perf_counter() - t_loop:.0f} s", flush=True)
        if done % args.save_every == 0 and done != args.steps:
            save_resume(done)
    if not history or history[-1]["step"] != args.steps:
        history.append({"step": args.steps, "val_ppl": val_ppl(qparams), "kl": loss})
    io.save(os.path.join(args.out, "params"), qparams, overwrite=True)
    if args.keep_resume:
        save_resume(args.steps)
    else:  # the finished model is in params/; the optimizer state only serves a longer run
        shutil.rmtree(resume_dir, ignore_errors=True)
        if os.path.exists(history_file):
            os.remove(history_file)
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
