"""The decision rule of benchmarks/real_model.py on made-up rows."""

import json

import benchmark_scripts
import pytest


@pytest.fixture(scope="module")
def bench():
    return benchmark_scripts.load("real_model")


def _row(name, ppls, random=True, bits=2.0):
    return {"method": name, "random": random, "bits_per_weight": bits,
            "per_seed": [{"seed": i, "ppl": p} for i, p in enumerate(ppls)]}


def test_compare_follows_the_protocol(bench):
    low, high = _row("a", [10.0, 10.2, 9.9]), _row("b", [12.0, 12.3, 11.8])
    step = bench.compare(low, high)
    assert step["holds"] is True and step["p"] < 0.01
    assert bench.compare(high, low)["holds"] is False
    # Overlapping seeds: the means order them, the test does not.
    close = bench.compare(_row("a", [10.0, 11.0, 9.0]), _row("b", [10.2, 11.1, 9.3]))
    assert close["mean_a"] < close["mean_b"] and close["holds"] is False and close["p"] > 0.05
    # One side without randomness: a one-sample test against its value.
    fixed = bench.compare(low, _row("rtn", [11.0], random=False))
    assert fixed["holds"] is True and fixed["p"] < 0.05
    # Neither side random: the values decide.
    assert bench.compare(_row("f", [9.5], random=False), _row("r", [12.5], random=False))["holds"] is True
    # A randomized row with one seed leaves the comparison undecided.
    assert bench.compare(_row("a", [10.0]), high)["holds"] is None


def test_summarize_chains_and_headline(bench):
    protocol = {"orderings": [["a", "b", "c"], ["a", "missing"]],
                "headline": {"left": "a", "right": "c", "max_bits": 2.3}}
    rows = {"a": _row("a", [10.0, 10.1, 9.9], bits=2.15), "b": _row("b", [12.0, 12.2, 11.9]),
            "c": _row("c", [11.0, 11.1, 10.9], bits=3.5)}
    out = bench.summarize(protocol, rows)
    assert out["orderings"][0]["holds"] is False  # b < c fails
    assert out["orderings"][1]["holds"] is None and out["orderings"][1]["missing"] == ["missing"]
    assert out["headline"]["holds"] is True
    rows["a"]["bits_per_weight"] = 2.5
    assert bench.summarize(protocol, rows)["headline"]["holds"] is False


def test_orderings_name_rows_of_other_summaries(bench):
    # Every external row of the committed protocols exists in the summary it names.
    import glob
    import os

    for path in glob.glob(os.path.join(os.path.dirname(bench.__file__), "protocols", "*_real_model.json")):
        with open(path, encoding="utf-8") as f:
            protocol = json.load(f)
        if "orderings" not in protocol:
            continue
        external = bench.external_rows(protocol)
        assert set(external) == {e["name"] for e in protocol.get("external_rows", [])}
        for name, row in external.items():
            assert row["method"] == name and len(row["per_seed"]) >= 1



def test_an_ordering_against_an_external_row_is_decided(bench, tmp_path):
    other = tmp_path / "other_summary.json"
    other.write_text(json.dumps({"rows": [_row("vptq", [22.5, 22.2, 22.9])]}))
    protocol = {"orderings": [["pvq", "vptq"]], "headline": {"left": "pvq", "right": "vptq", "max_bits": 2.2},
                "external_rows": [{"name": "vptq", "from": str(other)}]}
    out = bench.summarize(protocol, {"pvq": _row("pvq", [19.4, 19.9, 19.1], bits=2.15)})
    assert out["orderings"][0]["holds"] is True and out["orderings"][0]["steps"][0]["p"] < 0.01
    assert out["headline"]["holds"] is True
    protocol["external_rows"] = [{"name": "aqlm", "from": str(other)}]
    with pytest.raises(ValueError, match="has no row 'aqlm'"):
        bench.summarize(protocol, {})


def _search_json(seed: int, ppl: float) -> dict:
    rows = [{"name": "evopress", "average_bits": 2.495, "ppl": ppl},
            {"name": "uniform gptq-2-g64-rot", "average_bits": 2.503, "ppl": 30.0},
            {"name": "uniform gptq-2-grow-rot", "average_bits": 2.04, "ppl": 90.0},
            {"name": "error-sum greedy", "average_bits": 2.49, "ppl": 25.0}]
    return {"seed": seed, "average_bits": 2.495, "command": f"jaxquant search ... --search-seed {seed}",
            "perplexity": {"rows": rows}, "search": {"seconds": 900.0}, "level_counts": {},
            "database": {"build_seconds": 3000.0, "megabytes": 700.0}}


def test_evopress_rows_and_claims_follow_the_protocol():
    evo = benchmark_scripts.load("evopress")
    with open(evo.DEFAULT_PROTOCOL, encoding="utf-8") as f:
        protocol = json.load(f)
    cfg = next(c for c in protocol["configs"] if c["name"] == "evopress-warm-gptq-2.5")
    rows = {r["name"]: r for r in evo.rows_of(cfg, [_search_json(s, p) for s, p in ((1, 20.0), (2, 20.5), (3, 19.8))])}
    assert rows["evopress-warm-gptq-2.5"]["ppl"] == pytest.approx(20.1)
    assert rows["best uniform level within 2.5 (gptq levels)"]["level"] == "uniform gptq-2-g64-rot"
    assert rows["error-sum greedy 2.5 (gptq levels)"]["ppl"] == 25.0
    claims = {(c["left"], c["right"]): c for c in evo.summarize(protocol, rows)}
    decided = claims[("evopress-warm-gptq-2.5", "best uniform level within 2.5 (gptq levels)")]
    assert decided["holds"] is True and decided["p"] < 0.05
    assert claims[("evopress-warm-gptq-3.0", "uniform gptq-3-g64 (no rotation)")]["holds"] is None
    held = next(c for c in protocol["configs"] if c["name"] == "evopress-held-gptq-2.5")
    cmd = " ".join(evo.command(held, protocol, 1, "/work"))
    assert "--fixed-windows --start heuristics --holdout-windows 24 --holdout-checkpoints 8" in cmd
    assert "--holdout" not in " ".join(evo.command(cfg, protocol, 1, "/work"))
    # Every claim names rows that the protocol's configurations or external rows produce.
    names = {r["name"] for r in protocol["external_rows"]} | {c["name"] for c in protocol["configs"]}
    names |= {f"{kind} {c['budget']} ({c['levels']} levels)" for c in protocol["configs"]
              for kind in ("error-sum greedy", "best uniform level within")}
    for c in protocol["claims"]:
        assert c["left"] in names and (c["right"] in names or c["right"].startswith("uniform ")), c
