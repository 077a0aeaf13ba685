"""The shared layer problems, the error metric, and the layer benchmark's JSON contract."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import numpy as np
import pytest

from jaxquant.problems import (
    SYNTHETIC_SALIENT_COLS,
    load_problem,
    make_random_problem,
    make_synthetic_problem,
    relative_output_error,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_synthetic_problem_matches_design_checks():
    w, x = make_synthetic_problem(0)
    assert w.shape == (512, 512) and x.shape == (4096, 512)
    assert w.dtype == np.float32 and x.dtype == np.float32
    rng = np.random.default_rng(0)
    rng.standard_normal((512, 512))
    assert np.sort(rng.choice(512, size=5, replace=False)).tolist() == list(SYNTHETIC_SALIENT_COLS) == [87, 253, 443, 454, 485]
    assert abs(float(w.sum(dtype=np.float64)) - (-5.7906)) < 1e-3
    assert abs(float(x.sum(dtype=np.float64)) - 40.70) < 0.02  # QR may differ in the last bits
    # The salient columns are the 5x-scaled ones.
    norms = np.linalg.norm(w, axis=0)
    assert set(np.argsort(norms)[-5:].tolist()) == set(SYNTHETIC_SALIENT_COLS)
    np.testing.assert_array_equal(load_problem("synthetic")[0], w)


def test_random_problem_shapes():
    w, x = make_random_problem(48, 32, 100, seed=3)
    assert w.shape == (48, 32) and x.shape == (100, 32) and w.dtype == x.dtype == np.float32
    np.testing.assert_array_equal(make_random_problem(48, 32, 100, seed=3)[0], w)


def test_relative_output_error(rng):
    w = rng.standard_normal((8, 16)).astype(np.float32)
    x = rng.standard_normal((40, 16)).astype(np.float32)
    assert relative_output_error(w, w, x) == 0.0
    assert relative_output_error(w, np.zeros_like(w), x) == pytest.approx(1.0, rel=1e-12)
    w_hat = w + 0.1 * rng.standard_normal(w.shape).astype(np.float32)
    w64, wh64, x64 = (a.astype(np.float64) for a in (w, w_hat, x))
    expected = np.sum(((w64 - wh64) @ x64.T) ** 2) / np.sum((w64 @ x64.T) ** 2)
    assert relative_output_error(w, w_hat, x) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="differ in shape"):
        relative_output_error(w, w[:, :8], x)


def test_load_problem_npz_and_errors(tmp_path, rng):
    w = rng.standard_normal((8, 16)).astype(np.float32)
    x = rng.standard_normal((20, 16)).astype(np.float32)
    np.savez(tmp_path / "ok.npz", W=w, X=x)
    w2, x2 = load_problem(tmp_path / "ok.npz")
    np.testing.assert_array_equal(w2, w)
    np.testing.assert_array_equal(x2, x)
    np.savez(tmp_path / "missing.npz", W=w)
    with pytest.raises(ValueError, match=r"missing arrays \['X'\]"):
        load_problem(tmp_path / "missing.npz")
    np.savez(tmp_path / "mismatch.npz", W=w, X=x[:, :8])
    with pytest.raises(ValueError, match="d_in=16 but X has 8 columns"):
        load_problem(tmp_path / "mismatch.npz")
    bad = x.copy()
    bad[0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", W=w, X=bad)
    with pytest.raises(ValueError, match=r"X at .*nan.npz holds NaN or Inf"):
        load_problem(tmp_path / "nan.npz")


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("quantize_layer", ROOT / "benchmarks" / "quantize_layer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layer_benchmark_contract(tmp_path, rng):
    w = rng.standard_normal((16, 64)).astype(np.float32)
    x = rng.standard_normal((256, 64)).astype(np.float32)
    np.savez(tmp_path / "p.npz", W=w, X=x)
    out = tmp_path / "r.json"
    bench = _benchmark_module()
    bench.main(["--problem", str(tmp_path / "p.npz"), "--method", "rtn", "--bits", "2", "--group-size", "32", "--out", str(out)])
    data = json.loads(out.read_text())
    for key in ("method", "config", "bits_per_weight", "rel_output_error", "seconds", "seconds_warm", "peak_rss_mb", "versions", "machine", "date"):
        assert key in data, key
    assert data["method"] == "rtn" and data["config"]["bits"] == 2 and data["config"]["group_size"] == 32
    assert data["bits_per_weight"] == 2 + 32 / 32
    assert set(data["versions"]) >= {"jax", "jaxlib", "numpy", "python"}
    assert 0.0 < data["rel_output_error"] < 1.0 and data["peak_rss_mb"] > 0
    assert not list(tmp_path.glob(".tmp_*"))  # written through a temporary name
