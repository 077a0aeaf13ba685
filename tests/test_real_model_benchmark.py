"""The decision rule of benchmarks/real_model.py on made-up rows."""

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
