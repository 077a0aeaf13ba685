"""The README's API example and its command-line example run as written."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex

import numpy as np
import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_the_api_example_runs_as_written():
    with open(README, encoding="utf-8") as f:
        example = re.search(r"```python\n(.*?)```", f.read(), re.DOTALL).group(1)
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(example, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert out.getvalue().strip() == "3.25"  # 3-bit codes + a float16 scale and zero per 128 weights
    # The swapped model computes with the quantized weights: its output is the decoded model's.
    import jax  # noqa: PLC0415

    x = namespace["batches"][0]
    dense = namespace["dense"]
    hidden = jax.nn.gelu(x @ dense["up"]["kernel"] + dense["up"]["bias"])
    want = hidden @ dense["down"]["kernel"] + dense["down"]["bias"]
    np.testing.assert_allclose(namespace["y"], want, rtol=2e-4, atol=2e-4)


def _command_block() -> list[str]:
    """The README's command-line example: one command per line, comments and ``[optional]`` parts removed."""
    with open(README, encoding="utf-8") as f:
        block = re.search(r"```bash\n(jaxquant convert.*?)```", f.read(), re.DOTALL).group(1)
    commands = []
    for line in block.splitlines():
        line = re.sub(r"\[[^\]]*\]", "", line.split("#", 1)[0]).strip()
        if line:
            commands.append(line)
    return commands


@pytest.mark.slow
def test_the_command_line_example_runs_as_written(tmp_path, monkeypatch):
    """Every command of the README's command-line example, in order, with its flags as written:
    the reference model's name stands for a small random Llama in GGUF form (with the reference's
    context of 512 tokens) and ``MODEL_DIR`` for its conversion, ``smollm2-hf/``."""
    from gguf_files import write_llama_gguf  # noqa: PLC0415

    from jaxquant.cli import main  # noqa: PLC0415

    tiny = tmp_path / "tiny.gguf"
    write_llama_gguf(tiny, tied=True, context=512)
    monkeypatch.chdir(tmp_path)
    commands = _command_block()
    assert [c.split()[1] for c in commands] == ["convert", "eval", "quantize", "finetune", "search", "eval",
                                                 "export"]
    for command in commands:
        argv = shlex.split(command.replace("smollm2-135m", str(tiny)).replace("MODEL_DIR", "smollm2-hf/"))
        assert argv[0] == "jaxquant"
        assert main(argv[1:]) == 0, command
    assert (tmp_path / "pv-hf" / "config.json").exists() and (tmp_path / "pv" / "finetune.json").exists()
    assert (tmp_path / "s" / "recipe.json").exists() and (tmp_path / "s" / "model" / "params").exists()
