"""The README's API example runs as written."""

from __future__ import annotations

import contextlib
import io
import os
import re

import numpy as np

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
