"""The jaxquant command: eval and generate on a model directory; one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from jaxquant.cli import COMMANDS, Command, build_parser, main, register
from jaxquant.data import ByteTokenizer
from jaxquant.eval import perplexity
from jaxquant.models import LlamaForCausalLM, ModelConfig, functional, generate, save_pretrained

CFG = ModelConfig(hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8,
                  max_position_embeddings=32, vocab_size=256)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    model = LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))
    save_pretrained(model, path, extra_files={"jaxquant_tokenizer.json": ByteTokenizer().note()})
    return path


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxquant: error: ") and "Traceback" not in err[0]
    return err[0]


def test_eval_prints_perplexity(model_dir, tmp_path, capsys):
    text = "The quick brown fox jumps over the lazy dog. " * 4
    (tmp_path / "t.txt").write_text(text)
    assert main(["eval", str(model_dir), "--text", str(tmp_path / "t.txt"), "--seqlen", "16"]) == 0
    out = capsys.readouterr().out
    apply_fn, params = functional(LlamaForCausalLM(CFG, rngs=nnx.Rngs(0)))
    want = perplexity(apply_fn, params, ByteTokenizer().encode(text), 16)
    assert out.startswith(f"perplexity {want:.4f} over {11 * 15} predicted tokens")


def test_generate_prints_greedy_continuation(model_dir, capsys):
    assert main(["generate", str(model_dir), "--prompt", "Hello", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out.rstrip("\n")
    model = LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))
    new = generate(model, np.asarray(ByteTokenizer().encode("Hello")), 5)
    assert out == "Hello" + ByteTokenizer().decode(new)


def test_prompt_longer_than_context(model_dir, capsys):
    assert main(["generate", str(model_dir), "--prompt", "x" * 40, "--max-new-tokens", "4"]) == 1
    assert "prompt of 40 tokens plus max_new_tokens=4 exceeds the model's context of 32" in _one_error_line(capsys)


def test_empty_eval_text(model_dir, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    assert main(["eval", str(model_dir), "--text", str(tmp_path / "empty.txt")]) == 1
    assert "is empty" in _one_error_line(capsys)


def test_missing_model_and_tokenizer(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope"), "--text", "builtin"]) == 1
    assert f"model '{tmp_path / 'nope'}' does not exist; give a Hugging Face directory" in _one_error_line(capsys)
    model = LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))
    save_pretrained(model, tmp_path / "m")
    assert main(["generate", str(tmp_path / "m"), "--prompt", "hi"]) == 1
    assert "missing tokenizer" in _one_error_line(capsys)


def test_unknown_architecture_and_corrupt_weights(model_dir, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    assert main(["eval", str(bad), "--text", "builtin"]) == 1
    assert "unsupported architecture: model_type='bert'" in _one_error_line(capsys)
    (bad / "config.json").write_text(json.dumps(cfg))
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert main(["eval", str(bad), "--text", "builtin"]) == 1
    assert "truncated safetensors file" in _one_error_line(capsys)


def test_debug_shows_traceback(tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["--debug", "eval", str(tmp_path), "--text", "builtin"])
    with pytest.raises(FileNotFoundError):
        main(["eval", str(tmp_path), "--text", "builtin", "--debug"])


def test_seqlen_beyond_context(model_dir, capsys):
    assert main(["eval", str(model_dir), "--text", "builtin", "--seqlen", "64"]) == 1
    assert "--seqlen 64 exceeds the model's context of 32" in _one_error_line(capsys)


@pytest.mark.parametrize(("argv", "said"), [
    (["generate", "{m}", "--prompt", "hi", "--top-p", "7"], "--top-p 7.0 must be in (0, 1]"),
    (["generate", "{m}", "--prompt", "hi", "--max-new-tokens", "-4"], "--max-new-tokens -4 must be positive"),
    (["generate", "{m}", "--prompt", "hi", "--temperature", "-1"], "--temperature -1.0 must be >= 0"),
    (["eval", "{m}", "--text", "builtin", "--seqlen", "-3"], "--seqlen -3 must be at least 2"),
    (["quantize", "{m}", "--recipe", "rtn-4", "--calib", "builtin", "--out", "{m}/q", "--finetune-epochs", "-1"],
     "--finetune-epochs -1 must be positive"),
])
def test_errors_name_the_flags(model_dir, capsys, argv, said):
    assert main([a.format(m=model_dir) for a in argv]) == 1
    assert said in _one_error_line(capsys)


def test_quickstart_keeps_earlier_results_unless_told(tmp_path, capsys):
    (tmp_path / "results.json").write_text("{}")
    assert main(["quickstart", "--fast", "--out", str(tmp_path), "--no-progress"]) == 1
    assert f"--out {tmp_path} holds the results of an earlier run; pass --overwrite" in _one_error_line(capsys)
    assert (tmp_path / "results.json").read_text() == "{}"


def test_the_parser_loads_no_jax():
    # `jaxquant --help` must not pay for JAX, Flax and orbax (seconds); the package's
    # names are imported on first use.
    code = ("import sys, jaxquant, jaxquant.cli as c; c.build_parser(); "
            "print(sorted(m for m in ('jax', 'flax', 'orbax', 'optax') if m in sys.modules)); "
            "jaxquant.quantize; print('jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["[]", "True"]


def test_subcommands_registry():
    assert [c.name for c in COMMANDS][:3] == ["quickstart", "generate", "eval"]
    with pytest.raises(ValueError, match="already registered"):
        register(Command("eval", "", lambda p: None, lambda a: 0))
    args = build_parser().parse_args(["quickstart", "--fast", "--out", "x"])
    assert args.fast and args.out == "x" and not getattr(args, "debug", False)
    with pytest.raises(SystemExit) as e:
        main(["nonsense"])
    assert e.value.code == 2

