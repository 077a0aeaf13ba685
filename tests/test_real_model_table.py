"""benchmarks/real_model_table.py: rows go to the level of their honest bits, each row once."""

from __future__ import annotations

import json

import benchmark_scripts


def _row(method, bits, ppl, seeds=(0, 1), std=0.5):
    return {"method": method, "bits_per_weight": bits, "ppl": ppl, "seeds": list(seeds), "ppl_std": std}


def test_rows_are_placed_by_bits_and_missing_cells_say_so(tmp_path):
    table = benchmark_scripts.load("real_model_table")
    a = tmp_path / "summary.json"
    b = tmp_path / "other_summary.json"
    a.write_text(json.dumps({"rows": [_row("float", 32.0, 9.5, (0,), None), _row("gptq-2-g64", 2.5, 1000.0),
                                      _row("gptq-3-g64", 3.5, 14.8), _row("aqlm-2x8-g8+ft", 2.153, 19.3),
                                      _row("aqlm-2x8-g8+pv", 2.153, 13.7)]}))
    b.write_text(json.dumps({"rows": [_row("gptq-3-g64", 3.5, 14.8), _row("vptq-4x8r8", 4.06, 11.0),
                                      _row("gptq-3-g64-rot", 3.503, 12.8), _row("pvq-8x14", 3.16, 12.0)]}))
    cells = table.rows_by_cell([str(a), str(b)])
    assert [r["method"] for r in cells[("gptq", "one-shot", 3)]] == ["gptq-3-g64"]  # once, though in both files
    assert [r["method"] for r in cells[("gptq-rot", "one-shot", 3)]] == ["gptq-3-g64-rot"]  # a line of its own
    assert [r["method"] for r in cells[("pvq", "one-shot", 3)]] == ["pvq-8x14"]
    assert ("aqlm", "+PV", 2) in cells and all(k[0] != "float" for k in cells)
    assert not any(r["method"].endswith("+ft") for rows in cells.values() for r in rows)
    text = table.table(cells)
    vptq = next(line for line in text.splitlines() if line.startswith("| VPTQ one-shot"))
    assert vptq.split(" | ")[1:3] == ["not run", "not run"] and "11.000 ± 0.500 (vptq-4x8r8, 4.060 b, 2 seeds)" in vptq
    assert any(line.startswith("| GPTQ + rotation one-shot") and "12.800" in line for line in text.splitlines())
