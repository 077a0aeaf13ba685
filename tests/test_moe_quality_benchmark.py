"""The mixture-of-experts recipe benchmark's decision rule (benchmarks/moe_quality.py)."""

import json

import pytest

import benchmark_scripts


@pytest.fixture(scope="module")
def bench():
    return benchmark_scripts.load("moe_quality")


def test_decision_follows_the_protocol_rule(bench):
    uniform = {s: 4.2 for s in range(1, 6)}
    better = bench.decide({s: 4.1 + 0.001 * s for s in range(1, 6)}, uniform, 0.05)
    assert better["decision"] == "mixed better" and better["p_mixed_better"] == pytest.approx(1 / 32)
    assert better["mixed_lower_on"] == 5 and better["mean_diff"] < 0
    worse = bench.decide({s: 4.3 + 0.001 * s for s in range(1, 6)}, uniform, 0.05)
    assert worse["decision"] == "uniform better" and worse["p_uniform_better"] == pytest.approx(1 / 32)
    mixed_signs = bench.decide({1: 4.1, 2: 4.3, 3: 4.1, 4: 4.3, 5: 4.19}, uniform, 0.05)
    assert mixed_signs["decision"] == "undecided"
    # Three seeds can never reach 0.05 by sign flips (1/8 at best): undecided even when all agree.
    assert bench.decide({1: 4.1, 2: 4.11, 3: 4.12}, uniform, 0.05)["decision"] == "undecided"
    assert bench.decide({1: 4.1}, uniform, 0.05)["why"] == "fewer than two paired seeds"


def test_protocol_pairs_name_known_recipes(bench):
    protocol = json.loads(bench.PROTOCOL.read_text(encoding="utf-8"))
    for pair in protocol["pairs"]:
        for side in ("mixed", "uniform"):
            bench.recipe_map(pair[side])  # every name resolves
        assert bench.arm_name(pair["mixed"]) != bench.arm_name(pair["uniform"])
    assert bench.arm_name({"/attn/": "gptq-4-g64", "/experts/": "gptq-2-g64"}) == "attn gptq-4-g64 + experts gptq-2-g64"
