"""One table of every method on SmolLM2-135M at about 2, 3 and 4 bits per weight (issues 26, 27).

Reads the summaries the protocols wrote (``benchmarks/results/real_model/*summary.json``,
each from ``benchmarks/real_model.py``) and places each row by its honest bits per weight:
about 2 bits is below 2.75, about 3 below 3.75, about 4 below 4.75. A method that no summary
holds at a level shows as "not run". Rows whose name has ``-rot`` (quantized in a rotated
basis) get a line of their own. Writes Markdown.

    python benchmarks/real_model_table.py --out benchmarks/results/real_model/table_2_3_4.md
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from jaxquant.atomic_files import atomic_write_bytes

HERE = os.path.dirname(os.path.abspath(__file__))
SUMMARIES = os.path.join(HERE, "results", "real_model", "*summary.json")
LEVELS = ((2, 2.75), (3, 3.75), (4, 4.75))  # (level, bits below which a row belongs to it)
METHODS = ("rtn", "gptq", "gptq-rot", "spqr", "vptq", "aqlm", "kashin", "pvq")
LABELS = {"gptq-rot": "GPTQ + rotation", "spqr": "SpQR", "kashin": "Kashin", "pvq": "PVQ (rotated)"}


def _family(name: str) -> str:
    base = name.split("-")[0]
    return f"{base}-rot" if "-rot" in name else base


def _level(bits: float) -> int | None:
    for level, below in LEVELS:
        if bits < below:
            return level
    return None


def rows_by_cell(paths: list[str]) -> dict[tuple[str, str, int], list[dict]]:
    """``{(method, one-shot or +PV, level): [rows]}`` from the summaries, each row once."""
    seen, cells = set(), {}
    for path in sorted(paths):
        for row in json.load(open(path, encoding="utf-8"))["rows"]:
            name = row["method"]
            level = _level(row["bits_per_weight"])
            if name in seen or _family(name) not in METHODS or level is None or name.endswith("+ft"):
                continue
            seen.add(name)
            kind = "+PV" if name.endswith("+pv") else "one-shot"
            cells.setdefault((_family(name), kind, level), []).append(row)
    return cells


def _cell(rows: list[dict]) -> str:
    def one(r: dict) -> str:
        spread = f" ± {r['ppl_std']:.3f}" if r.get("ppl_std") is not None else ""
        return f"{r['ppl']:.3f}{spread} ({r['method']}, {r['bits_per_weight']:.3f} b, {len(r['seeds'])} seed{'s' if len(r['seeds']) > 1 else ''})"

    return "<br>".join(one(r) for r in sorted(rows, key=lambda r: r["bits_per_weight"])) if rows else "not run"


def table(cells: dict[tuple[str, str, int], list[dict]]) -> str:
    header = "| method | " + " | ".join(f"about {level} bits" for level, _ in LEVELS) + " |"
    lines = [header, "|---" * (len(LEVELS) + 1) + "|"]
    for method in METHODS:
        for kind in ("one-shot", "+PV"):
            line = [f"{LABELS.get(method, method.upper())} {kind}"]
            line += [_cell(cells.get((method, kind, level), [])) for level, _ in LEVELS]
            lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="Markdown file (default: print only)")
    args = p.parse_args(argv)
    paths = glob.glob(SUMMARIES)
    text = ("Validation perplexity (mean ± spread over seeds) of SmolLM2-135M, from "
            + ", ".join(os.path.relpath(x, os.path.dirname(HERE)) for x in sorted(paths)) + ".\n\n" + table(rows_by_cell(paths)))
    sys.stdout.write(text)
    if args.out:
        atomic_write_bytes(args.out, text.encode("utf-8"))
    return text


if __name__ == "__main__":
    main()
