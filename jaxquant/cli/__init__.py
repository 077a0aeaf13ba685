"""The ``jaxquant`` command (also ``python -m jaxquant``): thin commands over library functions.

``quantize``, ``search`` and ``finetune`` live in ``cli/quantize.py``, ``cli/search.py``
and ``cli/finetune.py``, the smaller commands here. Subcommands are registered in ``COMMANDS``: each is a ``Command``
holding a name, a help line, a function that adds its arguments to an ``argparse``
parser, and a function that runs it from the parsed arguments and returns an exit
status. A new command is those two functions and one ``register`` call.

Errors a user can cause (bad paths, bad settings, bad files) print one line,
``jaxquant: error: ...``, and exit with status 1; ``--debug`` shows the traceback.
Heavy imports (JAX, transformers) happen inside the run functions so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from jaxquant.cli.checks import compute_dtype, require, require_positive

# Exception types that mean "the input was bad", reported as one line.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, FileNotFoundError, NotADirectoryError,
                                                  PermissionError, OSError, KeyError, ImportError)


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand: ``configure(parser)`` adds arguments, ``run(args) -> exit status``."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: list[Command] = []


def register(command: Command) -> Command:
    """Add a subcommand (names must be unique)."""
    if any(c.name == command.name for c in COMMANDS):
        raise ValueError(f"subcommand {command.name!r} is already registered")
    COMMANDS.append(command)
    return command


# ----------------------------------------------------------------------------- quickstart


def _configure_quickstart(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fast", action="store_true",
                   help="a tiny model trained here instead of SmolLM2 (under a minute; for tests and tutorials)")
    p.add_argument("--toy", action="store_true",
                   help="the quickstart model trained here (1.8 M parameters, about 10 minutes) instead of SmolLM2")
    p.add_argument("--out", default="quickstart-results", help="directory for results.json and the plot")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --out")
    p.add_argument("--cache-dir", default=None, help="toy model cache (default: ~/.cache/jaxquant)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--all", action="store_true",
                   help="also RTN 2-4 bit and GPTQ 4-bit (with --fast/--toy: the extra AQLM rows and straight-through)")


def _run_quickstart(args: argparse.Namespace) -> int:
    if args.fast and args.toy:
        raise ValueError("--fast and --toy each pick a trained toy model; give one")
    if os.path.exists(os.path.join(args.out, "results.json")) and not args.overwrite:
        raise ValueError(f"--out {args.out} holds the results of an earlier run; pass --overwrite to replace them, "
                         "or choose another --out")
    if args.fast or args.toy:
        from jaxquant.quickstart import MAIN_METHODS, METHODS, run_quickstart  # noqa: PLC0415

        run_quickstart(fast=args.fast, out_dir=args.out, cache_dir=args.cache_dir, progress=not args.no_progress,
                       methods=METHODS if args.all else MAIN_METHODS)
        return 0
    from jaxquant.reference_quickstart import MAIN_ROWS, ROWS, run_reference_quickstart  # noqa: PLC0415

    run_reference_quickstart(out_dir=args.out, rows=ROWS if args.all else MAIN_ROWS, progress=not args.no_progress)
    return 0


# ----------------------------------------------------------------------------- generate


def _configure_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="Hugging Face model directory, .gguf file, or known model name (smollm2-135m)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16")


def _run_generate(args: argparse.Namespace) -> int:
    import jax  # noqa: PLC0415

    from jaxquant.data import load_tokenizer  # noqa: PLC0415
    from jaxquant.models import from_pretrained, generate  # noqa: PLC0415

    require_positive(args, "max_new_tokens")
    require(args, "temperature", args.temperature >= 0, "must be >= 0 (0 is greedy)")
    require(args, "top_p", 0.0 < args.top_p <= 1.0, "must be in (0, 1]")
    dtype = compute_dtype(args.dtype)
    tokenizer = load_tokenizer(args.model_dir)
    model = from_pretrained(args.model_dir, dtype=dtype)
    prompt = tokenizer.encode(args.prompt, add_bos=True)
    if not prompt:
        raise ValueError("--prompt is empty")
    stream = _TextStream(tokenizer, args.prompt)
    new = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   key=jax.random.PRNGKey(args.seed), on_token=stream.add)
    stream.finish(tokenizer.decode(new))
    return 0


class _TextStream:
    """Prints a continuation as its tokens arrive: the text decoded so far, less what is
    already printed, held back while it ends inside a multi-byte character."""

    def __init__(self, tokenizer: Any, prompt: str) -> None:
        self.tokenizer, self.ids, self.printed = tokenizer, [], ""
        sys.stdout.write(prompt)
        sys.stdout.flush()

    def add(self, tokens: Any) -> None:
        self.ids.append(int(tokens[0]))
        self._show(self.tokenizer.decode(self.ids))

    def _show(self, text: str) -> None:
        if text.startswith(self.printed) and not text.endswith("\ufffd"):
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text

    def finish(self, text: str) -> None:
        if not text.startswith(self.printed):  # a decoding that changed earlier text: say it whole
            sys.stdout.write("\n" + text)
        else:
            sys.stdout.write(text[len(self.printed):])
        sys.stdout.write("\n")
        sys.stdout.flush()


# ----------------------------------------------------------------------------- eval


def _configure_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="Hugging Face model directory, .gguf file, or known model name (smollm2-135m)")
    p.add_argument("--text", required=True,
                   help="a UTF-8 text file, 'builtin' for the built-in corpus, or 'stdlib-docs' for the second corpus")
    p.add_argument("--split", default="validation", help="built-in corpus split: train, validation or test")
    p.add_argument("--seqlen", type=int, default=None, help="window length (default: the model's context, <= 2048)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _run_eval(args: argparse.Namespace) -> int:
    from jaxquant.data import load_tokenizer, read_text  # noqa: PLC0415
    from jaxquant.eval import perplexity  # noqa: PLC0415
    from jaxquant.models import from_pretrained, functional  # noqa: PLC0415

    require_positive(args, "batch_size")
    if args.seqlen is not None:
        require(args, "seqlen", args.seqlen >= 2, "must be at least 2 (a window predicts its tokens after the first)")
    dtype = compute_dtype(args.dtype)
    tokenizer = load_tokenizer(args.model_dir)
    model = from_pretrained(args.model_dir, dtype=dtype)
    context = model.config.max_position_embeddings
    seqlen = min(context, 2048) if args.seqlen is None else args.seqlen
    if seqlen > context:
        raise ValueError(f"--seqlen {seqlen} exceeds the model's context of {context} tokens")
    text = read_text(args.text, split=args.split)
    tokens = tokenizer.encode(text)
    apply_fn, params = functional(model)
    ppl = perplexity(apply_fn, params, tokens, seqlen, batch_size=args.batch_size, progress=not args.no_progress)
    windows = len(tokens) // seqlen
    print(f"perplexity {ppl:.4f} over {windows * (seqlen - 1)} predicted tokens "
          f"({windows} windows of {seqlen}, {len(tokens)} tokens in the text)")
    return 0


# ----------------------------------------------------------------------------- convert


def _configure_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=".gguf file, known model name (smollm2-135m) or Hugging Face directory")
    p.add_argument("--out", required=True, help="new Hugging Face model directory")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _run_convert(args: argparse.Namespace) -> int:
    from jaxquant.models.files import convert  # noqa: PLC0415

    out = convert(args.model, args.out, dtype=compute_dtype(args.dtype), overwrite=args.overwrite)
    print(f"wrote {out} ({', '.join(sorted(os.listdir(out)))})")
    return 0


register(Command("quickstart", "quantize SmolLM2-135M every main way and compare (--fast: a tiny toy model)",
                 _configure_quickstart, _run_quickstart))
register(Command("generate", "continue a prompt with a model", _configure_generate, _run_generate))
register(Command("eval", "perplexity of a model on a text", _configure_eval, _run_eval))
register(Command("convert", "write a GGUF file (or any model source) as a Hugging Face directory",
                 _configure_convert, _run_convert))


def _in_module(name: str) -> tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]:
    """``(configure, run)`` of the command in ``jaxquant/cli/<name>.py``, imported when called
    (so ``--help`` of the other commands does not import it)."""

    def configure(p: argparse.ArgumentParser) -> None:
        importlib.import_module(f"jaxquant.cli.{name}").configure(p)

    def run(args: argparse.Namespace) -> int:
        return importlib.import_module(f"jaxquant.cli.{name}").run(args)

    return configure, run


register(Command("quantize", "quantize a model block by block (resumable)", *_in_module("quantize")))


register(Command("search", "per-layer mixed precision by evolutionary search under a bits budget (EvoPress)",
                 *_in_module("search")))


register(Command("finetune", "PV-Tuning of a quantized model against its teacher (resumable)",
                 *_in_module("finetune")))


# --format -> (exporter in jaxquant.models.quantized_dirs, the layers it writes)
_EXPORTERS = {"hf-aqlm": ("export_hf_aqlm", "AQLM"), "hf-vptq": ("export_hf_vptq", "VPTQ")}


def _configure_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("quant_dir", help="quantized model directory (config.json + jaxquant checkpoint)")
    p.add_argument("--format", default="hf-aqlm", choices=sorted(_EXPORTERS),
                   help="output format: hf-aqlm (AQLM layers, transformers + aqlm), hf-vptq (VPTQ layers, "
                   "transformers + vptq)")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--max-shard-mb", type=int, default=None, help="shard the safetensors above this size")


def _run_export(args: argparse.Namespace) -> int:
    import jax  # noqa: PLC0415

    from jaxquant.models import quantized_dirs  # noqa: PLC0415
    from jaxquant.qarray import is_quantized  # noqa: PLC0415

    if os.path.exists(args.out) and not args.overwrite:
        raise FileExistsError(f"export: --out {args.out} already exists; pass --overwrite to replace it")
    exporter, kind = _EXPORTERS[args.format]
    config, state = quantized_dirs.load_quantized_dir(args.quant_dir)
    out = getattr(quantized_dirs, exporter)(
        state, args.out, config=config, tokenizer_dir=args.quant_dir, overwrite=args.overwrite,
        max_shard_bytes=None if args.max_shard_mb is None else args.max_shard_mb * 2**20)
    leaves = jax.tree.leaves(state, is_leaf=is_quantized)
    n_q = sum(1 for t in leaves if is_quantized(t))
    print(f"exported {n_q} {kind} layers and {len(leaves) - n_q} dense tensors to {out}")
    return 0


register(Command("export", "write a quantized model in the Hugging Face AQLM or VPTQ format", _configure_export,
                 _run_export))


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's absent --debug must not overwrite one given before it.
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback on errors")
    parser = argparse.ArgumentParser(prog="jaxquant", description="1-4 bit quantization of language models in JAX",
                                     parents=[common])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help, parents=[common])
        command.configure(p)
        p.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jaxquant`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print("jaxquant: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if debug:
            raise
        message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"jaxquant: error: {message.splitlines()[0] if message else type(e).__name__}", file=sys.stderr)
        return 1
