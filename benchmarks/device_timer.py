"""Device-side time of jitted calls, read from a JAX profiler trace.

A batch-1 decode kernel on a GPU runs for microseconds, less than it takes Python to
dispatch a jitted call, so a host clock around each call measures the dispatch. Here
each candidate runs ``calls`` times inside its own ``TraceAnnotation``; the kernels,
memsets and device-side copies the GPU ran inside that window (the trace's device
streams; host<->device copies left out) are summed. The host clock over the same
asynchronous loop is kept beside it as ``wall_us``: the time per call when nothing but dispatch hides the launches.

Used by ``benchmarks/gpu_kernels.py``; on a backend without device streams in its
trace (CPU) ``device_us`` is ``None``.
"""

from __future__ import annotations

import gzip
import json
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

_PREFIX = "cand:"


def _load_trace(log_dir: Path) -> list[dict[str, Any]]:
    files = sorted(log_dir.glob("**/*.trace.json.gz")) or sorted(log_dir.glob("**/*.json.gz"))
    if not files:
        raise FileNotFoundError(f"no trace written under {log_dir}")
    with gzip.open(files[-1]) as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def _device_kernel_events(events: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Complete events on a GPU device's stream lines, host<->device copies left out."""
    device_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                   and "/device:GPU" in str(e.get("args", {}).get("name", ""))}
    thread_names = {(e["pid"], e.get("tid")): str(e.get("args", {}).get("name", "")) for e in events
                    if e.get("ph") == "M" and e.get("name") == "thread_name" and e["pid"] in device_pids}
    # Device processes also carry derived lines ("XLA Ops", "XLA Modules") that repeat the
    # kernels' spans; the stream lines hold each kernel once.
    streams = {key for key, name in thread_names.items() if name.startswith("Stream")}
    if not streams:  # an unknown naming: every device line that is not a derived one
        streams = {key for key, name in thread_names.items() if not name.startswith("XLA")}
    # Host<->device copies are not a candidate's work; device-side memsets and copies are.
    kernels = [e for e in events if e.get("ph") == "X" and (e["pid"], e.get("tid")) in streams
               and not any(w in str(e.get("name", "")).lower() for w in ("htod", "dtoh", "h2d", "d2h"))]
    return kernels, sorted(thread_names[k] for k in streams)


def _annotation_windows(events: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    windows = {}
    for e in events:
        long_name = str(e.get("args", {}).get("long_name", e.get("name", "")))
        if e.get("ph") == "X" and long_name.startswith(_PREFIX):
            windows[long_name[len(_PREFIX):]] = (float(e["ts"]), float(e["ts"]) + float(e["dur"]))
    return windows


def _summarise(kernels: list[dict[str, Any]], calls: int) -> dict[str, Any]:
    by_name: dict[str, list[float]] = defaultdict(list)
    for e in kernels:
        by_name[str(e.get("name", ""))].append(float(e["dur"]))
    total = sum(sum(v) for v in by_name.values())
    # Per call: each kernel's median duration times how often it ran per call, so one
    # slow outlier launch does not move the figure as it moves the mean.
    median_per_call = sum(statistics.median(v) * len(v) / calls for v in by_name.values())
    return {"device_us": median_per_call, "device_us_mean": total / calls,
            "kernels_per_call": sum(len(v) for v in by_name.values()) / calls,
            "kernel_names": sorted(by_name)[:8],
            "kernel_median_us": {k: statistics.median(v) for k, v in sorted(by_name.items())[:8]}}


def _run(fn: Callable[..., Any], arg_sets: Sequence[tuple[Any, ...]], calls: int) -> None:
    """``calls`` asynchronous calls rotating over ``arg_sets``, then wait for the last."""
    out = None
    for c in range(calls):
        out = fn(*arg_sets[c % len(arg_sets)])
    jax.block_until_ready(out)  # one stream runs them in order: the last done is all done


def time_candidates(
    candidates: dict[str, tuple[Callable[..., Any], Sequence[tuple[Any, ...]]]],
    calls: int,
) -> dict[str, dict[str, Any]]:
    """Time each candidate on the device and on the host clock.

    Args:
        candidates: name -> (jitted function, argument tuples); call ``c`` uses
            ``args[c % len(args)]``, so distinct weights rotate and the cache holds none
            of them when the set is larger than it.
        calls: calls per candidate in each timed pass (after one warm-up pass).

    Returns:
        name -> ``{"wall_us", "device_us", "device_us_mean", "kernels_per_call",
        "kernel_names", "kernel_median_us", "trace_streams"}``; the device figures are ``None`` when the trace has no GPU
        stream, with ``"trace_streams"`` naming what it had; ``{"error"}`` for a
        candidate that raised in its warm-up.
    """
    results: dict[str, dict[str, Any]] = {}
    runnable = {}
    for name, (fn, arg_sets) in candidates.items():
        try:
            for args in arg_sets:  # warm-up: compile and touch every weight once
                jax.block_until_ready(fn(*args))
        except Exception as e:  # noqa: BLE001 - one failing candidate must not lose the others' timings
            results[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            continue
        runnable[name] = (fn, arg_sets)
    for name, (fn, arg_sets) in runnable.items():
        t0 = time.perf_counter()
        _run(fn, arg_sets, calls)
        results[name] = {"wall_us": (time.perf_counter() - t0) / calls * 1e6}
    with tempfile.TemporaryDirectory() as log_dir:
        jax.profiler.start_trace(log_dir, create_perfetto_trace=True)
        try:
            for name, (fn, arg_sets) in runnable.items():
                with jax.profiler.TraceAnnotation(_PREFIX + name):
                    _run(fn, arg_sets, calls)
        finally:
            jax.profiler.stop_trace()
        events = _load_trace(Path(log_dir))
    kernels, streams = _device_kernel_events(events)
    windows = _annotation_windows(events)
    processes = sorted({str(e.get("args", {}).get("name")) for e in events
                        if e.get("ph") == "M" and e.get("name") == "process_name"})
    for name in runnable:
        results[name]["trace_streams"] = streams
        if not streams or name not in windows:
            results[name].update(device_us=None, device_us_mean=None, kernels_per_call=None,
                                 kernel_names=[], trace_processes=processes)
            continue
        start, end = windows[name]
        inside = [e for e in kernels if start <= float(e["ts"]) <= end]
        results[name].update(_summarise(inside, calls))
    return results
