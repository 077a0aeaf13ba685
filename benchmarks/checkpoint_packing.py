"""Checkpoint size with codes packed at their width, against the same checkpoints as
written before (codes a byte each).

Each ``NAME=DIR`` is an existing parameter checkpoint (``jaxquant quantize``'s
``OUT/params``, any version); it is loaded, saved again in the current format under
``--work``, and loaded back. Sizes count every file of the directory.

    python benchmarks/checkpoint_packing.py --work /tmp/packed \\
        gptq-2-g64-rot=/root/jq-evopress/levels/gptq-2-g64-rot/params ... \\
        --out benchmarks/results/real_model/checkpoint_packing.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from real_model import _dir_mb, _write_json  # noqa: E402


def _version(path: str) -> int:
    with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
        return int(json.load(f)["version"])


def measure(name: str, source: str, work: str) -> dict:
    """Sizes and load times of ``source`` and of its re-save in the current format."""
    import jax  # noqa: PLC0415

    from jaxquant import io as jio  # noqa: PLC0415
    from jaxquant.qarray import is_quantized  # noqa: PLC0415

    start = time.perf_counter()
    tree = jio.load(source)
    load_before = time.perf_counter() - start
    out = jio.save(os.path.join(work, name), tree, overwrite=True)
    start = time.perf_counter()
    back = jio.load(out)
    load_after = time.perf_counter() - start
    same = all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(back), strict=True))
    codes = [q for q in jax.tree.leaves(tree, is_leaf=is_quantized) if is_quantized(q)]
    return {"name": name, "source": source, "source_version": _version(source), "version": _version(out),
            "mb_before": _dir_mb(source), "mb_after": _dir_mb(out),
            "quantized_layers_storage_mb": round(sum(q.storage_bits for q in codes) / 8e6, 2),
            "load_seconds_before": round(load_before, 2), "load_seconds_after": round(load_after, 2),
            "bit_identical": bool(same)}


def main(argv: list[str] | None = None) -> int:
    from jaxquant.quickstart import machine_record  # noqa: PLC0415

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="NAME=DIR pairs")
    p.add_argument("--work", required=True, help="where the re-saved checkpoints go")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    rows = []
    for item in args.checkpoints:
        name, sep, source = item.partition("=")
        if not sep or not name or not os.path.isdir(source):
            p.error(f"expected NAME=DIR with an existing DIR, got {item!r}")
        rows.append(measure(name, source, args.work))
        print(json.dumps(rows[-1]), flush=True)
    _write_json(args.out, {"command": " ".join(["python", *sys.argv]), "rows": rows, "machine": machine_record()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
