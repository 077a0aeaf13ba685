"""benchmarks/device_timer.py: reading device time per candidate out of a profiler trace."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import benchmark_scripts


def _module():
    return benchmark_scripts.load("device_timer")


def _meta(pid, name, tid=None):
    event = {"ph": "M", "pid": pid, "name": "process_name" if tid is None else "thread_name", "args": {"name": name}}
    if tid is not None:
        event["tid"] = tid
    return event


def _span(pid, tid, ts, dur, name, **args):
    return {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "name": name, "args": args}


def _synthetic_trace():
    """A GPU trace in the shape jax writes: host annotations, a stream line, a derived line."""
    return [
        _meta(1, "/host:CPU"), _meta(7, "/device:GPU:0"),
        _meta(7, "Stream #14(Compute)", tid=14), _meta(7, "XLA Ops", tid=99),
        _span(1, 5, 100.0, 50.0, "A", long_name="cand:A"),
        _span(1, 5, 200.0, 50.0, "B", long_name="cand:B"),
        # A: two calls of one kernel (3 and 5 us) and a memset per call.
        _span(7, 14, 110.0, 3.0, "kern_a"), _span(7, 14, 120.0, 5.0, "kern_a"),
        _span(7, 14, 115.0, 1.0, "Memset 3"), _span(7, 14, 126.0, 1.0, "Memset 3"),
        _span(7, 99, 110.0, 3.0, "fusion"),  # derived line: must not count twice
        _span(7, 14, 112.0, 40.0, "MemcpyHtoD"),  # host->device copy: not the candidate's work
        # B: two calls of 2 us each, one launch per call.
        _span(7, 14, 205.0, 2.0, "kern_b"), _span(7, 14, 215.0, 2.0, "kern_b"),
        _span(7, 14, 400.0, 9.0, "kern_outside"),  # after every window
    ]


def test_device_time_per_candidate_from_a_trace():
    dt = _module()
    events = _synthetic_trace()
    kernels, streams = dt._device_kernel_events(events)
    assert streams == ["Stream #14(Compute)"]
    assert {e["name"] for e in kernels} == {"kern_a", "kern_b", "kern_outside", "Memset 3"}
    windows = dt._annotation_windows(events)
    assert windows == {"A": (100.0, 150.0), "B": (200.0, 250.0)}
    inside_a = [e for e in kernels if windows["A"][0] <= e["ts"] <= windows["A"][1]]
    a = dt._summarise(inside_a, calls=2)
    assert a["device_us"] == pytest.approx(4.0 + 1.0)  # median kernel + median memset, once per call
    assert a["device_us_mean"] == pytest.approx((3 + 5 + 1 + 1) / 2)
    assert a["kernels_per_call"] == 2.0
    inside_b = [e for e in kernels if windows["B"][0] <= e["ts"] <= windows["B"][1]]
    assert dt._summarise(inside_b, calls=2)["device_us"] == pytest.approx(2.0)


def test_time_candidates_on_cpu_reports_wall_time_and_no_device_time():
    dt = _module()
    f = jax.jit(lambda x: x * 2.0)
    bad = jax.jit(lambda x: x @ jnp.ones((3, 3)))  # shape error at warm-up: recorded, others still timed
    out = dt.time_candidates({"double": (f, [(jnp.ones(8),), (jnp.zeros(8),)]), "bad": (bad, [(jnp.ones(8),)])}, calls=4)
    assert out["double"]["wall_us"] > 0
    assert out["double"]["device_us"] is None  # no GPU stream in a CPU trace
    assert "error" in out["bad"] and "TypeError" in out["bad"]["error"]
