"""The paired-seed statistics of benchmarks/paired_seeds.py (issue 7's PV vs straight-through)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import benchmark_scripts


def _module():
    return benchmark_scripts.load("paired_seeds")


def test_sign_flip_p_value_small_cases():
    mod = _module()
    # All five differences positive: only the identity flip reaches the observed sum.
    assert mod.sign_flip_p_value([0.1, 0.2, 0.3, 0.4, 0.5]) == pytest.approx(1 / 32)
    # [1, -1]: flipped sums are 0, 2, -2, 0 and three of the four reach the observed 0.
    assert mod.sign_flip_p_value([1.0, -1.0]) == pytest.approx(0.75)
    assert mod.sign_flip_p_value([-0.1, -0.2, -0.3]) == pytest.approx(1.0)


def test_sign_flip_p_value_matches_brute_force_on_random_differences():
    import itertools
    import random

    mod = _module()
    rng = random.Random(0)
    for n in (1, 2, 5, 8, 11):
        diffs = [rng.gauss(0.003, 0.01) for _ in range(n)]
        diffs[-1] = diffs[0]  # a repeated magnitude makes exact ties between flipped sums
        observed = sum(diffs)
        flips = [sum(s * d for s, d in zip(signs, diffs)) for signs in itertools.product((1, -1), repeat=n)]
        brute = sum(f >= observed - 1e-12 for f in flips) / 2**n
        assert mod.sign_flip_p_value(diffs) == pytest.approx(brute, abs=1e-12), n


def test_compare_pairs_by_seed_and_reports_t():
    mod = _module()
    first = {0: 4.0, 1: 4.0, 2: 4.0, 9: 1.0}
    other = {0: 5.0, 1: 6.0, 2: 7.0, 5: 0.0}  # seeds 5 and 9 are not shared and are ignored
    res = mod.compare(first, other)
    assert res["seeds"] == [0, 1, 2]
    assert res["mean_diff"] == pytest.approx(2.0) and res["paired_sd"] == pytest.approx(1.0)
    assert res["t"] == pytest.approx(2.0 * math.sqrt(3))
    assert res["first_lower_on"] == 3 and res["sign_flip_p_one_sided"] == pytest.approx(1 / 8)
    with pytest.raises(ValueError, match="at least 2 common seeds"):
        mod.compare({0: 1.0}, {0: 2.0})


def test_main_writes_summary(tmp_path):
    mod = _module()

    def sweep(path: Path, mode: str, ppl: dict[int, float], v_lr: float) -> None:
        runs = [{"mode": "start (AQLM+FT)", "perplexity": 9.0}]
        runs += [{"mode": mode, "seed": s, "v_lr": v_lr, "perplexity": p, "codes_changed": 0.01, "seconds": 2.0}
                 for s, p in ppl.items()]
        path.write_text(json.dumps({"command": "x", "runs": runs}))

    sweep(tmp_path / "pv.json", "pv", {0: 4.0, 1: 4.1}, 3e-3)
    sweep(tmp_path / "ste.json", "ste", {0: 4.2, 1: 4.15}, 1e-3)
    out = tmp_path / "s.json"
    mod.main(["--arm", f"PV={tmp_path / 'pv.json'}:pv", "--arm", f"STE={tmp_path / 'ste.json'}:ste",
              "--out", str(out)])
    data = json.loads(out.read_text())
    cmp = data["comparisons"]["STE - PV"]
    assert cmp["diffs"] == pytest.approx([0.2, 0.05]) and cmp["first_lower_on"] == 2
    assert data["arms"]["PV"]["settings"]["v_lr"] == 3e-3 and data["arms"]["STE"]["worst"] == pytest.approx(4.2)
    with pytest.raises(ValueError, match="no runs of mode"):
        mod.load_arm(f"X={tmp_path / 'pv.json'}:ste")
    sweep(tmp_path / "pv_more.json", "pv", {2: 4.3}, 3e-3)
    _, by_seed, _ = mod.load_arm(f"PV={tmp_path / 'pv.json'},{tmp_path / 'pv_more.json'}:pv")
    assert by_seed == {0: 4.0, 1: 4.1, 2: 4.3}
    with pytest.raises(ValueError, match="a seed appears twice"):
        mod.load_arm(f"PV={tmp_path / 'pv.json'},{tmp_path / 'pv.json'}:pv")
    sweep(tmp_path / "pv_other.json", "pv", {3: 4.3}, 1e-3)
    with pytest.raises(ValueError, match="differ in v_lr"):
        mod.load_arm(f"PV={tmp_path / 'pv.json'},{tmp_path / 'pv_other.json'}:pv")
    # Settings recorded only when changed count at their defaults where absent.
    forced = tmp_path / "pv_forced.json"
    sweep(forced, "pv", {4: 4.3}, 3e-3)
    data = json.loads(forced.read_text())
    data["runs"][1]["force_update"] = True
    forced.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="differ in force_update"):
        mod.load_arm(f"PV={tmp_path / 'pv.json'},{forced}:pv")


def test_at_step_reads_the_intermediate_perplexities(tmp_path):
    mod = _module()
    runs = [{"mode": "pv", "seed": s, "v_lr": 1e-3, "steps": 400, "perplexity": 4.0 + s,
             "perplexity_at": {"100": 5.0 + s, "200": 4.5 + s}, "codes_changed": 0.01, "seconds": 2.0}
            for s in (1, 2)]
    path = tmp_path / "long.json"
    path.write_text(json.dumps({"command": "x", "runs": runs}))
    assert mod.load_arm(f"PV={path}:pv")[1] == {1: 5.0, 2: 6.0}
    assert mod.load_arm(f"PV={path}:pv", 400)[1] == {1: 5.0, 2: 6.0}
    assert mod.load_arm(f"PV={path}:pv", 200)[1] == {1: 5.5, 2: 6.5}
    with pytest.raises(ValueError, match="no perplexity after step 300"):
        mod.load_arm(f"PV={path}:pv", 300)
